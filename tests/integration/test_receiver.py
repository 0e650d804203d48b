"""The demo's webhook receiver accepts only requests whose both signatures verify, within the time window."""

from __future__ import annotations

import socket
import time

import httpx
import orjson
import pytest

from connectors.webhook import signed_headers
from devstack.receiver import WebhookReceiver

pytestmark = pytest.mark.integration

SECRET = "receiver-secret-\u2713"
ACTION_ID = "ab" * 32
ACTION = {"action_id": ACTION_ID, "rule_id": "deal_promo", "user_key": "u1", "events": []}
BODY = orjson.dumps(ACTION)


def headers(**overrides: str) -> dict[str, str]:
    return {**signed_headers(SECRET.encode(), BODY, ACTION_ID, int(time.time())), **overrides}


def raw_post(port: int, header_lines: bytes) -> bytes:
    """A request with header bytes no HTTP client library would send (non-ASCII)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            + header_lines
            + b"Content-Length: %d\r\n\r\n" % len(BODY)
            + BODY
        )
        return s.recv(4096)


@pytest.mark.fault
def test_receiver_verifies_both_signatures_and_the_timestamp() -> None:
    with WebhookReceiver(SECRET, tolerance_s=60) as rec, httpx.Client(trust_env=False) as client:
        url = rec.url("/hook")
        assert client.post(url, content=BODY, headers=headers()).status_code == 200
        stale = signed_headers(SECRET.encode(), BODY, ACTION_ID, int(time.time()) - 120)
        assert client.post(url, content=BODY, headers=stale).status_code == 401  # a replay, too old
        assert (
            client.post(url, content=BODY, headers=headers(**{"webhook-signature": "v1,AAAA"})).status_code
            == 401
        )
        legacy_only = {k: v for k, v in headers().items() if not k.startswith("webhook-")}
        assert client.post(url, content=BODY, headers=legacy_only).status_code == 401
        other = signed_headers(b"another-secret", BODY, ACTION_ID, int(time.time()))
        assert client.post(url, content=BODY, headers=other).status_code == 401
        good = headers()
        hostile = b"".join(
            f"{k}: {v}\r\n".encode()
            for k, v in good.items()
            if k not in ("webhook-signature", "Content-Type")
        )
        reply = raw_post(rec.port, hostile + "webhook-signature: v1,\u00e9\u2713\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 401")
        summary = rec.summary()
    assert summary["accepted"] == 1 and summary["bad_signature"] == 5
    assert [r.status for r in rec.receipts()] == [200, 401, 401, 401, 401, 401]
