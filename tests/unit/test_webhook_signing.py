"""Signing and verification helpers: ``X-Clickpulse-Signature`` and the Standard Webhooks headers.

The Standard Webhooks reference library (``standardwebhooks``, test dependency only) verifies what we
sign and signs what we verify, so the two implementations of the spec agree. Hostile input never makes
a verification helper raise.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook

from connectors import webhook as wh
from connectors.webhook import (
    sign,
    sign_standard,
    signed_headers,
    verify_signature,
    verify_standard_signature,
    webhook_id_problem,
)

pytestmark = pytest.mark.unit

SECRET = b"signing-secret-\xe2\x9c\x93-0123456789abcdef"
ACTION_ID = "9f" * 32
BODY = orjson.dumps({"action_id": ACTION_ID, "rule_id": "deal_promo", "user_key": "u\u00e9", "events": []})
NOW = 1_800_000_000
TS = str(NOW)


def test_headers_keep_the_contract_ones_and_add_standard_webhooks() -> None:
    headers = signed_headers(SECRET, BODY, ACTION_ID, NOW)
    expected_content = f"{ACTION_ID}.{NOW}.".encode() + BODY
    expected_sig = base64.b64encode(hmac.new(SECRET, expected_content, hashlib.sha256).digest()).decode()
    assert headers == {
        "Content-Type": "application/json",
        "X-Clickpulse-Signature": "sha256=" + hmac.new(SECRET, BODY, hashlib.sha256).hexdigest(),
        "X-Clickpulse-Action-Id": ACTION_ID,
        "Idempotency-Key": ACTION_ID,
        "webhook-id": ACTION_ID,
        "webhook-timestamp": TS,
        "webhook-signature": "v1," + expected_sig,
    }
    assert all(v.isascii() for v in headers.values())


def test_the_reference_library_verifies_our_signature_and_we_verify_its_own() -> None:
    now = int(time.time())
    headers = signed_headers(SECRET, BODY, ACTION_ID, now)
    # bytes: the raw HMAC key (a str would be read as the spec's base64 ``whsec_`` serialisation)
    assert Webhook(SECRET).verify(BODY, headers) == orjson.loads(BODY)
    assert Webhook("whsec_" + base64.b64encode(SECRET).decode()).verify(BODY, headers) is not None
    theirs = Webhook(SECRET).sign(ACTION_ID, datetime.fromtimestamp(now, UTC), BODY.decode())
    assert theirs == headers["webhook-signature"]
    assert verify_standard_signature(SECRET, BODY, ACTION_ID, str(now), theirs)


def test_verification_accepts_bytes_or_str_secret_and_body() -> None:
    sig = sign_standard(SECRET, ACTION_ID, NOW, BODY)
    for secret in (SECRET, SECRET.decode("utf-8")):
        for body in (BODY, BODY.decode("utf-8")):
            assert verify_standard_signature(secret, body, ACTION_ID, TS, sig, now=NOW)
            assert verify_signature(secret, body, sign(SECRET, BODY))
    assert verify_standard_signature(SECRET, BODY, ACTION_ID.encode(), TS.encode(), sig.encode(), now=NOW)


def test_timestamp_tolerance_refuses_replays_and_clock_skew() -> None:
    sig = sign_standard(SECRET, ACTION_ID, NOW, BODY)

    def ok(now: float, tolerance_s: float = 300.0) -> bool:
        return verify_standard_signature(SECRET, BODY, ACTION_ID, TS, sig, now=now, tolerance_s=tolerance_s)

    assert ok(NOW) and ok(NOW + 300) and ok(NOW - 300)
    assert not ok(NOW + 301)  # replayed after the window
    assert not ok(NOW - 301)  # from the future
    assert ok(NOW + 3000, tolerance_s=3600) and not ok(NOW + 30, tolerance_s=10)
    assert not ok(float("nan")) and not ok(NOW, tolerance_s=float("nan"))
    # the timestamp is signed: moving it into the window breaks the signature
    assert not verify_standard_signature(SECRET, BODY, ACTION_ID, str(NOW + 400), sig, now=NOW + 400)


def test_several_space_separated_signatures_one_valid_is_enough() -> None:
    good = sign_standard(SECRET, ACTION_ID, NOW, BODY)
    old = sign_standard(b"the-previous-secret", ACTION_ID, NOW, BODY)
    v1a = "v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5BdqzCInXqYXFymVJaA7AZdpXwVLPo3mNl8EM+m7TBAg=="
    valid = (f"{old} {good}", f"{good} {old}", f"{v1a} {good}", f"v1,!!! garbage {good}  ", f"v2,x {good}")
    for header in valid:
        assert verify_standard_signature(SECRET, BODY, ACTION_ID, TS, header, now=NOW), header
    assert not verify_standard_signature(SECRET, BODY, ACTION_ID, TS, f"{old} {v1a}", now=NOW)
    assert not verify_standard_signature(SECRET, BODY, ACTION_ID, TS, good.replace("v1,", "v1a,"), now=NOW)


def test_every_signature_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(wh.hmac, "compare_digest", spy)
    good = sign_standard(SECRET, ACTION_ID, NOW, BODY)
    other = sign_standard(b"x", ACTION_ID, NOW, BODY)
    assert verify_standard_signature(SECRET, BODY, ACTION_ID, TS, f"{good} {other}", now=NOW)
    assert len(calls) == 2  # no early exit on the first match
    calls.clear()
    assert verify_signature(SECRET, BODY, sign(SECRET, BODY)) and len(calls) == 1


def test_action_ids_that_cannot_be_a_webhook_id_are_refused_for_signing() -> None:
    assert webhook_id_problem(ACTION_ID) is None and webhook_id_problem("msg_2KWPBgLl:1-x") is None
    for bad in ("", "a.b", "a b", "caf\u00e9", "a\nb", "x" * 257, "\x00"):
        assert webhook_id_problem(bad) is not None, bad
        with pytest.raises(ValueError, match="action_id"):
            signed_headers(SECRET, BODY, bad, NOW)


HOSTILE_HEADERS: list[Any] = [
    None,
    "",
    " ",
    "v1",
    "v1,",
    ",",
    ",,,,",
    "v1,,",
    "v1,===",
    "v1,\u00e9\u00e9",
    "v1,\udcff",
    "\u00ff\u00fe",  # latin-1 decoded bytes, as http.server hands them over
    "sha256=\u2713",
    "sha256=" + "0" * 64,
    "v1," + "A" * 10_000,
    " ".join(["v1,AAAA"] * 5000),
    b"\xff\xfe",
    b"v1,\xff",
    "\x00",
    "v1,AAAA\x00",
    12345,
    ["v1,AAAA"],
]
HOSTILE_IDS: list[Any] = [None, "", "caf\u00e9", "a.b", "x" * 10_000, b"\xff", "\u00ff", 7]
HOSTILE_TIMESTAMPS: list[Any] = [
    None,
    "",
    "abc",
    "1e9",
    "-5",
    "9" * 400,
    "\u0661\u0662\u0663",  # Arabic-Indic digits: int() would take them
    "１８",  # full-width digits
    "1800000000.5",
    b"\xff",
    TS.encode(),
    float("nan"),
    10**400,
]
SECRETS: list[Any] = [SECRET, SECRET.decode(), "", b"", "\u00e9\udcff", None, 5]
BODIES: list[Any] = [BODY, BODY.decode(), b"", "", "\udcff", None, b"\xff" * 100]


@pytest.mark.fault
def test_verification_helpers_never_raise_on_hostile_input() -> None:
    good = sign_standard(SECRET, ACTION_ID, NOW, BODY)
    for header in HOSTILE_HEADERS:
        for secret in SECRETS:
            assert verify_signature(secret, BODY, header) is False, (secret, header)
            assert verify_standard_signature(secret, BODY, ACTION_ID, TS, header, now=NOW) is False
    for body in BODIES:
        for secret in SECRETS:
            assert isinstance(verify_signature(secret, body, sign(SECRET, BODY)), bool)
            assert isinstance(verify_standard_signature(secret, body, ACTION_ID, TS, good, now=NOW), bool)
    for wid in HOSTILE_IDS:
        assert verify_standard_signature(SECRET, BODY, wid, TS, good, now=NOW) is False, wid
    for ts in HOSTILE_TIMESTAMPS:
        if ts == TS.encode():
            continue
        assert verify_standard_signature(SECRET, BODY, ACTION_ID, ts, good, now=NOW) is False, ts
    # an empty secret never verifies, even against a signature made with an empty key
    assert not verify_signature(b"", BODY, sign(b"", BODY))
    unkeyed = sign_standard(b"", ACTION_ID, NOW, BODY)
    assert not verify_standard_signature(b"", BODY, ACTION_ID, TS, unkeyed, now=NOW)
