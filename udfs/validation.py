"""Validation of raw events (``events.raw``): size, UTF-8, JSON, JSON Schema, timestamps.

:func:`validate` turns one raw Kafka value into either a :class:`ValidEvent` or an :class:`Invalid`
(never raises). Checks run in this fixed order and the first failure wins:

1. size cap on the raw bytes                          -> ``size_exceeded``
2. UTF-8 decoding                                      -> ``invalid_utf8``
3. JSON parse; the document must be an object          -> ``invalid_json``
4. JSON Schema (``udfs/schemas/raw_event.schema.json``) -> ``schema_violation``
5. ``timestamp`` / ``sent_at`` parse (ISO-8601 with offset, or epoch ms) -> ``schema_violation``
6. clock-skew correction (Segment's rule, when ``sent_at`` is present)
   ``event_time = received_at - (sent_at - timestamp)`` and range check against ``received_at``
                                                       -> ``timestamp_out_of_range``

The JSON Schema is compiled once (fastjsonschema) on first use.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar, cast

import fastjsonschema
import orjson

from udfs.timeutil import TimestampError, parse_timestamp_ms

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FUTURE_S",
    "DEFAULT_MAX_PAST_S",
    "ErrorCode",
    "Invalid",
    "ValidEvent",
    "raw_event_validator",
    "validate",
    "validate_batch",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32768
DEFAULT_MAX_FUTURE_S = 86400
DEFAULT_MAX_PAST_S = 30 * 86400

_SCHEMA_RESOURCE = "raw_event.schema.json"
_DETAIL_VALUE_LIMIT = 200


class ErrorCode(enum.StrEnum):
    """Why a raw event was rejected (the ``error_code`` of a DLQ record)."""

    SIZE_EXCEEDED = "size_exceeded"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    SCHEMA_VIOLATION = "schema_violation"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"


@dataclass(slots=True)
class ValidEvent:
    """A raw event that passed validation.

    ``data`` is the parsed JSON object, unchanged. ``event_time_ms`` is the skew-corrected event
    time (UTC epoch ms) that downstream windows use; ``timestamp_ms`` is the client's original
    ``timestamp`` and ``sent_at_ms`` its ``sent_at`` (``None`` when absent).
    """

    ok: ClassVar[bool] = True
    data: dict[str, Any]
    event_time_ms: int
    timestamp_ms: int
    sent_at_ms: int | None
    received_at_ms: int


@dataclass(slots=True)
class Invalid:
    """A rejected raw event: an :class:`ErrorCode` and a human-readable detail."""

    ok: ClassVar[bool] = False
    error_code: ErrorCode
    error_detail: str


def _load_schema() -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads(
        resources.files("udfs").joinpath("schemas", _SCHEMA_RESOURCE).read_bytes()
    )
    return schema


@functools.cache
def raw_event_validator() -> Callable[[Any], Any]:
    """Return the compiled (and cached) fastjsonschema validator for the raw-event schema."""
    validator: Callable[[Any], Any] = fastjsonschema.compile(_load_schema())
    return validator


def _specialize(schema: dict[str, Any], type_value: str) -> dict[str, Any] | None:
    """The schema with every ``allOf`` item ``{"if": {"properties": {"type": {"const": C}}}, ...}``
    resolved for events whose ``type`` is ``type_value`` (``then`` when C matches, else ``else``).

    fastjsonschema evaluates ``if`` by raising and catching an exception when it does not match,
    which roughly doubles validation time; a per-type schema avoids that. Returns ``None`` when the
    schema has a shape this does not understand (the full validator is used then).
    """
    items = schema.get("allOf")
    if not isinstance(items, list):
        return None
    resolved: list[Any] = []
    for item in items:
        if not isinstance(item, dict) or "if" not in item:
            resolved.append(item)
            continue
        condition = item["if"]
        if not (
            isinstance(condition, dict)
            and set(condition) == {"properties"}
            and isinstance(condition["properties"], dict)
            and set(condition["properties"]) == {"type"}
            and isinstance(condition["properties"]["type"], dict)
            and set(condition["properties"]["type"]) == {"const"}
        ):
            return None
        branch = (
            item.get("then") if condition["properties"]["type"]["const"] == type_value else item.get("else")
        )
        rest = {k: v for k, v in item.items() if k not in ("if", "then", "else")}
        if branch is None:
            resolved.append(rest)
        elif isinstance(branch, dict):
            resolved.append({**rest, "allOf": [branch]})
        else:
            return None
    return {**schema, "allOf": resolved}


@functools.cache
def _validators_by_type() -> dict[str, Callable[[Any], Any]]:
    """Validators specialised per event ``type`` (see :func:`_specialize`), compiled once."""
    schema = _load_schema()
    type_schema = schema.get("properties", {}).get("type", {})
    validators: dict[str, Callable[[Any], Any]] = {}
    for type_value in type_schema.get("enum", ()):
        if isinstance(type_value, str):
            specialized = _specialize(schema, type_value)
            if specialized is not None:
                validators[type_value] = fastjsonschema.compile(specialized)
    return validators


def _schema_error(data: dict[str, Any]) -> str | None:
    """Validate against the raw-event schema; return an error detail or ``None`` when valid.

    The fast per-type validator decides valid events; anything it rejects is re-checked with the
    full validator, which is the source of truth and of the error message.
    """
    type_value = data.get("type")
    fast = _validators_by_type().get(type_value) if isinstance(type_value, str) else None
    if fast is not None:
        try:
            fast(data)
            return None
        except fastjsonschema.JsonSchemaValueException:
            pass
    try:
        raw_event_validator()(data)
    except fastjsonschema.JsonSchemaValueException as exc:
        return f"{exc.message} (path: {exc.name or 'data'}, rule: {exc.rule})"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    if len(text) > _DETAIL_VALUE_LIMIT:
        return text[:_DETAIL_VALUE_LIMIT] + "..."
    return text


def _decode_error(raw: bytes) -> Invalid:
    """Classify a payload orjson rejected: invalid UTF-8 takes precedence over invalid JSON."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Invalid(ErrorCode.INVALID_UTF8, f"payload is not valid UTF-8: {exc}")
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Invalid(ErrorCode.INVALID_JSON, f"payload is not valid JSON: {exc}")
    return Invalid(ErrorCode.INVALID_JSON, "payload is not valid JSON")  # pragma: no cover


def _validate(
    raw: Any, received_at_ms: int, max_bytes: int, max_future_s: int, max_past_s: int
) -> ValidEvent | Invalid:
    if type(raw) is not bytes:
        if isinstance(raw, str):
            try:
                raw = raw.encode("utf-8")
            except UnicodeEncodeError as exc:
                return Invalid(ErrorCode.INVALID_UTF8, f"payload is not valid UTF-8: {exc}")
        elif isinstance(raw, bytes | bytearray | memoryview):
            raw = bytes(raw)
        else:
            return Invalid(ErrorCode.INVALID_JSON, f"payload must be bytes, got {type(raw).__name__}")

    size = len(raw)
    if size > max_bytes:
        return Invalid(ErrorCode.SIZE_EXCEEDED, f"payload is {size} bytes, limit is {max_bytes}")

    # orjson validates UTF-8 while parsing; only on failure do we tell invalid UTF-8 from bad JSON.
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _decode_error(raw)
    if not isinstance(data, dict):
        return Invalid(ErrorCode.INVALID_JSON, f"payload must be a JSON object, got {type(data).__name__}")

    schema_error = _schema_error(data)
    if schema_error is not None:
        return Invalid(ErrorCode.SCHEMA_VIOLATION, schema_error)

    try:
        timestamp_ms = parse_timestamp_ms(data["timestamp"])
    except TimestampError as exc:
        return Invalid(ErrorCode.SCHEMA_VIOLATION, f"data.timestamp: {exc}")
    sent_at = data.get("sent_at")
    if sent_at is None:
        sent_at_ms = None
        event_time_ms = timestamp_ms
    else:
        try:
            sent_at_ms = parse_timestamp_ms(sent_at)
        except TimestampError as exc:
            return Invalid(ErrorCode.SCHEMA_VIOLATION, f"data.sent_at: {exc}")
        event_time_ms = received_at_ms - (sent_at_ms - timestamp_ms)

    if event_time_ms > received_at_ms + max_future_s * 1000:
        return Invalid(
            ErrorCode.TIMESTAMP_OUT_OF_RANGE,
            f"event time is {(event_time_ms - received_at_ms) / 1000:.3f}s after received_at "
            f"(limit {max_future_s}s; timestamp={_short(data['timestamp'])}, sent_at={_short(sent_at)})",
        )
    if event_time_ms < received_at_ms - max_past_s * 1000:
        return Invalid(
            ErrorCode.TIMESTAMP_OUT_OF_RANGE,
            f"event time is {(received_at_ms - event_time_ms) / 1000:.3f}s before received_at "
            f"(limit {max_past_s}s; timestamp={_short(data['timestamp'])}, sent_at={_short(sent_at)})",
        )
    return ValidEvent(data, event_time_ms, timestamp_ms, sent_at_ms, received_at_ms)


def validate(
    raw: bytes,
    *,
    received_at_ms: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_future_s: int = DEFAULT_MAX_FUTURE_S,
    max_past_s: int = DEFAULT_MAX_PAST_S,
) -> ValidEvent | Invalid:
    """Validate one raw event value and normalise its time; never raises.

    ``raw`` is the Kafka record value (``bytes``; ``bytearray``/``memoryview``/``str`` are accepted
    too, a ``str`` being measured as its UTF-8 encoding). ``received_at_ms`` is when the pipeline
    received the event (UTC epoch ms, e.g. the Kafka record timestamp).
    """
    return _validate_safe(raw, int(received_at_ms), max_bytes, max_future_s, max_past_s)


def _validate_safe(
    raw: Any, received_at_ms: int, max_bytes: int, max_future_s: int, max_past_s: int
) -> ValidEvent | Invalid:
    try:
        return _validate(raw, received_at_ms, max_bytes, max_future_s, max_past_s)
    except Exception as exc:  # defensive: a validator bug must not kill the job
        log.exception("unexpected error while validating an event")
        return Invalid(
            ErrorCode.SCHEMA_VIOLATION, f"unexpected validation error: {type(exc).__name__}: {exc}"
        )


def validate_batch(
    raws: Sequence[bytes],
    received_at_ms: Sequence[int] | int,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_future_s: int = DEFAULT_MAX_FUTURE_S,
    max_past_s: int = DEFAULT_MAX_PAST_S,
) -> list[ValidEvent | Invalid]:
    """Validate a batch (e.g. a pandas UDF column); one result per input, in order.

    ``received_at_ms`` is either one value for the whole batch or a sequence (list, pandas Series,
    numpy array) aligned with ``raws``.
    """
    if hasattr(received_at_ms, "__len__"):
        times = cast(Sequence[int], received_at_ms)
        if len(times) != len(raws):
            raise ValueError(f"received_at_ms has {len(times)} values for {len(raws)} payloads")
    else:
        times = [int(received_at_ms)] * len(raws)
    return [
        _validate_safe(r, int(t), max_bytes, max_future_s, max_past_s)
        for r, t in zip(raws, times, strict=True)
    ]
