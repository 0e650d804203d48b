"""Dead-letter records for ``events.dlq`` (contract shape, see ARCHITECTURE.md).

A DLQ record is a JSON object::

    {"error_code": "...", "error_detail": "...", "source_topic": "events.raw", "partition": 0,
     "offset": 42, "received_at": "2026-11-22T20:00:01.000Z", "payload": "<original bytes>"}

``payload`` is the original record value as text when it is valid UTF-8; otherwise it is the base64
of the bytes and the record gets ``"payload_encoding": "base64"``. The Kafka key of the DLQ record
should be the original key (the job passes it through).
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from udfs.timeutil import TimestampError, format_ms
from udfs.validation import ErrorCode, Invalid

__all__ = ["decode_payload", "dlq_record", "dlq_record_for"]


def decode_payload(record: dict[str, Any]) -> bytes:
    """Return the original payload bytes of a parsed DLQ record (inverse of :func:`dlq_record`)."""
    payload = record["payload"]
    if record.get("payload_encoding") == "base64":
        return base64.b64decode(payload)
    return str(payload).encode("utf-8")


def dlq_record(
    raw: bytes | bytearray | memoryview | str | None,
    *,
    error_code: ErrorCode | str,
    error_detail: str,
    source_topic: str,
    partition: int,
    offset: int,
    received_at_ms: int,
) -> bytes:
    """Build the JSON value of a DLQ record for one rejected raw event.

    ``received_at`` is rendered as ISO-8601 UTC with milliseconds. A ``None`` payload (Kafka
    tombstone) becomes an empty string.
    """
    record: dict[str, Any] = {
        "error_code": error_code.value if isinstance(error_code, ErrorCode) else str(error_code),
        "error_detail": error_detail,
        "source_topic": source_topic,
        "partition": int(partition),
        "offset": int(offset),
        "received_at": _received_at(received_at_ms),
    }
    if raw is None:
        record["payload"] = ""
    else:
        # a str with lone surrogates cannot be JSON text: it ends up base64-encoded below
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
        try:
            record["payload"] = data.decode("utf-8")
        except UnicodeDecodeError:
            record["payload"] = base64.b64encode(data).decode("ascii")
            record["payload_encoding"] = "base64"
    return orjson.dumps(record)


def dlq_record_for(
    raw: bytes | bytearray | memoryview | str | None,
    invalid: Invalid,
    *,
    source_topic: str,
    partition: int,
    offset: int,
    received_at_ms: int,
) -> bytes:
    """Convenience wrapper: :func:`dlq_record` from a :class:`~udfs.validation.Invalid` result."""
    return dlq_record(
        raw,
        error_code=invalid.error_code,
        error_detail=invalid.error_detail,
        source_topic=source_topic,
        partition=partition,
        offset=offset,
        received_at_ms=received_at_ms,
    )


def _received_at(received_at_ms: int) -> str:
    try:
        return format_ms(int(received_at_ms))
    except TimestampError:
        return ""
