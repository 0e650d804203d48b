"""The loader's JSONEachRow fast path without Kafka or a server: the body it sends, when it declines, and
(with chDB in process, the engine of the embedded endpoint) that its SQL yields exactly :func:`convert`'s
rows for records :func:`convert` accepts and refuses every record :func:`convert` rejects."""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from connectors.loader import (
    ACTIONS,
    EVENTS,
    FAST_INPUT_SETTINGS,
    SESSIONS,
    Msg,
    convert,
    declines_fast_path,
    fast_insert_sql,
    json_rows,
)
from tests.unit.test_loader_batches import EVENT

pytestmark = pytest.mark.unit


def msg(value: Any, offset: int = 0, partition: int = 0) -> Msg:
    raw = value if value is None or isinstance(value, bytes) else orjson.dumps(value)
    return Msg("t", partition, offset, b"k", raw)


def test_json_rows_splices_partition_and_offset() -> None:
    body = json_rows([msg({"a": 1}, 7, 3), msg(b'{"b": "x"}', 8, 3)])
    assert body == (
        b'{"kafka_partition":3,"kafka_offset":7,"a":1}\n{"kafka_partition":3,"kafka_offset":8,"b": "x"}'
    )
    assert [orjson.loads(line) for line in body.split(b"\n")][1] == {
        "kafka_partition": 3,
        "kafka_offset": 8,
        "b": "x",
    }


@pytest.mark.parametrize(
    "value",
    [None, b"", b" {}", b"[1]", b"{}", b"{not json", b'"x"', b'{"kafka_offset": 1}', b'{"x": "\xff"}'],
)
def test_json_rows_declines_what_is_not_an_object_text(value: bytes | None) -> None:
    """Anything but ``{"...`` goes to :func:`convert` (``{}`` spliced would not be JSON), as does a record
    naming a lineage field or with bytes that are not UTF-8 (anywhere: ClickHouse skips unknown fields
    unread); a broken object like ``{not json`` is left to ClickHouse's parser, which refuses it."""
    got = json_rows([msg(EVENT, 0), msg(value, 1)])
    assert got is None or value == b"{not json"


def test_only_tables_whose_columns_all_have_a_fast_conversion() -> None:
    sql = fast_insert_sql(EVENTS, "db")
    assert sql is not None and sql.startswith("INSERT INTO db.events (`message_id`, ")
    assert sql.endswith(" FORMAT JSONEachRow") and "FROM input('" in sql and "throwIf(" in sql
    assert fast_insert_sql(SESSIONS, "db") is None  # Decimal revenue, counts: Arrow as before
    assert fast_insert_sql(ACTIONS, "db") is None


def test_which_errors_decline_to_python() -> None:
    refused = "Code: 395. DB::Exception: a record fails the checks (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO)"
    assert declines_fast_path(DatabaseError(refused))
    assert declines_fast_path(DatabaseError("Code: 26. Cannot parse JSON (CANNOT_PARSE_QUOTED_STRING)"))
    assert declines_fast_path(DatabaseError("boom", code=252))  # TOO_MANY_PARTS: Python path retries it
    # no server answer: retried; an exception in a view fires after the block was written: retried
    assert not declines_fast_path(OperationalError("Error HTTPConnectionPool: connection refused"))
    assert not declines_fast_path(DatabaseError(refused + ": while pushing to view db.x_mv"))
    assert not declines_fast_path(ValueError("Code: 6."))


# ------------------------------------------------------------------ the SQL, run by chDB in process


def _run_fast(msgs: list[Msg]) -> pa.Table:
    """The fast path's SELECT over ``msgs`` (``input()`` replaced by ``format()`` over the same body)."""
    chdb = pytest.importorskip("chdb")
    sql = fast_insert_sql(EVENTS, "db")
    assert sql is not None
    body = json_rows(msgs)
    assert body is not None and b"$$" not in body
    select = sql[sql.index(" SELECT ") + 1 : sql.rindex(" FORMAT JSONEachRow")]
    select = select.replace("FROM input('", "FROM format(JSONEachRow, '", 1)
    select = select.replace("') WHERE throwIf", f"', $${body.decode()}$$) WHERE throwIf", 1)
    settings = ", ".join(f"{k} = {v}" for k, v in FAST_INPUT_SETTINGS.items())
    res = chdb.query(f"{select} SETTINGS {settings}", "Arrow")
    return pa.ipc.open_file(pa.BufferReader(res.bytes())).read_all()


GOOD: list[dict[str, Any]] = [
    EVENT,
    {**EVENT, "sent_at": "2026-11-22T19:59:59.000Z", "is_bot": True, "event": None},
    {**EVENT, "properties": None, "traits": {"plan": ["a", {"b": None}]}, "is_bot": 1},
    {**EVENT, "properties": '{"as":"text"}', "user_id": "ü-ñ 🙂", "timestamp": "2026-11-22T20:00:00Z"},
    {**EVENT, "properties": [1, 2], "is_bot": 0, "page_title": 'quote " and \\ backslash'},
    {k: v for k, v in EVENT.items() if k not in ("event", "sent_at", "ip", "traits", "is_bot")},
]


def test_fast_rows_equal_convert() -> None:
    msgs = [msg(r, 10 + i, i % 3) for i, r in enumerate(GOOD)]
    want = convert(EVENTS, msgs)
    assert want.rejected == []
    got = _run_fast(msgs)
    assert got.num_rows == len(GOOD)
    for name, column in zip(EVENTS.schema.names, got.columns, strict=True):
        expect = want.table.column(name).to_pylist()
        have = column.to_pylist()
        if name in ("properties", "traits"):  # JSON text: the same document (ClickHouse keeps the bytes)
            expect, have = [orjson.loads(v) for v in expect], [orjson.loads(v) for v in have]
        assert have == expect, name


BAD: list[Any] = [
    b"{not json",
    {**EVENT, "message_id": ""},
    {**EVENT, "message_id": None},
    {**EVENT, "user_key": 5},
    {**EVENT, "type": True},
    {**EVENT, "timestamp": "yesterday"},
    {**EVENT, "timestamp": "2400-01-01T00:00:00.000Z"},
    {**EVENT, "timestamp": "2026-02-30T20:00:00.000Z"},
    {**EVENT, "timestamp": "2026-11-22T24:00:00.000Z"},
    {**EVENT, "timestamp": "2026-11-22 20:00:00"},
    {**EVENT, "timestamp": 1795377600123},  # accepted by convert, but not by the fast path: declines
    {**EVENT, "received_at": None},
    {**EVENT, "sent_at": "soon"},
    {**EVENT, "is_bot": "maybe"},
    {**EVENT, "is_bot": "true"},
    {**EVENT, "is_bot": 2},
    {**EVENT, "page_url": {"a": 1}},
    {**EVENT, "page_url": [1]},
    {**EVENT, "page_url": 3.5},
    {**EVENT, "properties": 5},
    b'{"message_id": "m", "type": "track", "user_key": "u", "page_url": "\\ud800"}',
]


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_fast_path_refuses_the_whole_unit_when_a_record_is_not_plainly_valid(bad: Any) -> None:
    """The fast path never loads a row :func:`convert` would reject (or convert differently): one such
    record anywhere fails the insert before anything is written, and the unit goes to :func:`convert`."""
    msgs = [msg(EVENT, 0), msg(bad, 1), msg(EVENT, 2)]
    with pytest.raises(RuntimeError):
        _run_fast(msgs)
