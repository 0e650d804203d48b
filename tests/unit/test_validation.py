"""Unit tests for udfs.validation, udfs.timeutil and udfs.dlq."""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from udfs.dlq import decode_payload, dlq_record, dlq_record_for
from udfs.timeutil import TimestampError, format_ms, parse_iso8601_ms, parse_timestamp_ms
from udfs.validation import (
    ErrorCode,
    Invalid,
    ValidEvent,
    _validators_by_type,
    raw_event_validator,
    validate,
    validate_batch,
)

pytestmark = pytest.mark.unit


def ms(text: str) -> int:
    """Epoch ms of an ISO string, computed independently of udfs.timeutil."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


RECEIVED = ms("2026-11-22T20:00:05.000+00:00")
DAY_MS = 86_400_000


def event(**overrides: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "message_id": "4f1c-0001",
        "type": "track",
        "event": "Product Viewed",
        "anonymous_id": "a-123",
        "user_id": None,
        "timestamp": "2026-11-22T20:00:00.123Z",
        "context": {
            "ip": "203.0.113.9",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
            "locale": "en-US",
            "page": {
                "url": "https://shop.example/p/42?utm_source=google",
                "referrer": "https://www.google.com/",
            },
        },
        "properties": {"deal_id": "LAS-DEC", "price": 129.0},
        "traits": {},
    }
    for key, value in overrides.items():
        if value is _DELETE:
            ev.pop(key, None)
        else:
            ev[key] = value
    return ev


_DELETE = object()


def raw(ev: Any) -> bytes:
    return orjson.dumps(ev)


def check(payload: bytes, **kwargs: Any) -> ValidEvent | Invalid:
    kwargs.setdefault("received_at_ms", RECEIVED)
    return validate(payload, **kwargs)


def expect_invalid(payload: bytes, code: ErrorCode, **kwargs: Any) -> Invalid:
    result = check(payload, **kwargs)
    assert isinstance(result, Invalid), result
    assert result.error_code is code, result
    assert result.error_detail
    return result


def expect_valid(payload: bytes, **kwargs: Any) -> ValidEvent:
    result = check(payload, **kwargs)
    assert isinstance(result, ValidEvent), result
    return result


# ---------------------------------------------------------------------------------------------- valid


def test_valid_track_event_without_sent_at_keeps_timestamp() -> None:
    result = expect_valid(raw(event()))
    assert result.ok is True
    assert result.data["event"] == "Product Viewed"
    assert result.data["properties"] == {"deal_id": "LAS-DEC", "price": 129.0}
    assert result.timestamp_ms == ms("2026-11-22T20:00:00.123+00:00")
    assert result.event_time_ms == result.timestamp_ms
    assert result.sent_at_ms is None
    assert result.received_at_ms == RECEIVED


def test_clock_skew_correction_uses_sent_at() -> None:
    # client clock is 1 h 2 min ahead: sent 877 ms after the event, received at 20:00:05.000 server time
    ev = event(timestamp="2026-11-22T21:02:00.123Z", sent_at="2026-11-22T21:02:01.000Z")
    result = expect_valid(raw(ev))
    assert result.timestamp_ms == ms("2026-11-22T21:02:00.123+00:00")
    assert result.sent_at_ms == ms("2026-11-22T21:02:01.000+00:00")
    # received_at - (sent_at - timestamp) = 20:00:05.000 - 0.877 s
    assert result.event_time_ms == RECEIVED - 877
    assert format_ms(result.event_time_ms) == "2026-11-22T20:00:04.123Z"


def test_skew_correction_rescues_a_client_clock_years_off() -> None:
    ev = event(timestamp="2020-01-01T00:00:00.000Z", sent_at="2020-01-01T00:00:02.500Z")
    result = expect_valid(raw(ev))
    assert result.event_time_ms == RECEIVED - 2500


def test_null_sent_at_means_no_correction() -> None:
    result = expect_valid(raw(event(sent_at=None)))
    assert result.sent_at_ms is None
    assert result.event_time_ms == ms("2026-11-22T20:00:00.123+00:00")


def test_epoch_ms_timestamps() -> None:
    ts = RECEIVED - 60_000
    result = expect_valid(raw(event(timestamp=ts, sent_at=ts + 250)))
    assert result.timestamp_ms == ts
    assert result.sent_at_ms == ts + 250
    assert result.event_time_ms == RECEIVED - 250
    # fractional epoch ms are floored
    result = expect_valid(raw(event(timestamp=ts + 0.9)))
    assert result.timestamp_ms == ts


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-11-22T20:00:00.123Z",
        "2026-11-22T22:00:00.123+02:00",
        "2026-11-22T15:30:00.123-04:30",
        "2026-11-22T20:00:00.123+00:00",
        "2026-11-22T20:00:00.123456Z",  # microseconds are truncated to ms
        "2026-11-22 20:00:00.123Z",  # RFC 3339 space separator
    ],
)
def test_iso_offsets_normalize_to_utc(timestamp: str) -> None:
    assert expect_valid(raw(event(timestamp=timestamp))).timestamp_ms == ms("2026-11-22T20:00:00.123+00:00")


def test_valid_types_and_identities() -> None:
    expect_valid(raw(event(type="page", event=_DELETE)))
    expect_valid(
        raw(event(type="identify", event=None, user_id="u-1", anonymous_id=None, traits={"plan": "pro"}))
    )
    expect_valid(raw(event(type="alias", event=_DELETE, user_id="u-1", previous_id="a-123")))
    expect_valid(raw(event(context=None, properties=None, traits=None)))
    expect_valid(raw(event(extra_top_level_field={"ignored": True})))


def test_str_and_bytearray_payloads_are_accepted() -> None:
    expect_valid(raw(event()).decode("utf-8"))  # type: ignore[arg-type]
    expect_valid(bytearray(raw(event())))  # type: ignore[arg-type]
    expect_valid(memoryview(raw(event())))  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- error paths


def sized_payload(size: int) -> bytes:
    """A valid event serialised to exactly ``size`` bytes."""
    base = raw(event(properties={"pad": ""}))
    payload = raw(event(properties={"pad": "x" * (size - len(base))}))
    assert len(payload) == size
    return payload


def test_size_cap_boundaries() -> None:
    expect_valid(sized_payload(32768))
    expect_invalid(sized_payload(32769), ErrorCode.SIZE_EXCEEDED)
    expect_valid(sized_payload(1000), max_bytes=1000)
    detail = expect_invalid(sized_payload(1001), ErrorCode.SIZE_EXCEEDED, max_bytes=1000).error_detail
    assert "1001" in detail and "1000" in detail


def test_size_is_checked_before_utf8() -> None:
    expect_invalid(b"\xff" * 40000, ErrorCode.SIZE_EXCEEDED)


@pytest.mark.parametrize(
    "payload",
    [b'{"message_id": "\xff"}', b"\xc3\x28", b'"\xed\xa0\x80"', b"\x80abc", b'{"a": "\xf4\x90\x80\x80"}'],
)
def test_invalid_utf8(payload: bytes) -> None:
    expect_invalid(payload, ErrorCode.INVALID_UTF8)


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"[1, 2]", b'"a string"', b"null", b"42", b"{'single': 'quotes'}", b'{"a": 1}x',
     b"\xef\xbb\xbf{}", b'{"a": NaN}', b'"\\ud800"'],
)  # fmt: skip
def test_invalid_json(payload: bytes) -> None:
    expect_invalid(payload, ErrorCode.INVALID_JSON)


@pytest.mark.parametrize(
    ("ev", "path_fragment"),
    [
        (event(message_id=_DELETE), "data"),
        (event(message_id=""), "data.message_id"),
        (event(message_id=7), "data.message_id"),
        (event(type="click"), "data.type"),
        (event(type="track", event=_DELETE), "data"),
        (event(type="track", event=""), "data.event"),
        (event(type="alias", previous_id=None, user_id="u-1"), "data.previous_id"),
        (event(type="alias", user_id=None, previous_id="a-1"), "data.user_id"),
        (event(anonymous_id=None, user_id=None), "data"),
        (event(anonymous_id="", user_id=_DELETE), "data"),
        (event(timestamp=_DELETE), "data"),
        (event(timestamp=True), "data.timestamp"),
        (event(timestamp=-5), "data.timestamp"),
        (event(timestamp="short"), "data.timestamp"),
        (event(sent_at=[1]), "data.sent_at"),
        (event(context={"ip": 5}), "data.context.ip"),
        (event(context={"page": {"url": 42}}), "data.context.page.url"),
        (event(context="not an object"), "data.context"),
        (event(properties=[1, 2]), "data.properties"),
    ],
)
def test_schema_violations_name_the_path(ev: dict[str, Any], path_fragment: str) -> None:
    detail = expect_invalid(raw(ev), ErrorCode.SCHEMA_VIOLATION).error_detail
    assert f"path: {path_fragment}" in detail


@pytest.mark.parametrize(
    "bad",
    [
        "yesterday at noon",
        "2026-11-22T20:00:00",  # naive: no offset
        "2026-11-22",  # date only
        "2026-13-01T00:00:00Z",
        "2026-11-31T00:00:00Z",
        "2026-11-22T24:00:00Z",
        "2026-11-22x20:00:00Z",
        "2026-11-22T20:00:00+25:00",
        "1795377600123",  # epoch ms must be a number, not a string
        "2026-11-22T20:00:00.123z",
    ],
)
def test_unparseable_timestamps_are_schema_violations(bad: str) -> None:
    detail = expect_invalid(raw(event(timestamp=bad)), ErrorCode.SCHEMA_VIOLATION).error_detail
    assert "data.timestamp" in detail
    detail = expect_invalid(raw(event(sent_at=bad)), ErrorCode.SCHEMA_VIOLATION).error_detail
    assert "data.sent_at" in detail


def test_huge_epoch_number_is_a_schema_violation() -> None:
    expect_invalid(raw(event(timestamp=1e300)), ErrorCode.SCHEMA_VIOLATION)


def test_future_and_past_bounds() -> None:
    future_limit = RECEIVED + DAY_MS
    expect_valid(raw(event(timestamp=future_limit)))
    expect_invalid(raw(event(timestamp=future_limit + 1)), ErrorCode.TIMESTAMP_OUT_OF_RANGE)
    past_limit = RECEIVED - 30 * DAY_MS
    expect_valid(raw(event(timestamp=past_limit)))
    detail = expect_invalid(
        raw(event(timestamp=past_limit - 1)), ErrorCode.TIMESTAMP_OUT_OF_RANGE
    ).error_detail
    assert "before received_at" in detail
    # custom bounds
    expect_valid(raw(event(timestamp=RECEIVED + 10_000)), max_future_s=10)
    expect_invalid(raw(event(timestamp=RECEIVED + 10_001)), ErrorCode.TIMESTAMP_OUT_OF_RANGE, max_future_s=10)
    expect_invalid(
        raw(event(timestamp=RECEIVED - 3_600_001)), ErrorCode.TIMESTAMP_OUT_OF_RANGE, max_past_s=3600
    )


def test_range_check_applies_to_the_corrected_time() -> None:
    # sent_at before timestamp by 2 days -> corrected time is 2 days after received_at
    ev = event(timestamp=RECEIVED, sent_at=RECEIVED - 2 * DAY_MS)
    expect_invalid(raw(ev), ErrorCode.TIMESTAMP_OUT_OF_RANGE)
    # event stored offline for 40 days, then sent: the corrected time is 40 days back
    ev = event(timestamp=RECEIVED - 40 * DAY_MS, sent_at=RECEIVED)
    expect_invalid(raw(ev), ErrorCode.TIMESTAMP_OUT_OF_RANGE)


def test_error_code_is_a_str_enum() -> None:
    assert ErrorCode.INVALID_JSON == "invalid_json"
    assert str(ErrorCode.SCHEMA_VIOLATION) == "schema_violation"
    assert {c.value for c in ErrorCode} >= {
        "invalid_json", "invalid_utf8", "schema_violation", "size_exceeded", "timestamp_out_of_range",
    }  # fmt: skip


def test_non_bytes_input_is_invalid_not_an_exception() -> None:
    expect_invalid(12345, ErrorCode.INVALID_JSON)  # type: ignore[arg-type]
    expect_invalid(None, ErrorCode.INVALID_JSON)  # type: ignore[arg-type]
    expect_invalid("\ud800", ErrorCode.INVALID_UTF8)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- batch


def test_validate_batch_preserves_order_and_accepts_scalar_or_aligned_times() -> None:
    payloads = [raw(event()), b"{", raw(event(type="nope"))]
    results = validate_batch(payloads, RECEIVED)
    assert [r.ok for r in results] == [True, False, False]
    assert [getattr(r, "error_code", None) for r in results] == [
        None, ErrorCode.INVALID_JSON, ErrorCode.SCHEMA_VIOLATION,
    ]  # fmt: skip
    times = [RECEIVED, RECEIVED + 1, RECEIVED + 2]
    results = validate_batch([raw(event())] * 3, times)
    assert [r.received_at_ms for r in results if isinstance(r, ValidEvent)] == times
    with pytest.raises(ValueError):
        validate_batch([raw(event())], [RECEIVED, RECEIVED])


# -------------------------------------------------------------------------------------------- fuzz


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), rng.randint(-(10**15), 10**15)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e308, rng.uniform(-1e13, 1e13)])
    if kind == "str":
        return "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0xD7FF)]))
            for _ in range(rng.randint(0, 50))
        )
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = list(event().keys()) + ["sent_at", "previous_id", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def assert_result(payload: Any) -> ValidEvent | Invalid:
    result = validate(payload, received_at_ms=RECEIVED)
    assert isinstance(result, ValidEvent | Invalid)
    if isinstance(result, Invalid):
        assert isinstance(result.error_code, ErrorCode)
        assert isinstance(result.error_detail, str) and result.error_detail
    return result


def test_fuzz_random_bytes_never_raise() -> None:
    rng = random.Random(20261122)
    for _ in range(2000):
        payload = rng.randbytes(rng.randint(0, 300))
        result = assert_result(payload)
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            assert isinstance(result, Invalid) and result.error_code is ErrorCode.INVALID_UTF8


def test_fuzz_random_json_and_mutated_events_never_raise() -> None:
    rng = random.Random(7)
    seen: set[str] = set()
    for _ in range(1500):
        assert_result(orjson.dumps(random_json(rng)))
        ev = event(sent_at="2026-11-22T20:00:01.000Z")
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(list(ev.keys()) + ["context"])
            ev[key] = random_json(rng, depth=3) if rng.random() < 0.8 else _DELETE
            ev = {k: v for k, v in ev.items() if v is not _DELETE}
        result = assert_result(orjson.dumps(ev))
        seen.add("valid" if isinstance(result, ValidEvent) else result.error_code.value)
        # byte-level mutation of a valid payload
        payload = bytearray(raw(event()))
        for _ in range(rng.randint(1, 4)):
            payload[rng.randrange(len(payload))] = rng.randrange(256)
        assert_result(bytes(payload))
    assert {"valid", "schema_violation"} <= seen


def test_per_type_validators_agree_with_the_full_schema() -> None:
    fast = _validators_by_type()
    assert set(fast) == {"track", "page", "identify", "alias"}  # the shipped schema is specialisable
    full = raw_event_validator()

    def verdict(validator: Any, data: Any) -> bool:
        try:
            validator(data)
        except Exception:
            return False
        return True

    rng = random.Random(99)
    agreements = {True: 0, False: 0}
    for _ in range(3000):
        ev = event(type=rng.choice(["track", "page", "identify", "alias"]))
        for _ in range(rng.randint(0, 3)):
            key = rng.choice(["event", "user_id", "anonymous_id", "previous_id", "timestamp", "context"])
            ev[key] = rng.choice([None, "", "x", 5, random_json(rng, depth=3)])
            if rng.random() < 0.2:
                ev.pop(key)
        expected = verdict(full, ev)
        assert verdict(fast[ev["type"]], ev) is expected, ev
        agreements[expected] += 1
    assert min(agreements.values()) > 300  # both outcomes were exercised


# ---------------------------------------------------------------------------------------- timeutil


def test_format_ms() -> None:
    assert format_ms(0) == "1970-01-01T00:00:00.000Z"
    assert format_ms(ms("2026-11-22T20:00:00.123+00:00")) == "2026-11-22T20:00:00.123Z"
    assert format_ms(ms("2026-11-22T20:00:00.007+00:00")) == "2026-11-22T20:00:00.007Z"
    assert format_ms(-1) == "1969-12-31T23:59:59.999Z"
    with pytest.raises(TimestampError):
        format_ms(10**18)


def test_parse_and_format_round_trip() -> None:
    rng = random.Random(3)
    for _ in range(500):
        value = rng.randint(0, 4_102_444_800_000)  # up to year 2100
        text = format_ms(value)
        assert parse_iso8601_ms(text) == value
        assert parse_timestamp_ms(text) == value
        assert datetime.fromisoformat(text).astimezone(UTC).timestamp() * 1000 == pytest.approx(value)


@pytest.mark.parametrize(
    "value", [True, False, None, [], {}, float("nan"), float("inf"), -1, -0.5, 1e20, "", " "]
)
def test_parse_timestamp_rejects_non_timestamps(value: Any) -> None:
    with pytest.raises(TimestampError):
        parse_timestamp_ms(value)


def test_parse_timestamp_epoch_and_offsets() -> None:
    assert parse_timestamp_ms(1_795_377_600_123) == 1_795_377_600_123
    assert parse_timestamp_ms(1_795_377_600_123.9) == 1_795_377_600_123
    assert parse_timestamp_ms("2026-11-22T20:00:00Z") == parse_timestamp_ms("2026-11-22T21:00:00+01:00")
    assert parse_timestamp_ms("2026-11-22T20:00:00Z") == parse_timestamp_ms("2026-11-22T20:00:00-00:00")


# --------------------------------------------------------------------------------------------- DLQ


def test_dlq_record_for_utf8_payload() -> None:
    payload = b'{"message_id": "m-1", "type": "bogus", "note": "caf\xc3\xa9"}'
    result = expect_invalid(payload, ErrorCode.SCHEMA_VIOLATION)
    value = dlq_record_for(
        payload, result, source_topic="events.raw", partition=3, offset=1234, received_at_ms=RECEIVED
    )
    record = orjson.loads(value)
    assert record == {
        "error_code": "schema_violation",
        "error_detail": result.error_detail,
        "source_topic": "events.raw",
        "partition": 3,
        "offset": 1234,
        "received_at": "2026-11-22T20:00:05.000Z",
        "payload": '{"message_id": "m-1", "type": "bogus", "note": "café"}',
    }
    assert decode_payload(record) == payload


def test_dlq_record_for_non_utf8_payload_is_base64() -> None:
    payload = b'{"a": "\xff\xfe"}\x00\x80'
    value = dlq_record(
        payload,
        error_code=ErrorCode.INVALID_UTF8,
        error_detail="payload is not valid UTF-8",
        source_topic="prefix.events.raw",
        partition=0,
        offset=7,
        received_at_ms=RECEIVED,
    )
    record = orjson.loads(value)
    assert record["payload_encoding"] == "base64"
    assert base64.b64decode(record["payload"]) == payload
    assert decode_payload(record) == payload
    assert record["error_code"] == "invalid_utf8"
    assert set(record) == {
        "error_code", "error_detail", "source_topic", "partition", "offset", "received_at", "payload",
        "payload_encoding",
    }  # fmt: skip


def test_dlq_record_odd_inputs() -> None:
    record = orjson.loads(
        dlq_record(None, error_code="invalid_json", error_detail="tombstone", source_topic="events.raw",
                   partition=1, offset=2, received_at_ms=RECEIVED)
    )  # fmt: skip
    assert record["payload"] == "" and record["error_code"] == "invalid_json"
    record = orjson.loads(
        dlq_record("\ud800 lone surrogate", error_code=ErrorCode.INVALID_UTF8, error_detail="x",
                   source_topic="events.raw", partition=1, offset=2, received_at_ms=RECEIVED)
    )  # fmt: skip
    assert record["payload_encoding"] == "base64"
