"""Loader logic without Kafka or ClickHouse: batch boundaries, tokens, intents, record conversion."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from connectors.loader import (
    ACTIONS,
    ACTIONS_DLQ,
    EVENTS,
    INTENT_PREFIX,
    SESSIONS,
    BatchBuffer,
    Msg,
    Range,
    RowsRejected,
    Unit,
    choose_marks,
    convert,
    dedup_token,
    intent_metadata,
    isolate_rejected,
    loaded_metadata,
    metadata_topic_id,
    parse_intent,
    plan_units,
    rows_rejected,
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


ACTION: dict[str, Any] = {
    "action_id": "a" * 64,
    "rule_id": "deal_promo",
    "user_key": "u-1",
    "fired_at": "2026-11-22T20:00:05.000Z",
    "event_time": "2026-11-22T20:00:00.000Z",
    "events": [{"message_id": "m-1"}, {"message_id": "m-2"}],
    "details": {"count": 4},
}


def test_convert_actions_and_dead_letters() -> None:
    fired = convert(
        ACTIONS, [msg(ACTION, 0), msg({**ACTION, "rule_id": ""}, 1), msg({**ACTION, "events": 3}, 2)]
    )
    assert [(m.offset, why.split(":")[0]) for m, why in fired.rejected] == [(1, "rule_id"), (2, "events")]
    assert fired.table.schema == ACTIONS.schema
    (row,) = fired.table.to_pylist()
    assert (
        row["status"] == "fired" and row["events"] == 2 and row["attempts"] == 0 and row["last_error"] == ""
    )
    assert row["fired_at"] == datetime(2026, 11, 22, 20, 0, 5, tzinfo=UTC)
    dead = convert(ACTIONS_DLQ, [msg({**ACTION, "attempts": 5, "last_error": "HTTP 500"}, 7)])
    (row,) = dead.table.to_pylist()
    assert (row["status"], row["attempts"], row["last_error"], row["kafka_offset"]) == (
        "dead_lettered",
        5,
        "HTTP 500",
        7,
    )


def test_loader_config_loads_actions_only_when_configured() -> None:
    from connectors.loader import LoaderConfig

    plain = LoaderConfig(bootstrap_servers="k:1", clickhouse_url="http://c:1")
    assert plain.table_of() == {"events.enriched": "events", "sessions": "sessions"}
    full = LoaderConfig(
        bootstrap_servers="k:1",
        clickhouse_url="http://c:1",
        actions_topic="actions",
        actions_dlq_topic="actions.dlq",
    )
    assert full.table_of()["actions"] == full.table_of()["actions.dlq"] == "actions"
    assert full.spec_of()["actions.dlq"] is ACTIONS_DLQ and full.topics[-2:] == ["actions", "actions.dlq"]


def test_convert_empty_batch() -> None:
    out = convert(EVENTS, [])
    assert out.table.num_rows == 0 and out.table.schema == EVENTS.schema


def test_convert_keeps_the_record_of_each_row() -> None:
    out = convert(EVENTS, [msg(EVENT, 0), msg({**EVENT, "is_bot": "maybe"}, 1), msg(EVENT, 2)])
    assert [m.offset for m in out.msgs] == [0, 2] == out.table.column("kafka_offset").to_pylist()


# ------------------------------------------------------------------ rows ClickHouse refuses


CONSTRAINT = (
    "HTTPDriver for http://127.0.0.1:1/ received ClickHouse error code 469\n Code: 469. DB::Exception: "
    "Constraint `known_type` for table db.events is violated at row 1. Expression: (type IN ('track')). "
    "Column values: type = 'bogus'. (VIOLATED_CONSTRAINT) (version 26.9.2.1)"
)


def test_rows_rejected_only_for_row_errors() -> None:
    got = rows_rejected(DatabaseError(CONSTRAINT, code=469, name="VIOLATED_CONSTRAINT"))
    assert got is not None and got.code == 469
    assert got.detail.startswith("Code: 469. DB::Exception: Constraint `known_type`")  # no URL
    assert got.detail.endswith("(VIOLATED_CONSTRAINT)")  # no version trailer
    assert rows_rejected(DatabaseError(CONSTRAINT)) is not None  # code read from the message
    # not about the rows: unavailable, too many parts, schema, an exception inside a view
    assert rows_rejected(OperationalError("Error HTTPConnectionPool: connection refused")) is None
    assert rows_rejected(DatabaseError("Code: 252. Too many parts (TOO_MANY_PARTS)", code=252)) is None
    assert rows_rejected(DatabaseError("Code: 16. No such column (NO_SUCH_COLUMN_IN_TABLE)", code=16)) is None
    in_view = CONSTRAINT.replace("type = 'bogus'.", "type = 'bogus': while pushing to view db.x_mv.")
    assert rows_rejected(DatabaseError(in_view, code=469)) is None
    assert rows_rejected(ValueError("Code: 469.")) is None


class FakeTable:
    """ClickHouse for :func:`isolate_rejected`: refuses a slice holding a bad row, deduplicates by token."""

    def __init__(self, rows: list[int], bad: set[int], crash_after: int | None = None) -> None:
        self.rows, self.bad, self.crash_after = rows, bad, crash_after
        self.tokens: set[str] = set()
        self.stored: list[int] = []
        self.calls = 0

    def insert(self, lo: int, hi: int) -> None:
        self.calls += 1
        part = self.rows[lo:hi]
        if any(r in self.bad for r in part):
            first = next(r for r in part if r in self.bad)
            raise RowsRejected(469, f"row {first} violates")
        token = f"unit|{part[0]}..{part[-1]}"
        if token not in self.tokens:
            self.tokens.add(token)
            self.stored.extend(part)
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise SystemExit("crash")


@pytest.mark.parametrize("bad", [{0}, {99}, {3, 4}, {10, 50, 51, 98}, set(range(100))])
def test_isolate_rejected_finds_exactly_the_bad_rows(bad: set[int]) -> None:
    rows = list(range(100, 200))
    table = FakeTable(rows, {rows[i] for i in bad})
    out = isolate_rejected(len(rows), table.insert, RowsRejected(469, "whole batch"))
    assert [i for i, _ in out] == sorted(bad)
    assert all(why.detail == f"row {rows[i]} violates" for i, why in out)  # each row's own reason
    assert sorted(table.stored) == [r for i, r in enumerate(rows) if i not in bad]
    if len(bad) <= 4:
        assert table.calls <= 2 * len(bad) * 8  # 2 * bad * ceil(log2(100))


@pytest.mark.parametrize("crash_after", [1, 2, 5, 9, 13])
def test_isolate_rejected_replay_after_a_crash_never_double_counts(crash_after: int) -> None:
    """A crash anywhere in the bisection, then a replay: the same slices under the same tokens, so every
    good row is stored exactly once and the bad rows are found again."""
    rows = list(range(64))
    bad = {rows[7], rows[40], rows[41]}
    table = FakeTable(rows, bad, crash_after=crash_after)
    with pytest.raises(SystemExit):
        isolate_rejected(len(rows), table.insert, RowsRejected(469, "whole batch"))
    table.crash_after = None
    out = isolate_rejected(len(rows), table.insert, RowsRejected(469, "whole batch"))
    assert [rows[i] for i, _ in out] == sorted(bad)
    assert sorted(table.stored) == [r for r in rows if r not in bad]  # each good row once


# ------------------------------------------------------------------ topic incarnations


def test_topic_id_in_tokens_and_intents() -> None:
    rs = [Range("t", 0, 0, 10)]
    # a recreated topic starts from offset 0 again: its tokens must differ from the old topic's
    assert dedup_token("db", "events", rs, "id-a") != dedup_token("db", "events", rs, "id-b")
    assert dedup_token("db", "events", rs) == "db.events:t:0:0-10"  # cp1 intents replay with the old token
    meta = intent_metadata(rs, "8f1c-42")
    assert meta == "cp2:intent:8f1c-42:0:0-10"
    assert parse_intent("t", meta) == tuple(rs) and metadata_topic_id(meta) == "8f1c-42"
    assert metadata_topic_id(loaded_metadata("8f1c-42")) == "8f1c-42"
    assert loaded_metadata("") == "" and metadata_topic_id(intent_metadata(rs)) == ""
    unit = plan_units(rs, {"t": "events"}, topic_ids={"t": "8f1c-42"})[0]
    assert unit.topic_id == "8f1c-42" and unit.intent == meta
    assert unit.token("db") == "db.events@8f1c-42:t:0:0-10"


def test_choose_marks() -> None:
    ends = {0: 500, 1: 700}
    assert choose_marks({}, "new", ends) == ({}, "none")
    assert choose_marks({"new": {0: 40}, "old": {0: 400}}, "new", ends) == ({0: 40}, "current")
    # only an older incarnation's marks: the topic was recreated, nothing of them applies
    assert choose_marks({"old": {0: 400, 1: 600}}, "new", ends) == ({}, "recreated")
    # marks from before ids were recorded: adopted, unless a mark lies beyond its partition's end
    assert choose_marks({"": {0: 400, 1: 600}}, "new", ends) == ({0: 400, 1: 600}, "adopted")
    assert choose_marks({"": {0: 400, 1: 900}}, "new", ends) == ({}, "recreated")
    assert choose_marks({"": {0: 400}, "old": {0: 450}}, "new", ends) == ({}, "recreated")
    # no id from the broker: the highest mark of any incarnation (never load twice)
    assert choose_marks({"": {0: 400}, "old": {0: 450, 1: 10}}, "", ends) == ({0: 450, 1: 10}, "current")


def test_lag_skips_partitions_the_consumer_no_longer_holds() -> None:
    """A broker restart made the loader crash: a rebalance had taken a partition from the consumer that
    the loader's own list still held, and ``highwater`` raised ``IllegalStateError``."""
    from kafka import TopicPartition
    from kafka.errors import IllegalStateError

    from connectors.loader import Loader

    held, gone = TopicPartition("t", 0), TopicPartition("t", 1)

    class Consumer:
        def highwater(self, tp: TopicPartition) -> int:
            if tp == gone:
                raise IllegalStateError("Partition is not assigned")
            return 10

        def position(self, tp: TopicPartition, timeout_ms: int = 0) -> int:
            return 4

    loader = Loader.__new__(Loader)
    loader._consumer = Consumer()
    loader._assigned = {held, gone}
    assert loader._lag() == 6
