"""The Segment HTTP Tracking API mapped onto clickpulse's raw event: no HTTP framework, no Kafka.

A request body (``/v1/track``, ``/v1/page``, ``/v1/identify``, ``/v1/alias``: one event; ``/v1/batch``:
``{"batch": [...]}`` whose items carry ``type``) becomes a list of :class:`RawRecord` (Kafka key, JSON
value) or a :class:`RequestError` saying which status to answer and why. A request is taken whole or not
at all: one bad event rejects the batch, so a client never has to work out which events to resend.

Mapping (Segment's camelCase onto the snake_case contract of ``events.raw``): ``messageId`` →
``message_id``, ``anonymousId``, ``userId``, ``previousId``, ``sentAt`` likewise, ``context.userAgent`` →
``context.user_agent``; ``event``, ``name``, ``category``, ``properties``, ``traits``, ``timestamp`` and the
rest of ``context`` are kept. ``writeKey``, ``integrations`` and unknown top-level fields are not written.
The server adds ``received_at`` and, unless the event names one, ``context.ip`` (the client address, see
:func:`client_ip`). A missing ``timestamp`` becomes ``received_at`` (as Segment does); a missing
``messageId`` becomes ``cp-`` + a hash of the event, so a retried request carries the same id and the
ingest job's deduplication drops the repeat. Every record is checked with the ingest job's own validator
(:func:`udfs.validation.validate`), so what the collector accepts passes ingest unchanged; only a
timestamp outside ingest's window is let through (ingest owns that window and dead-letters it, counted).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from udfs.timeutil import format_ms
from udfs.validation import ErrorCode, Invalid, validate

#: The single-event endpoints and the event type each one writes.
ENDPOINT_TYPES: dict[str, str] = {"track": "track", "page": "page", "identify": "identify", "alias": "alias"}
#: Types a ``/v1/batch`` item may have.
EVENT_TYPES = frozenset(ENDPOINT_TYPES.values())

_IDS = (("messageId", "message_id"), ("anonymousId", "anonymous_id"), ("userId", "user_id"),
        ("previousId", "previous_id"))  # fmt: skip
_KEPT = ("event", "name", "category")
_OBJECTS = ("properties", "traits")
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record for ``events.raw``: key (``anonymous_id``, else ``user_id``) and JSON value."""

    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class RequestError(Exception):
    """Why a request is refused: the HTTP status and a reason for the JSON body."""

    status: int
    code: str
    reason: str

    def body(self) -> dict[str, Any]:
        """The JSON answer."""
        return {"success": False, "code": self.code, "message": self.reason}


def bad(reason: str, code: str = "invalid_request") -> RequestError:
    """A 400."""
    return RequestError(400, code, reason)


# ----------------------------------------------------------------------------------------- bodies


def decode_body(raw: bytes, content_encoding: str, max_bytes: int) -> bytes:
    """The request body as sent before ``Content-Encoding`` (``gzip``, ``deflate`` or none).

    Decompresses at most ``max_bytes`` + 1 bytes, so a small bomb costs nothing: past the cap it is 413.
    """
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        if len(raw) > max_bytes:
            raise RequestError(413, "too_large", f"body is {len(raw)} bytes, limit is {max_bytes}")
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise RequestError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported")
    # wbits 47 = 32 + 15: zlib or gzip header, detected; deflate may come raw (no header) from some clients
    d = zlib.decompressobj(47 if encoding != "deflate" or raw[:1] == b"\x78" else -15)
    try:
        out = d.decompress(raw, max_bytes + 1)
        if len(out) <= max_bytes and not d.eof:
            out += d.flush(max_bytes + 1 - len(out))
    except zlib.error as e:
        raise bad(f"body is not valid {encoding}: {e}", "invalid_encoding") from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise RequestError(413, "too_large", f"decompressed body exceeds {max_bytes} bytes")
    return out


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad(f"body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(doc, dict):
        raise bad(f"body must be a JSON object, got {type(doc).__name__}", "invalid_json")
    return doc


# ------------------------------------------------------------------------------------------ auth


def basic_user(authorization: str | None) -> str | None:
    """The user of an HTTP Basic ``Authorization`` header (Segment's write key), or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None


def key_allowed(key: str | None, keys: Iterable[str]) -> bool:
    """True when ``key`` is one of ``keys`` (compared in constant time)."""
    if not key:
        return False
    given = key.encode()
    found = False
    for k in keys:
        found |= hmac.compare_digest(given, k.encode())
    return found


# ------------------------------------------------------------------------------------------- IPs


def client_ip(peer: str | None, forwarded_for: str | None, trusted: Sequence[_Network]) -> str | None:
    """The client's address: ``peer`` (the TCP peer), unless it is a trusted proxy and ``X-Forwarded-For``
    says who it forwarded for.

    ``X-Forwarded-For`` is read right to left (each proxy appends the address it saw), skipping trusted
    proxies; the first address that is not one is the client. A hop that is not an IP address ends the
    walk at the last address known good, so a client cannot smuggle a fake address past the proxy.
    """
    if peer is None or not forwarded_for or not _trusted(peer, trusted):
        return peer
    current = peer
    for hop in reversed(forwarded_for.split(",")):
        addr = _ip(hop.strip())
        if addr is None:
            return current
        current = addr
        if not _trusted(addr, trusted):
            return addr
    return current


def _ip(text: str) -> str | None:
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _trusted(addr: str, trusted: Sequence[_Network]) -> bool:
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in trusted)


# --------------------------------------------------------------------------------------- mapping


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-event size cap (bytes of the record written)."""

    max_event_bytes: int = 32 * 1024


def events_of(endpoint: str, doc: Mapping[str, Any]) -> tuple[list[tuple[str, Mapping[str, Any]]], Any]:
    """``(type, item)`` pairs of a request body and the request-level ``sentAt``."""
    if endpoint == "batch":
        items = doc.get("batch")
        if not isinstance(items, list):
            raise bad("batch body needs a 'batch' array", "invalid_batch")
        if not items:
            raise bad("'batch' is empty", "invalid_batch")
        out: list[tuple[str, Mapping[str, Any]]] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise bad(f"batch[{i}] is not an object", "invalid_event")
            kind = item.get("type")
            if kind not in EVENT_TYPES:
                raise bad(f"batch[{i}].type must be one of {sorted(EVENT_TYPES)}, got {kind!r}", "bad_type")
            out.append((kind, item))
        return out, doc.get("sentAt")
    kind = ENDPOINT_TYPES[endpoint]
    given = doc.get("type")
    if given is not None and given != kind:
        raise bad(f"/v1/{endpoint} takes type {kind!r}, got {given!r}", "bad_type")
    return [(kind, doc)], None


def to_raw(
    kind: str,
    item: Mapping[str, Any],
    *,
    received_at_ms: int,
    ip: str | None,
    batch_sent_at: Any = None,
    limits: Limits = Limits(),  # noqa: B008 - frozen
    where: str = "event",
) -> RawRecord:
    """One Segment event as a record of ``events.raw`` (see the module docstring); raises
    :class:`RequestError` (400 invalid, 413 too large)."""
    rec: dict[str, Any] = {"type": kind}
    for camel, snake in _IDS:
        value = item.get(camel, item.get(snake))
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise bad(f"{where}.{camel} must be a string, got {type(value).__name__}", "bad_field")
        rec[snake] = str(value)
    for name in _KEPT:
        if (value := item.get(name)) is not None:
            if not isinstance(value, str):
                raise bad(f"{where}.{name} must be a string, got {type(value).__name__}", "bad_field")
            rec[name] = value
    for name in _OBJECTS:
        value = item.get(name)
        if value is not None and not isinstance(value, dict):
            raise bad(f"{where}.{name} must be an object, got {type(value).__name__}", "bad_field")
        rec[name] = value or {}
    if "anonymous_id" not in rec and "user_id" not in rec:
        raise bad(f"{where} needs anonymousId or userId", "missing_field")
    if kind == "track" and not rec.get("event"):
        raise bad(f"{where}: a track event needs 'event'", "missing_field")
    if kind == "alias" and ("previous_id" not in rec or "user_id" not in rec):
        raise bad(f"{where}: an alias needs previousId and userId", "missing_field")
    received_at = format_ms(received_at_ms)
    timestamp = item.get("timestamp")
    sent_at = item.get("sentAt", item.get("sent_at", batch_sent_at))
    if sent_at is not None:
        rec["sent_at"] = sent_at
    # no timestamp: the client's send time (skew-corrected by ingest to the receive time), else now
    rec["timestamp"] = timestamp if timestamp is not None else sent_at if sent_at is not None else received_at
    rec["received_at"] = received_at
    rec["context"] = _context(item.get("context"), ip, where)
    if "message_id" not in rec:
        rec["message_id"] = _message_id(rec, received_at if timestamp is None else None)
    value = orjson.dumps(rec)
    if len(value) > limits.max_event_bytes:
        raise RequestError(
            413, "event_too_large", f"{where} is {len(value)} bytes, limit is {limits.max_event_bytes}"
        )
    checked = validate(value, received_at_ms=received_at_ms, max_bytes=limits.max_event_bytes)
    if isinstance(checked, Invalid) and checked.error_code != ErrorCode.TIMESTAMP_OUT_OF_RANGE:
        raise bad(f"{where}: {checked.error_detail}", str(checked.error_code))
    key = rec.get("anonymous_id") or rec.get("user_id") or ""
    return RawRecord(key.encode(), value)


def _context(context: Any, ip: str | None, where: str) -> dict[str, Any]:
    if context is None:
        context = {}
    if not isinstance(context, dict):
        raise bad(f"{where}.context must be an object, got {type(context).__name__}", "bad_field")
    out = dict(context)
    if "userAgent" in out:
        ua = out.pop("userAgent")
        out.setdefault("user_agent", ua)
    if not out.get("ip") and ip:
        out["ip"] = ip
    return out


def _message_id(rec: Mapping[str, Any], received_at: str | None) -> str:
    """``cp-`` + 32 hex digits of a hash of the event (without ``sent_at``/``received_at``, which change
    on a retry), plus ``received_at`` when the event has no timestamp of its own."""
    stable = {k: v for k, v in rec.items() if k not in ("sent_at", "received_at")}
    if received_at is None:
        stable.pop("timestamp", None)
    digest = hashlib.sha256(orjson.dumps(stable, option=orjson.OPT_SORT_KEYS))
    if received_at is not None:
        digest.update(received_at.encode())
    return "cp-" + digest.hexdigest()[:32]


def request_records(
    endpoint: str,
    doc: Mapping[str, Any],
    *,
    received_at_ms: int,
    ip: str | None,
    limits: Limits = Limits(),  # noqa: B008 - frozen
) -> list[RawRecord]:
    """Every record of one request, or :class:`RequestError` for the first bad event."""
    items, sent_at = events_of(endpoint, doc)
    return [
        to_raw(
            kind,
            item,
            received_at_ms=received_at_ms,
            ip=ip,
            batch_sent_at=sent_at,
            limits=limits,
            where=f"batch[{i}]" if endpoint == "batch" else "event",
        )
        for i, (kind, item) in enumerate(items)
    ]


def body_write_key(doc: Mapping[str, Any]) -> str | None:
    """``writeKey`` of a body (Segment's libraries send it there too; ``sendBeacon`` can send only there)."""
    key = doc.get("writeKey")
    return key if isinstance(key, str) and key else None
