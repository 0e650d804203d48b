"""Loader logic without Kafka or ClickHouse: batch boundaries, tokens, intents, record conversion."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
import pytest

from connectors.loader import (
    EVENTS,
    INTENT_PREFIX,
    SESSIONS,
    BatchBuffer,
    Msg,
    Range,
    Unit,
    convert,
    dedup_token,
    intent_metadata,
    parse_intent,
    plan_units,
)

pytestmark = pytest.mark.unit

EVENT: dict[str, Any] = {
    "message_id": "m-1",
    "type": "track",
    "event": "Order Completed",
    "anonymous_id": "a-1",
    "user_id": None,
    "previous_id": None,
    "user_key": "a-1",
    "timestamp": "2026-11-22T20:00:00.123Z",
    "event_time_ms": 1795377600123,
    "sent_at": None,
    "received_at": "2026-11-22T20:00:01.000Z",
    "ip": "203.0.113.9",
    "user_agent": "Mozilla/5.0",
    "page_url": "https://shop.example/checkout",
    "page_path": "/checkout",
    "page_host": "shop.example",
    "page_title": "Checkout",
    "referrer": "",
    "locale": "en-US",
    "properties": {"revenue": 129.99, "currency": "EUR"},
    "traits": {},
    "browser": "Chrome",
    "browser_version": "131.0",
    "os": "Windows",
    "device_type": "desktop",
    "is_bot": False,
    "country": "DE",
    "utm_source": "",
    "utm_medium": "",
    "utm_campaign": "",
    "utm_term": "",
    "utm_content": "",
    "click_id_type": "",
    "referrer_type": "direct",
    "referrer_host": "",
    "profile": {},
}

SESSION: dict[str, Any] = {
    "session_id": "s-1",
    "user_key": "u-1",
    "anonymous_id": "a-1",
    "start": "2026-11-22T20:00:00.000Z",
    "end": 1795378200000,
    "duration_s": 600,
    "events": 7,
    "page_views": 3,
    "entry_page": "/",
    "exit_page": "/checkout",
    "is_bounce": False,
    "converted": True,
    "revenue": 129.99,
    "version": 4,
}


def msg(value: Any, offset: int = 0, partition: int = 0, topic: str = "t") -> Msg:
    """A record whose value is ``value`` serialised (bytes/None pass through)."""
    raw = value if value is None or isinstance(value, bytes) else orjson.dumps(value)
    return Msg(topic, partition, offset, b"k", raw)


# ----------------------------------------------------------------------------- tokens and intents


def test_token_is_order_independent_and_names_every_range() -> None:
    a, b = Range("ev", 1, 10, 20), Range("ev", 0, 5, 9)
    assert dedup_token("db", "events", [a, b]) == dedup_token("db", "events", [b, a])
    assert dedup_token("db", "events", [a, b]) == "db.events:ev:0:5-9,ev:1:10-20"
    assert Unit("ev", "events", (b, a)).token("db") == "db.events:ev:0:5-9,ev:1:10-20"


def test_intent_round_trip() -> None:
    ranges = (Range("ev", 3, 100, 250), Range("ev", 0, 0, 7))
    meta = intent_metadata(ranges)
    assert meta == INTENT_PREFIX + "0:0-7,3:100-250"
    assert parse_intent("ev", meta) == tuple(sorted(ranges))


@pytest.mark.parametrize("meta", [None, "", "something else", INTENT_PREFIX + "x", INTENT_PREFIX + "0:9-3"])
def test_parse_intent_ignores_non_intents(meta: str | None) -> None:
    assert parse_intent("ev", meta) is None


def test_plan_units_one_per_topic_split_to_fit_metadata() -> None:
    ranges = [Range("ev", p, 1000 * p, 1000 * p + 10) for p in range(40)] + [Range("se", 0, 0, 3)]
    units = plan_units(ranges, {"ev": "events", "se": "sessions"}, max_intent_bytes=200)
    assert {u.table for u in units} == {"events", "sessions"}
    assert all(len(u.intent) <= 200 for u in units)
    assert sorted(r for u in units for r in u.ranges) == sorted(ranges)
    assert len([u for u in units if u.topic == "ev"]) > 1
    assert len(plan_units(ranges, {"ev": "events", "se": "sessions"})) == 2


# ----------------------------------------------------------------------------- batch buffer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_batches_tile_the_offset_space() -> None:
    """A partition's next range starts where the previous ended, across gaps (transaction markers)."""
    buf = BatchBuffer(FakeClock())
    buf.position("t", 0, 40)
    buf.add([msg({}, 41), msg({}, 42), msg({}, 44)])  # 40 and 43 are markers / aborted records
    buf.add([msg({}, 7, partition=1)])
    ranges, records = buf.take()
    assert ranges == [Range("t", 0, 40, 45), Range("t", 1, 7, 8)]
    assert [m.offset for m in records[("t", 0)]] == [41, 42, 44]
    buf.add([msg({}, 47)])
    ranges, _ = buf.take()
    assert ranges == [Range("t", 0, 45, 48)]
    assert buf.take() == ([], {})


def test_ready_by_rows_or_age() -> None:
    clock = FakeClock()
    buf = BatchBuffer(clock)
    assert not buf.ready(3, 1.0)
    clock.now += 10
    assert not buf.ready(3, 1.0)  # empty buffers never flush
    buf.add([msg({}, 0), msg({}, 1)])
    assert not buf.ready(3, 1.0)
    clock.now += 1.0
    assert buf.ready(3, 1.0)
    buf.take()
    buf.add([msg({}, i) for i in range(2, 5)])
    assert buf.ready(3, 1.0)
    buf.clear()
    assert buf.rows == 0 and not buf.ready(3, 1.0)


# ----------------------------------------------------------------------------- conversion


def test_convert_events_matches_the_table_schema() -> None:
    out = convert(EVENTS, [msg(EVENT, 5, 2), msg({**EVENT, "message_id": "m-2", "event": None}, 6, 2)])
    assert out.rejected == []
    t = out.table
    assert t.schema == EVENTS.schema
    assert t.num_rows == 2
    row = t.to_pylist()[0]
    assert row["timestamp"] == datetime(2026, 11, 22, 20, 0, 0, 123000, tzinfo=UTC)
    assert row["sent_at"] is None
    assert row["user_id"] == "" and row["event"] == "Order Completed"
    assert orjson.loads(row["properties"]) == {"revenue": 129.99, "currency": "EUR"}
    assert row["kafka_partition"] == 2 and row["kafka_offset"] == 5
    assert t.column("event").to_pylist()[1] == ""
    assert t.schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{nope", "invalid JSON"),
        (None, "tombstone"),
        ([1, 2], "not a JSON object"),
        ({**EVENT, "message_id": ""}, "message_id"),
        ({**EVENT, "user_key": None}, "user_key"),
        ({**EVENT, "timestamp": "yesterday"}, "timestamp"),
        ({**EVENT, "timestamp": "2400-01-01T00:00:00Z"}, "DateTime64 range"),
        ({**EVENT, "is_bot": "maybe"}, "is_bot"),
        ({**EVENT, "page_url": {"a": 1}}, "page_url"),
        ({**EVENT, "properties": 5}, "properties"),
    ],
)
def test_convert_rejects_with_a_reason(value: Any, reason: str) -> None:
    out = convert(EVENTS, [msg(EVENT, 0), msg(value, 1), msg({**EVENT, "message_id": "m-3"}, 2)])
    assert out.table.num_rows == 2
    assert [m.offset for m, _ in out.rejected] == [1]
    assert reason in out.rejected[0][1]


def test_convert_sessions() -> None:
    retracted = {**SESSION, "version": 5, "retracted": True, "revenue": "10.5"}
    out = convert(SESSIONS, [msg(SESSION, 0), msg(retracted, 1), msg({**SESSION, "version": -1}, 2)])
    assert [m.offset for m, _ in out.rejected] == [2]
    rows = out.table.to_pylist()
    assert out.table.schema == SESSIONS.schema
    assert rows[0]["retracted"] == 0 and rows[1]["retracted"] == 1
    assert rows[0]["revenue"] == Decimal("129.9900") and rows[1]["revenue"] == Decimal("10.5000")
    assert rows[0]["end"] == datetime(2026, 11, 22, 20, 10, tzinfo=UTC)
    assert rows[0]["utm_source"] == "" and rows[0]["duration_s"] == 600.0


def test_convert_empty_batch() -> None:
    out = convert(EVENTS, [])
    assert out.table.num_rows == 0 and out.table.schema == EVENTS.schema
