"""Webhook delivery against real local HTTP receivers (pytest-httpserver), dead/black-hole ports and
hostile raw-socket receivers (one that drips its answer, one that answers with an endless body).

Every request a receiver gets is checked: body is the action JSON, the HMAC signature verifies, and
``X-Clickpulse-Action-Id`` and ``Idempotency-Key`` both carry the action id.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest
from pytest_httpserver import HTTPServer
from standardwebhooks import Webhook
from werkzeug import Request, Response

from connectors.webhook import (
    RetryPolicy,
    WebhookDispatcher,
    dead_letter_record,
    parse_retry_after,
    sign,
    verify_signature,
    verify_standard_signature,
)
from udfs.rules import Destination, RuleError, destination_for, parse_rule

pytestmark = pytest.mark.integration

SECRET = b"test-secret-\xe2\x9c\x93"
FAST = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05)


@dataclass
class Receiver:
    """A real HTTP receiver that verifies every request and answers from a scripted list."""

    server: HTTPServer
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[tuple[float, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    delay_s: float = 0.0  # a slow but healthy receiver: each answer takes this long

    def handle(self, request: Request) -> Response:
        body = request.get_data()
        if self.delay_s:
            time.sleep(self.delay_s)  # the server thread answering late, not the test waiting
        with self.lock:
            if not verify_signature(SECRET, body, request.headers.get("X-Clickpulse-Signature")):
                self.bad_signatures += 1
            self.requests.append((time.monotonic(), orjson.loads(body), dict(request.headers)))
            status, headers = self.script.pop(0) if self.script else (200, {})
        return Response("{}", status=status, headers=headers, content_type="application/json")

    def url(self, path: str = "/hook") -> str:
        return self.server.url_for(path)

    def check(self) -> None:
        assert self.bad_signatures == 0
        for _, action, headers in self.requests:
            assert headers["Content-Type"] == "application/json"
            assert headers["X-Clickpulse-Action-Id"] == action["action_id"]
            assert headers["Idempotency-Key"] == action["action_id"]


@pytest.fixture
def receiver_factory() -> Iterator[Callable[[], Receiver]]:
    servers: list[HTTPServer] = []

    def make() -> Receiver:
        server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        receiver = Receiver(server)
        server.expect_request("/hook", method="POST").respond_with_handler(receiver.handle)
        server.expect_request("/elsewhere").respond_with_handler(receiver.handle)
        server.start()
        servers.append(server)
        return receiver

    yield make
    for server in servers:
        server.clear()
        if server.is_running():
            server.stop()


@dataclass
class Outcomes:
    dead: list[tuple[dict[str, Any], int, str]] = field(default_factory=list)
    delivered: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    last_dead_at: float = 0.0
    last_delivered_at: float = 0.0

    def on_dead(self, action: dict[str, Any], attempts: int, last_error: str) -> None:
        self.dead.append((action, attempts, last_error))
        self.last_dead_at = time.monotonic()

    def on_delivered(self, action: dict[str, Any], attempts: int) -> None:
        self.delivered.append((action, attempts))
        self.last_delivered_at = time.monotonic()


def action(n: int, rule_id: str = "deal_promo") -> dict[str, Any]:
    return {
        "action_id": f"{n:064x}",
        "rule_id": rule_id,
        "user_key": f"u{n}",
        "fired_at": "2026-11-22T20:00:01.000Z",
        "event_time": "2026-11-22T20:00:00.000Z",
        "events": [{"message_id": f"m{n}", "event": "Product Viewed", "properties": {"deal_id": "LAS-DEC"}}],
        "details": {},
    }


def dest(url: str, timeout_s: float = 2.0) -> Destination:
    return Destination(url=url, secret=SECRET, timeout_s=timeout_s, rule_id="deal_promo")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dispatcher(outcomes: Outcomes, policy: RetryPolicy = FAST, **kw: Any) -> WebhookDispatcher:
    return WebhookDispatcher(
        outcomes.on_dead, on_delivered=outcomes.on_delivered, policy=policy, seed=7, **kw
    )


def test_5xx_twice_then_200_delivers_on_third_attempt(receiver_factory: Callable[[], Receiver]) -> None:
    rx = receiver_factory()
    rx.script = [(500, {}), (503, {}), (200, {})]
    out = Outcomes()
    with dispatcher(out) as d:
        d.submit(action(1), dest(rx.url()))
        assert d.flush(5)
        stats = d.stats()
    rx.check()
    assert len(rx.requests) == 3
    assert {r[2]["Idempotency-Key"] for r in rx.requests} == {action(1)["action_id"]}
    assert all(r[1] == action(1) for r in rx.requests)
    assert out.delivered == [(action(1), 3)] and out.dead == []
    assert stats["ok"] == 1 and stats["retried"] == 2 and stats["failed"] == 0


def test_4xx_is_final(receiver_factory: Callable[[], Receiver]) -> None:
    rx = receiver_factory()
    rx.script = [(400, {}), (200, {})]
    out = Outcomes()
    with dispatcher(out) as d:
        d.submit(action(2), dest(rx.url()))
        assert d.flush(5)
        assert d.stats()["failed"] == 1
    rx.check()
    assert len(rx.requests) == 1
    assert out.dead == [(action(2), 1, "HTTP 400")]
    assert dead_letter_record(*out.dead[0]) == {**action(2), "attempts": 1, "last_error": "HTTP 400"}


def test_redirect_is_not_followed(receiver_factory: Callable[[], Receiver]) -> None:
    rx = receiver_factory()
    rx.script = [(302, {"Location": rx.url("/elsewhere")})]
    out = Outcomes()
    with dispatcher(out) as d:
        d.submit(action(3), dest(rx.url()))
        assert d.flush(5)
    assert len(rx.requests) == 1
    assert out.dead == [(action(3), 1, "HTTP 302")]


def test_429_honours_retry_after(receiver_factory: Callable[[], Receiver]) -> None:
    rx = receiver_factory()
    rx.script = [(429, {"Retry-After": "1"}), (200, {})]
    out = Outcomes()
    with dispatcher(out) as d:
        d.submit(action(4), dest(rx.url()))
        assert d.flush(5)
    rx.check()
    assert len(rx.requests) == 2
    waited = rx.requests[1][0] - rx.requests[0][0]
    assert 0.95 <= waited < 2.0  # the 10-50 ms back-off alone would be far shorter
    assert out.delivered == [(action(4), 2)]


def test_retry_after_http_date() -> None:
    now = datetime(2026, 11, 22, 20, 0, 0, tzinfo=UTC)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_dead_destinations_do_not_delay_a_healthy_one(
    receiver_factory: Callable[[], Receiver], blackhole: int
) -> None:
    rx = receiver_factory()
    dead_url = f"http://127.0.0.1:{closed_port()}/hook"
    hole_url = f"http://127.0.0.1:{blackhole}/hook"
    out = Outcomes()
    with dispatcher(out, concurrency_per_destination=2) as d:
        for i in range(8):
            d.submit(action(100 + i), dest(dead_url))
            d.submit(action(200 + i), dest(hole_url, timeout_s=0.2))
        # the healthy destination keeps getting its actions on time while both others fail
        for i in range(20):
            d.submit(action(300 + i), dest(rx.url()))
            time.sleep(0.02)
        assert d.flush(15)
        stats = d.stats()
    rx.check()
    healthy = stats["destinations"][f"http://127.0.0.1:{rx.server.port}"]
    assert healthy["ok"] == 20 and healthy["failed"] == 0
    # Sharing a queue with the failing lanes would cost ~2.4 s (16 actions x 3 attempts x 0.2 s / 2 workers);
    # the bounds leave room for a loaded 2-core CI machine.
    assert healthy["latency_p50_ms"] < 200, healthy
    assert healthy["latency_max_ms"] < 600, healthy
    dead = [(a["action_id"], n, err) for a, n, err in out.dead]
    assert len(dead) == 16
    refused = [d for d in out.dead if 100 <= int(d[0]["action_id"], 16) < 200]
    timed_out = [d for d in out.dead if 200 <= int(d[0]["action_id"], 16) < 300]
    assert len(refused) == 8 and all(n == 3 and err.startswith("connection error") for _, n, err in refused)
    assert len(timed_out) == 8 and all(n == 3 and err.startswith("timeout") for _, n, err in timed_out)
    assert stats["failed"] == 16 and stats["ok"] == 20
    # the healthy lane finished while the black hole was still timing out
    assert out.last_delivered_at < out.last_dead_at - 1.0


def test_close_dead_letters_what_is_left(blackhole: int) -> None:
    out = Outcomes()
    slow = RetryPolicy(max_attempts=10, base_delay_s=5.0, max_delay_s=5.0)
    d = dispatcher(out, policy=slow, concurrency_per_destination=1).start()
    for i in range(3):
        d.submit(action(400 + i), dest(f"http://127.0.0.1:{blackhole}/hook", timeout_s=0.2))
    started = time.monotonic()
    d.close(deadline_s=0.5)
    assert time.monotonic() - started < 3
    assert sorted(a["action_id"] for a, _, _ in out.dead) == [action(400 + i)["action_id"] for i in range(3)]
    assert all(err.startswith("shutdown") for _, _, err in out.dead)
    with pytest.raises(RuntimeError):
        d.submit(action(9), dest(f"http://127.0.0.1:{blackhole}/hook"))


def test_full_lane_refuses_instead_of_dead_lettering(receiver_factory: Callable[[], Receiver]) -> None:
    """A slow but healthy destination: a full lane hands the action back to the caller (who spills it);
    nothing deliverable is dead-lettered for a full queue, and the lane takes actions again once it drains.
    A refused destination is still dead-lettered at once."""
    rx = receiver_factory()
    rx.delay_s = 0.2
    out = Outcomes()
    with dispatcher(out, concurrency_per_destination=1, max_queue_per_destination=3) as d:
        taken = [d.submit(action(500 + i), dest(rx.url())) for i in range(5)]
        assert taken == [True, True, True, False, False]
        assert d.backlog(dest(rx.url())) == 3
        assert d.submit(action(510), dest(rx.url()), limit=2) is False  # a caller's tighter bound
        d.submit(action(600), dest("http://203.0.113.9/hook"))
        assert d.flush(10)
        assert d.backlog(dest(rx.url())) == 0 and d.backlogs() == {}
        assert [d.submit(action(503 + i), dest(rx.url())) for i in range(2)] == [True, True]
        assert d.flush(10)
        stats = d.stats()
    rx.check()
    assert sorted(int(a["action_id"], 16) for a, _ in out.delivered) == [500, 501, 502, 503, 504]
    assert [(a["action_id"], err.split(":")[0]) for a, _, err in out.dead] == [
        (action(600)["action_id"], "destination refused")
    ]
    assert stats["rejected"] == 3 and stats["ok"] == 5 and stats["failed"] == 1


@contextmanager
def raw_receiver(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[int]:
    """A loopback TCP server: for each connection (at most 8) reads one request, then ``answer``s it."""
    stop = threading.Event()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5.0)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            try:
                answer(conn, stop)
            except OSError:
                pass  # the client hung up: what these receivers are for

    def accept() -> None:
        while not stop.is_set() and len(threads) < 8:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        acceptor.join(5)
        for t in threads:
            t.join(5)
        server.close()


@pytest.mark.fault
def test_a_dripping_receiver_cannot_hold_a_worker_past_the_deadline() -> None:
    """One byte a second never trips a per-read timeout; the total deadline (the destination's
    timeout) ends the attempt anyway."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

    def drip(conn: socket.socket, stop: threading.Event) -> None:
        for byte in answer:
            conn.sendall(bytes([byte]))
            if stop.wait(1.0):
                return

    out = Outcomes()
    once = RetryPolicy(max_attempts=1)
    with raw_receiver(drip) as port, dispatcher(out, policy=once, concurrency_per_destination=1) as d:
        started = time.monotonic()
        d.submit(action(700), dest(f"http://127.0.0.1:{port}/hook", timeout_s=1.5))
        assert d.flush(6), "the dripping receiver held the worker past its deadline"
        took = time.monotonic() - started
    assert took < 4.0, took
    assert [(a["action_id"], n, err) for a, n, err in out.dead] == [
        (action(700)["action_id"], 1, "timeout after 1.5s (total deadline)")
    ]


@pytest.mark.fault
def test_an_endless_response_body_is_cut_off() -> None:
    """A 2xx announcing a 1 GB body counts as delivered; only a small part of the body is read and the
    connection is dropped (the receiver stops on its own after 64 MiB, a bound for this test)."""
    sent: list[int] = []
    header = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n"

    def flood(conn: socket.socket, stop: threading.Event) -> None:
        chunk = b"0" * 65536
        total = 0
        try:
            conn.sendall(header)
            while total < 64 * 1024 * 1024 and not stop.is_set():
                conn.sendall(chunk)
                total += len(chunk)
        finally:
            sent.append(total)

    out = Outcomes()
    with raw_receiver(flood) as port, dispatcher(out, concurrency_per_destination=1) as d:
        d.submit(action(800), dest(f"http://127.0.0.1:{port}/hook", timeout_s=5.0))
        assert d.flush(10)
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.05)
    assert out.delivered == [(action(800), 1)] and out.dead == []
    # what the kernel's socket buffers took before the client closed, not 1 GB (nor the 64 MiB bound)
    assert len(sent) == 1 and sent[0] < 32 * 1024 * 1024, sent


def test_signature_helpers_and_secret_resolution() -> None:
    body = orjson.dumps(action(7))
    header = sign(SECRET, body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify_signature(SECRET, body, header)
    assert not verify_signature(SECRET, body + b" ", header)
    assert not verify_signature(b"other", body, header)
    assert not verify_signature(SECRET, body, None)
    rule = parse_rule(
        {
            "id": "r",
            "when": {"returning_after": "7d"},
            "action": {"webhook": {"url": "http://127.0.0.1:1/h", "timeout": "3s"}},
        }
    )
    resolved = destination_for(rule, {"CLICKPULSE_WEBHOOK_SECRET": "s3cret"})
    assert resolved.secret == b"s3cret" and resolved.timeout_s == 3.0 and "s3cret" not in repr(resolved)
    with pytest.raises(
        RuleError, match="rule 'r': action.webhook.secret_env: environment variable CLICKPULSE_WEBHOOK_SECRET"
    ):
        destination_for(rule, {})


def test_every_attempt_carries_standard_webhooks_headers_signed_at_its_time(
    receiver_factory: Callable[[], Receiver],
) -> None:
    """The reference Standard Webhooks library verifies each attempt, retries included (fresh timestamp)."""
    rx = receiver_factory()
    rx.script = [(503, {}), (200, {})]
    out = Outcomes()
    before = int(time.time())
    with dispatcher(out) as d:
        d.submit(action(11), dest(rx.url()))
        assert d.flush(5)
    after = int(time.time())
    rx.check()
    assert len(rx.requests) == 2 and out.delivered == [(action(11), 2)]
    body = orjson.dumps(action(11))
    for _, sent, headers in rx.requests:
        assert sent == action(11)
        assert headers["Webhook-Id"] == action(11)["action_id"]
        assert before <= int(headers["Webhook-Timestamp"]) <= after
        assert Webhook(SECRET).verify(body, headers, json_parse=False) is None
        assert verify_standard_signature(
            SECRET, body, headers["Webhook-Id"], headers["Webhook-Timestamp"], headers["Webhook-Signature"]
        )


@pytest.mark.fault
def test_action_id_unfit_for_a_header_is_dead_lettered_and_the_lane_keeps_working(
    receiver_factory: Callable[[], Receiver],
) -> None:
    rx = receiver_factory()
    out = Outcomes()
    with dispatcher(out, concurrency_per_destination=1) as d:
        for bad in ("caf\u00e9", "a.b", "line\nbreak"):
            d.submit({**action(12), "action_id": bad}, dest(rx.url()))
        d.submit(action(13), dest(rx.url()))
        assert d.flush(5)
    rx.check()
    assert [r[1]["action_id"] for r in rx.requests] == [action(13)["action_id"]]
    assert sorted(a["action_id"] for a, _, _ in out.dead) == sorted(["caf\u00e9", "a.b", "line\nbreak"])
    assert all(n == 0 and err.startswith("action refused: action_id") for _, n, err in out.dead)
    assert out.delivered == [(action(13), 1)]
