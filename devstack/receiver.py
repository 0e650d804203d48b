"""A small local webhook receiver: verifies each signature, records what it gets, shows it.

Used by ``clickpulse demo``, the end-to-end tests and the benchmark, and runnable on its own for the
example rules (``docs/rules.example.yaml`` posts to ``127.0.0.1:8099``)::

    CLICKPULSE_WEBHOOK_SECRET=s3cret python -m devstack.receiver --port 8099

It is a ``http.server.ThreadingHTTPServer`` on a daemon thread (one thread per connection, so the
dispatcher's keep-alive connections are served in parallel). Every ``POST`` is checked both ways the
contract signs it: :func:`connectors.webhook.verify_signature` against ``X-Clickpulse-Signature``
(HMAC-SHA256 of the raw body) and :func:`connectors.webhook.verify_standard_signature` against the
Standard Webhooks headers (``webhook-id``, ``webhook-timestamp`` within ``tolerance_s`` of the clock,
``webhook-signature``), and recorded as a :class:`Receipt` with the wall-clock time it arrived. A
request passing both is answered ``200``; any bad signature or a stale timestamp ``401`` (final for the
dispatcher: the action goes to ``actions.dlq``, which is where a misconfigured secret should show up); a
body that is not a JSON object ``400``. Delivery is at-least-once, so the receiver deduplicates on
``Idempotency-Key`` for :meth:`WebhookReceiver.unique` and counts the copies in
:meth:`WebhookReceiver.summary`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from connectors.webhook import (
    ACTION_ID_HEADER,
    DEFAULT_TOLERANCE_S,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    WEBHOOK_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
    verify_signature,
    verify_standard_signature,
)
from udfs.rules import DEFAULT_SECRET_ENV

__all__ = ["Receipt", "WebhookReceiver", "describe_action", "main"]

log = logging.getLogger(__name__)

#: Largest request body accepted (actions are a few KiB).
MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Receipt:
    """One request the receiver got."""

    at: float  #: wall clock (``time.time()``) when the body had been read
    path: str
    status: int  #: what the receiver answered
    signature_ok: bool  #: both signatures valid (``X-Clickpulse-Signature`` and Standard Webhooks)
    action_id: str  #: the ``Idempotency-Key`` header (equal to the body's ``action_id`` when well-formed)
    action: dict[str, Any] = field(repr=False)  #: the parsed body (``{}`` when it was not a JSON object)


def describe_action(action: dict[str, Any]) -> str:
    """A one-line human description of an action record (rule, user, what completed it)."""
    details = action.get("details") or {}
    group = details.get("group") if isinstance(details, dict) else None
    what = ""
    if isinstance(group, dict) and group:
        what = " " + ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in group.items())
    elif isinstance(details, dict) and "missing" in details:
        what = f" (no {details['missing']})"
    elif isinstance(details, dict) and "absent_ms" in details:
        what = f" (back after {int(details['absent_ms']) / 86_400_000:.1f} d)"
    events = action.get("events") or []
    return f"{action.get('rule_id', '?')} user={action.get('user_key', '?')}{what} [{len(events)} event(s)]"


class WebhookReceiver:
    """The receiver. Use as a context manager, or call :meth:`start` and :meth:`close`.

    ``on_receipt`` (optional) is called on the server thread for every request, after it was recorded.
    """

    def __init__(
        self,
        secret: str | bytes,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        on_receipt: Callable[[Receipt], None] | None = None,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
    ) -> None:
        self._secret = secret.encode("utf-8") if isinstance(secret, str) else secret
        self._tolerance_s = tolerance_s
        self._on_receipt = on_receipt
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._receipts: list[Receipt] = []
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the server is bound to."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The port the server is bound to (the real one when constructed with ``port=0``)."""
        return int(self._server.server_address[1])

    def url(self, path: str = "/") -> str:
        """``http://host:port/<path>``."""
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def start(self) -> WebhookReceiver:
        """Serve on a daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="webhook-receiver"
            )
            self._thread.daemon = True
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the dispatcher's connection pool expects

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    self._answer(413)
                    self.close_connection = True
                    return
                body = self.rfile.read(length) if length > 0 else b""
                ok = receiver._verify(body, self.headers)
                status = receiver._record(self.path, body, ok, self.headers.get(IDEMPOTENCY_HEADER)
                                          or self.headers.get(ACTION_ID_HEADER) or "")  # fmt: skip
                self._answer(status)

            def _answer(self, status: int) -> None:
                payload = b"{}" if status < 400 else orjson.dumps({"error": status})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                log.debug("receiver: " + format, *args)

        return Handler

    def _verify(self, body: bytes, headers: Message) -> bool:
        """Both signatures of one request (header names are case-insensitive in ``headers``)."""
        legacy = verify_signature(self._secret, body, headers.get(SIGNATURE_HEADER))
        standard = verify_standard_signature(
            self._secret,
            body,
            headers.get(WEBHOOK_ID_HEADER),
            headers.get(WEBHOOK_TIMESTAMP_HEADER),
            headers.get(WEBHOOK_SIGNATURE_HEADER),
            tolerance_s=self._tolerance_s,
        )
        return legacy and standard

    def _record(self, path: str, body: bytes, ok: bool, action_id: str) -> int:
        now = time.time()
        action: dict[str, Any] = {}
        try:
            parsed = orjson.loads(body)
            if isinstance(parsed, dict):
                action = parsed
        except orjson.JSONDecodeError:
            pass
        status = 401 if not ok else (400 if not action else 200)
        receipt = Receipt(now, path, status, ok, action_id or str(action.get("action_id", "")), action)
        with self._changed:
            self._receipts.append(receipt)
            self._changed.notify_all()
        if self._on_receipt is not None:
            try:
                self._on_receipt(receipt)
            except Exception:
                log.exception("receiver on_receipt callback failed")
        return status

    # -- what was received -------------------------------------------------------------------------

    def receipts(self) -> list[Receipt]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._receipts)

    def unique(self) -> dict[str, Receipt]:
        """The first accepted (200) receipt per action id (``Idempotency-Key``)."""
        out: dict[str, Receipt] = {}
        for r in self.receipts():
            if r.status == 200 and r.action_id not in out:
                out[r.action_id] = r
        return out

    def wait_until(self, predicate: Callable[[list[Receipt]], bool], timeout_s: float) -> bool:
        """Block until ``predicate(receipts)`` is true; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self._receipts):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.5))
        return True

    def summary(self) -> dict[str, Any]:
        """Counts: ``requests``, ``accepted`` (unique action ids), ``redelivered`` (extra copies),
        ``bad_signature``, ``malformed`` and ``by_rule`` / ``by_path`` (unique accepted actions)."""
        receipts = self.receipts()
        unique = self.unique()
        accepted = sum(1 for r in receipts if r.status == 200)
        return {
            "requests": len(receipts),
            "accepted": len(unique),
            "redelivered": accepted - len(unique),
            "bad_signature": sum(1 for r in receipts if not r.signature_ok),
            "malformed": sum(1 for r in receipts if r.signature_ok and r.status == 400),
            "by_rule": dict(sorted(Counter(str(r.action.get("rule_id")) for r in unique.values()).items())),
            "by_path": dict(sorted(Counter(r.path for r in unique.values()).items())),
        }

    def table(self, last: int = 10) -> Table:
        """A rich table of the last ``last`` requests."""
        t = Table(title=f"webhooks received ({len(self.receipts())} requests)", show_lines=False)
        t.add_column("time (UTC)")
        t.add_column("path")
        t.add_column("status", justify="right")
        t.add_column("signature")
        t.add_column("action")
        for r in self.receipts()[-last:]:
            t.add_row(
                time.strftime("%H:%M:%S", time.gmtime(r.at)) + f".{int(r.at * 1000) % 1000:03d}",
                r.path,
                str(r.status),
                "[green]ok[/]" if r.signature_ok else "[red]bad[/]",
                describe_action(r.action) if r.action else "",
            )
        return t


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m devstack.receiver``: serve until Ctrl-C, printing every webhook it gets."""
    p = argparse.ArgumentParser(prog="devstack.receiver", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8099, help="port (default 8099, as in the example rules)")
    p.add_argument(
        "--secret-env",
        default=DEFAULT_SECRET_ENV,
        help=f"variable holding the HMAC secret (default {DEFAULT_SECRET_ENV})",
    )
    args = p.parse_args(list(argv) if argv is not None else None)
    console = Console()
    secret = os.environ.get(args.secret_env, "")
    if not secret:
        console.print(f"[red]error:[/] set {args.secret_env} to the secret the triggers job signs with")
        return 2

    def show(r: Receipt) -> None:
        mark = "[green]✓[/]" if r.status == 200 else f"[red]{r.status}[/]"
        console.print(f"{mark} {r.path}  {describe_action(r.action) if r.action else '(no action)'}")

    with WebhookReceiver(secret, host=args.host, port=args.port, on_receipt=show) as rec:
        console.print(f"listening on {rec.url()} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        console.print(rec.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
