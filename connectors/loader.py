"""Kafka -> ClickHouse loader: ``events.enriched`` -> ``events``, ``sessions`` -> ``sessions``, exactly once.

When configured (the load job does), ``actions`` and ``actions.dlq`` -> ``actions`` too, with ``status``
``fired`` or ``dead_lettered`` (sql/0010_actions.sql), by the same scheme.

A consumer-group job (kafka-python, ``read_committed``), not a Flink operator: PyFlink gives a Python sink
no checkpoint hooks, and exactly-once into ClickHouse needs *deterministic* insert boundaries. The scheme
(``docs/adr/003-loader-exactly-once.md``):

1. Records are buffered per partition; a batch is cut by rows or age. Its ranges ``[start, end)`` per
   partition (``start`` = where the previous batch ended) are grouped into *insert units*, one per topic
   (= table), split further if the intent would not fit Kafka's offset-metadata limit.
2. **Intent**: for every partition of the batch, offset ``start`` is committed with metadata
   ``cp1:intent:<p>:<start>-<end>,...`` naming the whole unit.
3. **Insert**: one insert per unit with ``insert_deduplication_token =
   "<db>.<table>:<topic>:<p>:<start>-<end>,..."`` and ``deduplicate_blocks_in_dependent_materialized_views
   = 1``; every table in the chain keeps ``non_replicated_deduplication_window``, so a repeat of the same
   unit is dropped by the table *and* by every rollup. ``events`` units go as the records' own bytes
   (JSONEachRow, parsed and checked by ClickHouse: :func:`fast_insert_sql`); a unit that fails those checks,
   and every other table, is converted here and sent with ``insert_arrow`` (same token either way).
4. Records that cannot be converted go to ``events.dlq`` (``error_code = load_error``), flushed. Rows
   ClickHouse refuses (a constraint, :data:`ROW_ERROR_CODES`) are found by bisecting the unit into slices
   with tokens derived from their offsets, and go there too (``error_code = clickhouse_rejected``).
5. **High-water marks**: ``<db>.loader_offsets`` gets ``end`` per partition and topic id; records below
   the mark are never inserted again, whatever the batch boundaries (group reset, new group id). A topic
   recreated under its name has a new id: the old marks do not apply (:func:`choose_marks`).
6. **Commit** ``end`` with empty metadata.

On (re)assignment, a partition whose committed metadata holds an intent has its unit replayed first,
exactly as recorded (a side consumer reads the ranges, even of partitions now owned by another member), so
the insert repeats with the same token and ClickHouse drops whatever already landed.

ClickHouse or Kafka unavailable: the batch is kept and retried with exponential backoff (the group
membership is kept alive by polling paused partitions); nothing is committed until it lands. A rebalance
while retrying abandons the batch: its intent stays in Kafka and whoever owns the partitions replays it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple, TypeVar

import orjson
import pyarrow as pa
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from connectors.clickhouse import client_from_url, redact_url
from connectors.kafka import GroupJoin, TolerantPoll
from connectors.migrate import validate_identifier
from connectors.settings import StartingOffsets
from udfs.dlq import dlq_record
from udfs.timeutil import TimestampError, parse_timestamp_ms

log = logging.getLogger(__name__)

LOAD_ERROR = "load_error"
#: ``error_code`` of a record ClickHouse refused (a constraint, a value the column cannot hold).
CLICKHOUSE_REJECTED = "clickhouse_rejected"
INTENT_PREFIX = "cp1:intent:"
#: Intent of a unit whose topic id is known: ``cp2:intent:<topic id>:<p>:<start>-<end>,...``.
INTENT_V2_PREFIX = "cp2:intent:"
#: Metadata of a batch's final commit when the topic id is known: ``cp2:loaded:<topic id>``.
LOADED_PREFIX = "cp2:loaded:"
#: ClickHouse error codes that mean "these rows cannot go into this table", raised before the block is
#: written (the data is parsed and checked first). Anything else (connection errors, TOO_MANY_PARTS, a
#: missing table or column, an exception in a materialized view, which fires after the source block is
#: written) is retried without limit: bisecting those would dead-letter good rows or double count.
ROW_ERROR_CODES: Mapping[int, str] = {
    6: "CANNOT_PARSE_TEXT",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    38: "CANNOT_PARSE_DATE",
    41: "CANNOT_PARSE_DATETIME",
    72: "CANNOT_PARSE_NUMBER",
    117: "INCORRECT_DATA",
    131: "TOO_LARGE_STRING_SIZE",
    321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    407: "DECIMAL_OVERFLOW",
    469: "VIOLATED_CONSTRAINT",
}
#: Kafka's default ``offset.metadata.max.bytes`` is 4096; stay well below it.
MAX_INTENT_BYTES = 3000
#: Settings of every data insert (see the module docstring).
DEDUP_SETTINGS: dict[str, Any] = {
    "insert_deduplicate": 1,
    "deduplicate_blocks_in_dependent_materialized_views": 1,
}
# DateTime64(3) covers 1900-01-01 .. 2299-12-31.
_MIN_DT64_MS = -2208988800000
_MAX_DT64_MS = 10413791999999
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_DECIMAL_LIMIT = Decimal(10) ** 14  # Decimal(18, 4): 14 integer digits
_FOUR_PLACES = Decimal("0.0001")
_T = TypeVar("_T")


# ================================================================================ record conversion


class ConversionError(ValueError):
    """A record (or one of its fields) cannot become a row of the target table."""


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    raise ConversionError(f"expected a string, got {type(v).__name__}")


def _required_text(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ConversionError("required non-empty string is missing")
    return v


def _ts(v: Any) -> int:
    if v is None:
        raise ConversionError("required timestamp is missing")
    try:
        ms = parse_timestamp_ms(v)
    except TimestampError as exc:
        raise ConversionError(str(exc)) from None
    if not _MIN_DT64_MS <= ms <= _MAX_DT64_MS:
        raise ConversionError(f"timestamp outside ClickHouse DateTime64 range: {v!r}")
    return ms


def _ts_or_none(v: Any) -> int | None:
    return None if v is None else _ts(v)


def _json_text(v: Any) -> str:
    if v is None:
        return "{}"
    if isinstance(v, str):
        return v
    if isinstance(v, dict | list):
        return orjson.dumps(v).decode()
    raise ConversionError(f"expected a JSON object, got {type(v).__name__}")


def _flag(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ConversionError(f"expected a boolean, got {v!r}")


def _count(v: Any, limit: int = _UINT32_MAX) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConversionError(f"expected a non-negative integer, got {v!r}")
    if isinstance(v, float):
        if not v.is_integer():
            raise ConversionError(f"expected an integer, got {v!r}")
        v = int(v)
    if not 0 <= v <= limit:
        raise ConversionError(f"integer out of range: {v!r}")
    return int(v)


def _required_uint64(v: Any) -> int:
    if v is None:
        raise ConversionError("required integer is missing")
    return _count(v, _UINT64_MAX)


def _number(v: Any) -> float:
    if v is None:
        return 0.0
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConversionError(f"expected a number, got {v!r}")
    f = float(v)
    if f != f or f in (float("inf"), float("-inf")):
        raise ConversionError(f"expected a finite number, got {v!r}")
    return f


def _money(v: Any) -> Decimal:
    if v is None:
        return Decimal(0).quantize(_FOUR_PLACES)
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ConversionError(f"expected a decimal amount, got {v!r}")
    try:
        d = Decimal(repr(v) if isinstance(v, float) else str(v)).quantize(_FOUR_PLACES)
    except InvalidOperation:
        raise ConversionError(f"expected a decimal amount, got {v!r}") from None
    if not d.is_finite() or abs(d) >= _DECIMAL_LIMIT:
        raise ConversionError(f"amount out of range for Decimal(18, 4): {v!r}")
    return d


class Column(NamedTuple):
    """One ClickHouse column the loader fills: name, Arrow type, and the JSON-value converter."""

    name: str
    arrow_type: pa.DataType
    convert: Callable[[Any], Any]
    source: str | None = None
    """JSON field the value comes from (default: ``name``)."""


_TS = pa.timestamp("ms", tz="UTC")
_S = pa.string()

#: ``events`` columns filled from an ``events.enriched`` record (plus ``kafka_partition``/``kafka_offset``).
EVENT_COLUMNS: tuple[Column, ...] = (
    Column("message_id", _S, _required_text),
    Column("type", _S, _required_text),
    Column("event", _S, _text),
    Column("anonymous_id", _S, _text),
    Column("user_id", _S, _text),
    Column("previous_id", _S, _text),
    Column("user_key", _S, _required_text),
    Column("timestamp", _TS, _ts),
    Column("sent_at", _TS, _ts_or_none),
    Column("received_at", _TS, _ts),
    Column("ip", _S, _text),
    Column("user_agent", _S, _text),
    Column("page_url", _S, _text),
    Column("page_path", _S, _text),
    Column("page_host", _S, _text),
    Column("page_title", _S, _text),
    Column("referrer", _S, _text),
    Column("locale", _S, _text),
    Column("properties", _S, _json_text),
    Column("traits", _S, _json_text),
    Column("browser", _S, _text),
    Column("browser_version", _S, _text),
    Column("os", _S, _text),
    Column("device_type", _S, _text),
    Column("is_bot", pa.bool_(), _flag),
    Column("country", _S, _text),
    Column("utm_source", _S, _text),
    Column("utm_medium", _S, _text),
    Column("utm_campaign", _S, _text),
    Column("utm_term", _S, _text),
    Column("utm_content", _S, _text),
    Column("click_id_type", _S, _text),
    Column("referrer_type", _S, _text),
    Column("referrer_host", _S, _text),
)

#: ``sessions`` columns filled from a ``sessions`` record. ``retracted`` is ``true`` on the version that
#: withdraws a session (merged into another); absent means false.
SESSION_COLUMNS: tuple[Column, ...] = (
    Column("session_id", _S, _required_text),
    Column("user_key", _S, _text),
    Column("anonymous_id", _S, _text),
    Column("start", _TS, _ts),
    Column("end", _TS, _ts),
    Column("duration_s", pa.float64(), _number),
    Column("events", pa.uint32(), _count),
    Column("page_views", pa.uint32(), _count),
    Column("entry_page", _S, _text),
    Column("exit_page", _S, _text),
    Column("utm_source", _S, _text),
    Column("utm_medium", _S, _text),
    Column("utm_campaign", _S, _text),
    Column("utm_term", _S, _text),
    Column("utm_content", _S, _text),
    Column("referrer_type", _S, _text),
    Column("country", _S, _text),
    Column("device_type", _S, _text),
    Column("is_bounce", pa.bool_(), _flag),
    Column("converted", pa.bool_(), _flag),
    Column("revenue", pa.decimal128(18, 4), _money),
    Column("version", pa.uint64(), _required_uint64),
    Column("retracted", pa.uint8(), lambda v: int(_flag(v))),
)


def _list_length(v: Any) -> int:
    if v is None:
        return 0
    if not isinstance(v, list):
        raise ConversionError(f"expected a list, got {type(v).__name__}")
    return len(v)


#: ``actions`` columns filled from an ``actions`` or ``actions.dlq`` record (``status`` is the topic's, see
#: :data:`ACTIONS` and :data:`ACTIONS_DLQ`); ``events`` is the number of events the action carries.
ACTION_COLUMNS: tuple[Column, ...] = (
    Column("action_id", _S, _required_text),
    Column("rule_id", _S, _required_text),
    Column("user_key", _S, _text),
    Column("fired_at", _TS, _ts),
    Column("event_time", _TS, _ts),
    Column("events", pa.uint32(), _list_length),
    Column("attempts", pa.uint32(), _count),
    Column("last_error", _S, _text),
)

_LINEAGE: tuple[Column, ...] = (
    Column("kafka_partition", pa.uint32(), int),
    Column("kafka_offset", pa.uint64(), int),
)


class Msg(NamedTuple):
    """A Kafka record as the loader needs it (kafka-python's ``ConsumerRecord`` has these attributes)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class TableSpec:
    """A target table and how records become its rows."""

    table: str
    columns: tuple[Column, ...]
    fixed: tuple[tuple[str, pa.DataType, Any], ...] = ()
    """Columns with the same value in every row of this source: ``(name, arrow type, value)``."""

    @property
    def schema(self) -> pa.Schema:
        """Arrow schema of an insert (the loaded columns, the fixed ones, then Kafka lineage)."""
        fixed = [pa.field(name, arrow_type) for name, arrow_type, _ in self.fixed]
        return pa.schema(
            [pa.field(c.name, c.arrow_type) for c in self.columns]
            + fixed
            + [pa.field(c.name, c.arrow_type) for c in _LINEAGE]
        )


EVENTS = TableSpec("events", EVENT_COLUMNS)
SESSIONS = TableSpec("sessions", SESSION_COLUMNS)
#: ``actions`` rows from the ``actions`` topic: what the triggers fired.
ACTIONS = TableSpec("actions", ACTION_COLUMNS, fixed=(("status", _S, "fired"),))
#: ``actions`` rows from ``actions.dlq``: what dispatch gave up on (``attempts``, ``last_error``).
ACTIONS_DLQ = TableSpec("actions", ACTION_COLUMNS, fixed=(("status", _S, "dead_lettered"),))


@dataclass
class Converted:
    """Rows of one insert unit, and the records that could not be converted (with the reason)."""

    table: pa.Table
    rejected: list[tuple[Msg, str]]
    msgs: list[Msg] = field(default_factory=list)
    """The record of each row of ``table``, in row order."""


def convert(spec: TableSpec, msgs: Iterable[Msg]) -> Converted:
    """Parse (orjson) and convert records into an Arrow table matching ``spec``'s ClickHouse columns.

    Records that are not JSON objects or whose fields do not fit their column are returned in
    ``rejected`` (with the first reason) and left out of the table; nothing raises. Works column by
    column (one comprehension per column; a column that raises is redone value by value to find the
    records at fault), which is several times faster in CPython than building rows.
    """
    loads = orjson.loads
    good: list[Msg] = []
    recs: list[dict[str, Any]] = []
    rejected: list[tuple[Msg, str]] = []
    for msg in msgs:
        if msg.value is None:
            rejected.append((msg, "empty record (tombstone)"))
            continue
        try:
            rec = loads(msg.value)
        except orjson.JSONDecodeError as exc:
            rejected.append((msg, f"invalid JSON: {exc}"))
            continue
        if not isinstance(rec, dict):
            rejected.append((msg, "record is not a JSON object"))
            continue
        good.append(msg)
        recs.append(rec)

    bad: dict[int, str] = {}
    columns: list[list[Any]] = []
    for col in spec.columns:
        key = col.source or col.name
        values = [r.get(key) for r in recs]
        fn = col.convert
        try:
            if fn is _text:  # the common case, inlined
                columns.append([v if v.__class__ is str else _text(v) for v in values])
            else:
                columns.append([fn(v) for v in values])
        except ConversionError:
            out: list[Any] = []
            for i, v in enumerate(values):
                try:
                    out.append(fn(v))
                except ConversionError as exc:
                    out.append(None)
                    bad.setdefault(i, f"{col.name}: {exc}")
            columns.append(out)
    columns.extend([value] * len(good) for _, _, value in spec.fixed)
    columns.append([m.partition for m in good])
    columns.append([m.offset for m in good])
    if bad:
        rejected.extend((good[i], reason) for i, reason in sorted(bad.items()))
        keep = [i for i in range(len(good)) if i not in bad]
        columns = [[c[i] for i in keep] for c in columns]
        good = [good[i] for i in keep]
    types = [f.type for f in spec.schema]
    arrays = [pa.array(values, type=t) for values, t in zip(columns, types, strict=True)]
    return Converted(pa.Table.from_arrays(arrays, schema=spec.schema), rejected, good)


# ================================================================================ JSONEachRow fast path
#
# The hot table (``events``) is not converted in Python when it can be helped: the records' bytes go to
# ClickHouse as they are, one JSONEachRow line each (``kafka_partition``/``kafka_offset`` spliced in
# front), and ClickHouse parses, checks and converts them in ``INSERT ... SELECT ... FROM input(...)``.
# The checks are at least as strict as :func:`convert` (a column the SQL cannot judge exactly declines,
# e.g. a string starting with ``{``): any row that fails makes ``throwIf`` (or the parser) refuse the whole
# insert before anything is written, and the unit is then converted by :func:`convert`, which finds the
# records at fault with their reasons (dead-lettered as before). The unit token is the same either way.

#: Largest unit sent through the fast path: one insert block (ClickHouse writes nothing when it refuses).
FAST_MAX_ROWS = 200_000
FAST_MAX_BYTES = 128 * 1024 * 1024
#: Input settings of the fast path: unknown fields ignored, ``null`` = missing, no number or boolean read
#: as text (they fail the insert, :func:`convert` rejects them), objects and arrays read as their JSON
#: text (for ``properties``/``traits``; other text columns starting with ``{``/``[`` decline).
FAST_INPUT_SETTINGS: dict[str, Any] = {
    "input_format_skip_unknown_fields": 1,
    "input_format_null_as_default": 1,
    "input_format_json_read_objects_as_strings": 1,
    "input_format_json_read_arrays_as_strings": 1,
    "input_format_json_read_numbers_as_strings": 0,
    "input_format_json_read_bools_as_strings": 0,
    "input_format_allow_errors_num": 0,
    "input_format_allow_errors_ratio": 0,
    "max_insert_block_size": FAST_MAX_ROWS,
    "min_insert_block_size_rows": FAST_MAX_ROWS,
    "min_insert_block_size_bytes": 2 * FAST_MAX_BYTES,
}
#: The only timestamp text the fast path converts: what the ingest job writes (``format_ms``): UTC
#: (``Z``), years 1900-2299 (DateTime64(3)'s range). Anything else declines to :func:`convert`.
_FAST_TS_RE = (
    r"^(19|2[0-2])[0-9][0-9]-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{3})?Z$"
)


def _fast_text_ok(c: str) -> str:
    return f"isValidUTF8({c}) AND NOT startsWith({c}, '{{') AND NOT startsWith({c}, '[')"


def _fast_ts(c: str) -> tuple[str, str, str]:
    parsed = f"parseDateTime64BestEffortOrNull({c}, 3, 'UTC')"
    ok = f"match({c}, '{_FAST_TS_RE}') AND toDayOfMonth({parsed}) = toUInt8(substring({c}, 9, 2))"
    return "String", ok, f"assumeNotNull({parsed})"


def _fast_column(col: Column) -> tuple[str, str, str] | None:
    """``(input type, check, expression)`` of a column in the fast path, ``None`` if it has none."""
    c = f"`{col.source or col.name}`"
    fn = col.convert
    if fn is _required_text:
        return "String", f"{c} != '' AND {_fast_text_ok(c)}", c
    if fn is _text:
        return "String", _fast_text_ok(c), c
    if fn is _ts:
        return _fast_ts(c)
    if fn is _ts_or_none:
        _t, ok, expr = _fast_ts(f"assumeNotNull({c})")
        return "Nullable(String)", f"({c} IS NULL OR ({ok}))", f"if({c} IS NULL, NULL, {expr})"
    if fn is _json_text:
        return "Nullable(String)", f"isValidUTF8(ifNull({c}, ''))", f"ifNull({c}, '{{}}')"
    if fn is _flag:
        return "Nullable(Bool)", "1", f"ifNull({c}, false)"
    return None


@functools.cache
def fast_insert_sql(spec: TableSpec, database: str) -> str | None:
    """``INSERT INTO <db>.<table> (...) SELECT ... FROM input(...) WHERE throwIf(...) = 0 FORMAT JSONEachRow``
    for ``spec``, or ``None`` when a column has no fast-path conversion (that table keeps :func:`convert`).
    """
    if spec.fixed:
        return None
    parts = [_fast_column(col) for col in spec.columns]
    if any(p is None for p in parts):
        return None
    cols = [*spec.columns, *_LINEAGE]
    done = [p for p in parts if p is not None] + [
        ("UInt32", "1", "`kafka_partition`"),
        ("UInt64", "1", "`kafka_offset`"),
    ]
    structure = ", ".join(f"`{c.source or c.name}` {t}" for c, (t, _ok, _e) in zip(cols, done, strict=True))
    checks = " AND ".join(f"({ok})" for _t, ok, _e in done if ok != "1")
    return (
        f"INSERT INTO {database}.{spec.table} ({', '.join(f'`{c.name}`' for c in cols)}) "
        f"SELECT {', '.join(e for _t, _ok, e in done)} FROM input('{structure}') "
        f"WHERE throwIf(NOT ifNull({checks}, false), "
        "'a record fails the loader checks: convert the unit in Python') = 0 "
        "FORMAT JSONEachRow"
    )


def json_rows(msgs: Sequence[Msg]) -> bytes | None:
    """The records as JSONEachRow lines with ``kafka_partition``/``kafka_offset`` spliced in front, or
    ``None`` when one is not the text of a non-empty JSON object starting with ``{`` (a tombstone, a blank
    before the brace, an array...), names a lineage field itself, or the whole is not UTF-8 (orjson would
    reject it, even in a field ClickHouse skips): such a unit goes to :func:`convert`."""
    lines: list[bytes] = []
    append = lines.append
    for m in msgs:
        v = m.value
        if v is None or v[:1] != b"{" or v[1:2] == b"}" or b'"kafka_' in v:
            return None
        append(b'{"kafka_partition":%d,"kafka_offset":%d,%b' % (m.partition, m.offset, v[1:]))
    body = b"\n".join(lines)
    try:
        body.decode()  # one pass in C over the whole body
    except UnicodeDecodeError:
        return None
    return body


def declines_fast_path(exc: BaseException) -> bool:
    """True when ClickHouse refused a fast-path insert before writing (a parse error, a failed check, any
    server error but one inside a materialized view): convert the unit in Python instead. Connection
    errors (no server error code) are retried; so is an exception in a view, which fires after the block
    was written (see :data:`ROW_ERROR_CODES`)."""
    if not isinstance(exc, ClickHouseError):
        return False
    text = str(exc)
    code = getattr(exc, "code", None)
    if not isinstance(code, int) and re.search(r"\bCode: (\d+)\.", text) is None:
        return False
    return "while pushing to view" not in text


# ================================================================================ rows ClickHouse refuses


class RowsRejected(Exception):
    """ClickHouse refused an insert because of its rows (:data:`ROW_ERROR_CODES`); nothing was written."""

    def __init__(self, code: int, detail: str) -> None:
        """``detail`` is ClickHouse's message (``Code: N. DB::Exception: ... (NAME)``)."""
        super().__init__(detail)
        self.code = code
        self.detail = detail


def rows_rejected(exc: BaseException) -> RowsRejected | None:
    """The :class:`RowsRejected` a ClickHouse error means, or ``None`` when it is not about the rows."""
    if not isinstance(exc, ClickHouseError):
        return None
    text = str(exc)
    match = re.search(r"\bCode: (\d+)\.", text)
    found = getattr(exc, "code", None)
    code = found if isinstance(found, int) else int(match.group(1)) if match else None
    if code is None or code not in ROW_ERROR_CODES or "while pushing to view" in text:
        return None
    # from "Code: N." to the "(version ...)" trailer: the driver adds the server URL around it
    detail = text[match.start() :] if match else text
    return RowsRejected(code, detail.split(" (version ", 1)[0].strip())


def isolate_rejected(
    rows: int, insert: Callable[[int, int], None], first: RowsRejected
) -> list[tuple[int, RowsRejected]]:
    """Find the rows ClickHouse refuses among rows ``[0, rows)``, which failed together with ``first``.

    Bisection: each failing slice is split in two halves and ``insert(lo, hi)`` is called for each (it
    inserts rows ``[lo, hi)`` under a token derived from those rows, or raises :class:`RowsRejected`);
    a failing single row is rejected with its own reason. The same rows are split the same way every
    time, so a replay repeats exactly the same sub-inserts and ClickHouse drops those that landed.
    Returns ``(row index, reason)`` in row order; at most about ``2 * bad * log2(rows)`` inserts.
    """
    out: list[tuple[int, RowsRejected]] = []
    stack: list[tuple[int, int, RowsRejected]] = [(0, rows, first)]
    while stack:
        lo, hi, err = stack.pop()
        if hi - lo <= 1:
            out.append((lo, err))
            continue
        mid = (lo + hi) // 2
        failed: list[tuple[int, int, RowsRejected]] = []
        for a, b in ((lo, mid), (mid, hi)):
            try:
                insert(a, b)
            except RowsRejected as exc:
                failed.append((a, b, exc))
        stack.extend(reversed(failed))
    return sorted(out, key=lambda x: x[0])


# ================================================================================ ranges, tokens, intents


@dataclass(frozen=True, order=True)
class Range:
    """Offsets ``[start, end)`` of one partition in one insert unit."""

    topic: str
    partition: int
    start: int
    end: int


@dataclass(frozen=True)
class Unit:
    """One insert: ranges of one topic into one table, identified by its deduplication token."""

    topic: str
    table: str
    ranges: tuple[Range, ...]
    topic_id: str = ""
    """Kafka's id of the topic incarnation the ranges belong to ('' when unknown, or an intent of cp1)."""

    def token(self, database: str) -> str:
        """``<db>.<table>[@<topic id>]:<topic>:<p>:<start>-<end>[,...]`` (partition order)."""
        return dedup_token(database, self.table, self.ranges, self.topic_id)

    @property
    def intent(self) -> str:
        """Offset-commit metadata recording this unit (see :func:`parse_intent`)."""
        return intent_metadata(self.ranges, self.topic_id)


def dedup_token(database: str, table: str, ranges: Iterable[Range], topic_id: str = "") -> str:
    """The ``insert_deduplication_token`` of an insert covering ``ranges`` (order-independent).

    With the topic id, a recreated topic (offsets from 0 again) never repeats a token of the old one
    that is still in the table's deduplication window.
    """
    parts = ",".join(f"{r.topic}:{r.partition}:{r.start}-{r.end}" for r in sorted(ranges))
    return f"{database}.{table}@{topic_id}:{parts}" if topic_id else f"{database}.{table}:{parts}"


def intent_metadata(ranges: Iterable[Range], topic_id: str = "") -> str:
    """``cp2:intent:<topic id>:<p>:<start>-<end>,...`` (``cp1:intent:...`` without an id), partition order."""
    prefix = f"{INTENT_V2_PREFIX}{topic_id}:" if topic_id else INTENT_PREFIX
    return prefix + ",".join(f"{r.partition}:{r.start}-{r.end}" for r in sorted(ranges))


def loaded_metadata(topic_id: str) -> str:
    """Metadata of a batch's final commit: names the topic incarnation (empty when unknown)."""
    return f"{LOADED_PREFIX}{topic_id}" if topic_id else ""


def metadata_topic_id(metadata: str | None) -> str:
    """The topic id recorded in commit metadata (intent or loaded), '' when there is none."""
    for prefix in (INTENT_V2_PREFIX, LOADED_PREFIX):
        if metadata and metadata.startswith(prefix):
            return metadata[len(prefix) :].partition(":")[0]
    return ""


def parse_intent(topic: str, metadata: str | None) -> tuple[Range, ...] | None:
    """The ranges recorded by :func:`intent_metadata`, or ``None`` when ``metadata`` holds no intent."""
    if not metadata:
        return None
    if metadata.startswith(INTENT_V2_PREFIX):
        body = metadata[len(INTENT_V2_PREFIX) :].partition(":")[2]
    elif metadata.startswith(INTENT_PREFIX):
        body = metadata[len(INTENT_PREFIX) :]
    else:
        return None
    ranges = []
    try:
        for item in body.split(","):
            p, _, span = item.partition(":")
            start, _, end = span.partition("-")
            r = Range(topic, int(p), int(start), int(end))
            if r.start > r.end or r.partition < 0 or r.start < 0:
                raise ValueError(item)
            ranges.append(r)
    except ValueError:
        log.error("ignoring malformed intent metadata on %s: %r", topic, metadata)
        return None
    return tuple(sorted(ranges)) or None


def plan_units(
    ranges: Iterable[Range],
    table_of: Mapping[str, str],
    max_intent_bytes: int = MAX_INTENT_BYTES,
    topic_ids: Mapping[str, str] | None = None,
) -> list[Unit]:
    """Group a batch's ranges into insert units: one per topic, split so each intent fits the limit."""
    by_topic: dict[str, list[Range]] = {}
    for r in sorted(ranges):
        by_topic.setdefault(r.topic, []).append(r)
    units: list[Unit] = []
    for topic, rs in by_topic.items():
        tid = (topic_ids or {}).get(topic, "")
        chunk: list[Range] = []
        for r in rs:
            if chunk and len(intent_metadata([*chunk, r], tid)) > max_intent_bytes:
                units.append(Unit(topic, table_of[topic], tuple(chunk), tid))
                chunk = []
            chunk.append(r)
        units.append(Unit(topic, table_of[topic], tuple(chunk), tid))
    return units


class BatchBuffer:
    """Records polled since the last flush, per partition, with the offset each partition's range starts at.

    ``start_at`` is set when a partition is (re)positioned and advanced by :meth:`take`, so consecutive
    batches tile the offset space without gaps (transaction markers and aborted records included).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Empty buffer; ``clock`` (seconds) measures the age of the oldest buffered record."""
        self.clock = clock
        self.start_at: dict[tuple[str, int], int] = {}
        self.records: dict[tuple[str, int], list[Msg]] = {}
        self.rows = 0
        self.first_at: float | None = None

    def position(self, topic: str, partition: int, offset: int) -> None:
        """The next batch of ``topic``/``partition`` starts at ``offset`` (after a seek)."""
        self.start_at[(topic, partition)] = offset

    def add(self, msgs: Iterable[Msg]) -> None:
        """Append polled records (in partition order)."""
        for m in msgs:
            key = (m.topic, m.partition)
            if key not in self.start_at:
                self.start_at[key] = m.offset
            self.records.setdefault(key, []).append(m)
            self.rows += 1
            if self.first_at is None:
                self.first_at = self.clock()

    def add_partition(self, topic: str, partition: int, msgs: Sequence[Msg]) -> None:
        """Append one partition's polled records (in offset order): one list extension, no per-record
        work. kafka-python's ``ConsumerRecord`` objects are kept as they are (they have :class:`Msg`'s
        attributes)."""
        if not msgs:
            return
        key = (topic, partition)
        if key not in self.start_at:
            self.start_at[key] = msgs[0].offset
        part = self.records.get(key)
        if part is None:
            self.records[key] = list(msgs)
        else:
            part.extend(msgs)
        self.rows += len(msgs)
        if self.first_at is None:
            self.first_at = self.clock()

    def age(self) -> float:
        """Seconds since the oldest buffered record arrived (0 when empty)."""
        return 0.0 if self.first_at is None else self.clock() - self.first_at

    def ready(self, max_rows: int, max_seconds: float) -> bool:
        """True when the buffer should be flushed."""
        return self.rows >= max_rows or (self.rows > 0 and self.age() >= max_seconds)

    def take(self) -> tuple[list[Range], dict[tuple[str, int], list[Msg]]]:
        """Cut a batch: its ranges and records; partitions' next ranges start at these ends."""
        ranges = []
        records = self.records
        for (topic, p), msgs in records.items():
            start = self.start_at[(topic, p)]
            end = msgs[-1].offset + 1
            ranges.append(Range(topic, p, start, end))
            self.start_at[(topic, p)] = end
        self.records = {}
        self.rows = 0
        self.first_at = None
        return sorted(ranges), records

    def clear(self) -> None:
        """Forget everything (after a rebalance the consumer is repositioned from committed offsets)."""
        self.start_at.clear()
        self.records = {}
        self.rows = 0
        self.first_at = None


def choose_marks(
    marks: Mapping[str, Mapping[int, int]], current_id: str, ends: Mapping[int, int]
) -> tuple[dict[int, int], str]:
    """The high-water marks that apply to a topic's current incarnation, and why.

    ``marks`` maps topic id -> partition -> mark ('' = written before ids were recorded, or by a broker
    that gives none); ``ends`` are the partitions' current end offsets. Returns ``(marks, verdict)``:

    * ``"current"``: marks recorded under ``current_id`` apply (without an id, the highest mark of any id:
      recreation cannot be told then, and skipping is the safe side);
    * ``"adopted"``: only '' marks exist and none lies beyond its partition's end: they are taken over
      by the current id (the first start after the upgrade; the caller records them under the id);
    * ``"recreated"``: marks exist only for other ids, or '' marks beyond the end of their partition
      (offsets never shrink, so the topic was recreated): nothing applies, the new topic loads from 0;
    * ``"none"``: no marks at all.
    """
    if not marks:
        return {}, "none"
    if not current_id:
        merged: dict[int, int] = {}
        for per_partition in marks.values():
            for p, m in per_partition.items():
                merged[p] = max(merged.get(p, 0), m)
        return merged, "current"
    if current_id in marks:
        return dict(marks[current_id]), "current"
    legacy = marks.get("", {})
    others = [tid for tid in marks if tid]
    if not others and all(m <= ends.get(p, m) for p, m in legacy.items()):
        return dict(legacy), "adopted"
    return {}, "recreated"


# ================================================================================ the loader


@dataclass(frozen=True)
class LoaderConfig:
    """What the loader needs (``jobs/load.py`` builds it from the job's settings)."""

    bootstrap_servers: str
    clickhouse_url: str
    database: str = "clickpulse"
    events_topic: str = "events.enriched"
    sessions_topic: str = "sessions"
    dlq_topic: str = "events.dlq"
    actions_topic: str = ""
    """``actions`` -> ``actions`` with status ``fired`` ('' = not loaded)."""
    actions_dlq_topic: str = ""
    """``actions.dlq`` -> ``actions`` with status ``dead_lettered`` ('' = not loaded)."""
    group_id: str = "clickpulse-load"
    starting_offsets: StartingOffsets = StartingOffsets.COMMITTED
    batch_max_rows: int = 50_000
    batch_max_seconds: float = 0.25
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    insert_timeout_s: float = 120.0
    log_interval_s: float = 10.0
    session_timeout_ms: int = 10_000
    """Consumer-group session timeout: how long a crashed loader blocks its partitions (min. 6000)."""
    bounded: bool = False
    """Stop once every partition reached the end offsets seen at the first assignment (tests, backfills)."""
    reject_attempts: int = 3
    """Attempts of an insert ClickHouse refuses because of its rows (:data:`ROW_ERROR_CODES`) before the
    batch is bisected to dead-letter the rows at fault."""
    fail_after_inserts: int = 0
    """Test hook: exit the process (status 17) right after the N-th data insert, before anything is
    committed (``CLICKPULSE_LOAD_FAIL_AFTER_INSERT``); 0 = off."""
    kafka_security: Mapping[str, Any] = field(default_factory=dict)
    """TLS/SASL options of every Kafka client of the loader (``Connections.kafka_security_options``)."""
    json_insert: bool = True
    """Send ``events`` records to ClickHouse as JSONEachRow to parse and check (:func:`fast_insert_sql`);
    False: always convert in Python (:func:`convert`) and insert Arrow."""

    def spec_of(self) -> dict[str, TableSpec]:
        """Source topic -> how its records become rows of which table."""
        specs = {self.events_topic: EVENTS, self.sessions_topic: SESSIONS}
        if self.actions_topic:
            specs[self.actions_topic] = ACTIONS
        if self.actions_dlq_topic:
            specs[self.actions_dlq_topic] = ACTIONS_DLQ
        return specs

    def table_of(self) -> dict[str, str]:
        """Topic -> target table."""
        return {topic: spec.table for topic, spec in self.spec_of().items()}

    @property
    def topics(self) -> list[str]:
        """Every source topic."""
        return list(self.spec_of())


@dataclass
class LoaderCounters:
    """What the loader did (the periodic log line; tests and the benchmark read it)."""

    rows: dict[str, int] = field(default_factory=lambda: {EVENTS.table: 0, SESSIONS.table: 0})
    """Rows sent per table (an intent replay sends its rows again; ClickHouse drops the repeat)."""
    batches: int = 0
    inserts: int = 0
    retries: int = 0
    dlq: int = 0
    rejected: int = 0
    """Records ClickHouse refused, isolated by bisection and dead-lettered (also counted in ``dlq``)."""
    recreated: int = 0
    """Topics found recreated (a new topic id): the old incarnation's high-water marks were set aside."""
    skipped_loaded: int = 0
    """Records below the high-water mark (already in ClickHouse), not inserted again."""
    replays: int = 0
    abandoned: int = 0
    lag: int = 0
    fallbacks: int = 0
    """Units the JSONEachRow fast path declined (a record failed its checks): converted in Python."""
    poll_errors: int = 0
    """Polls that failed with a retriable Kafka error (broker away): retried, nothing lost."""

    def line(self) -> str:
        """One-line summary."""
        rows = " ".join(f"{t}={n}" for t, n in self.rows.items())
        return (
            f"rows[{rows}] batches={self.batches} inserts={self.inserts} retries={self.retries} "
            f"dlq={self.dlq} rejected={self.rejected} recreated={self.recreated} "
            f"skipped_loaded={self.skipped_loaded} replays={self.replays} "
            f"abandoned={self.abandoned} lag={self.lag} fallbacks={self.fallbacks} "
            f"poll_errors={self.poll_errors}"
        )


class _Stopping(Exception):
    """Stop was requested while a batch was being retried."""


class _Abandon(Exception):
    """The group rebalanced (or a commit was rejected) while a batch was in flight."""


_RETRYABLE: tuple[type[BaseException], ...] = (ClickHouseError, KafkaError, OSError, TimeoutError)


class Loader:
    """The loader loop. ``run()`` until :meth:`stop` (or, when bounded, until caught up)."""

    def __init__(self, config: LoaderConfig) -> None:
        """Validate the config; connections are made in :meth:`run`."""
        self.cfg = config
        self.db = validate_identifier(config.database)
        self.counters = LoaderCounters()
        self.buffer = BatchBuffer()
        self._stop = threading.Event()
        self._table_of = config.table_of()
        self._spec_of = config.spec_of()
        self.counters.rows = {table: 0 for table in self._table_of.values()}
        self._hwm: dict[tuple[str, int], int] = {}
        self._topic_ids: dict[str, str] = {}
        self._assigned: set[TopicPartition] = set()
        self._seen: set[TopicPartition] = set()
        self._needs_setup = False
        self._rebalanced = False
        self._stop_at: dict[TopicPartition, int] | None = None
        self._consumer: KafkaConsumer | None = None
        self._poll = TolerantPoll("loader")
        self._join: GroupJoin | None = None
        self._producer: KafkaProducer | None = None
        self._client: Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: tuple[list[Unit], Future[None]] | None = None
        self._loop_thread = threading.get_ident()
        self._last_log = time.monotonic()
        self._idle_since = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask the loop to finish (thread- and signal-safe): the current batch completes or is left for the
        next run to replay; nothing is committed that is not loaded."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def run(self) -> LoaderCounters:
        """Consume, load and commit until stopped; returns the counters."""
        cfg = self.cfg
        log.info(
            "loader starting: %s, group %s, ClickHouse %s",
            ", ".join(f"{t} -> {self.db}.{table}" for t, table in self._table_of.items()),
            cfg.group_id, redact_url(cfg.clickhouse_url),
        )  # fmt: skip
        consumer = KafkaConsumer(
            **cfg.kafka_security,
            bootstrap_servers=cfg.bootstrap_servers,
            group_id=cfg.group_id,
            client_id=f"{cfg.group_id}-{os.getpid()}",
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            # kafka-python checks CRC32C in pure Python (~50 us per record, the loader's largest cost);
            # the broker validated them on produce and TCP checksums the transfer.
            check_crcs=False,
            max_poll_records=min(cfg.batch_max_rows, 10_000),
            max_poll_interval_ms=600_000,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=max(1000, cfg.session_timeout_ms // 3),
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._consumer = consumer
        self._loop_thread = threading.get_ident()
        loader = self

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                loader._on_revoked(revoked)

            def on_partitions_assigned(self, assigned: Any) -> None:
                loader._on_assigned(assigned)

        self._join = GroupJoin(consumer, cfg.topics, listener=_Listener())
        try:
            self._join.subscribe()
            self._loop()
            self.counters.lag = self._lag()
        finally:
            self._close()
        log.info("loader stopped: %s", self.counters.line())
        return self.counters

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except Exception:  # closing is best effort
                log.debug("error closing consumer", exc_info=True)
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception:  # closing is best effort
                log.debug("error closing producer", exc_info=True)
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------------ rebalance callbacks
    def _on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        tps = set(revoked)
        log.info("partitions revoked: %s", _fmt_tps(tps))
        self._rebalanced = True
        self._assigned -= tps  # no longer ours: not paused, resumed or counted in the lag
        self.buffer.clear()

    def _on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        tps = set(assigned)
        log.info("partitions assigned: %s", _fmt_tps(tps))
        self._rebalanced = True
        self._assigned = tps
        self._needs_setup = True
        self.buffer.clear()
        if tps and self._consumer is not None:
            self._consumer.pause(*tps)  # nothing is fetched until intents are replayed and positions set

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> None:
        consumer = self._require_consumer()
        assert self._join is not None
        join = self._join
        cfg = self.cfg
        while True:
            if self._inflight is not None and self._inflight[1].done():
                self._finish_flush()
            if self._stop.is_set():
                self._final_flush()
                return
            if self._needs_setup:
                self._finish_flush()  # abandoned (its final commit is refused): the new owner replays it
                try:
                    self._setup_assignment()
                except _Abandon:
                    continue
                except _Stopping:
                    return
            # asked of the consumer itself, the one authority on what it holds (kafka-python once revoked
            # everything and never assigned again: the chaos test in CI)
            join.check(bool(consumer.assignment()))
            if self.buffer.ready(cfg.batch_max_rows, cfg.batch_max_seconds):
                self._flush()
                continue
            if cfg.bounded and self._caught_up():
                log.info("bounded run caught up")
                return
            wait_s = cfg.batch_max_seconds - self.buffer.age() if self.buffer.rows else cfg.batch_max_seconds
            polled = self._poll(
                consumer,
                int(max(0.01, min(wait_s, 0.5)) * 1000),
                max_records=max(1, cfg.batch_max_rows - self.buffer.rows),
            )
            self.counters.poll_errors = self._poll.errors
            if self._needs_setup:
                continue  # a rebalance happened inside poll; anything returned belongs to the old assignment
            n = 0
            for tp, tp_records in polled.items():
                self.buffer.add_partition(tp.topic, tp.partition, tp_records)
                n += len(tp_records)
            if n:
                self._idle_since = time.monotonic()
            self._maybe_log()

    def _final_flush(self) -> None:
        self._finish_flush()
        if self.buffer.rows and not self._needs_setup:
            log.info("stopping: flushing %d buffered records", self.buffer.rows)
            self._flush()
            self._finish_flush()

    def _caught_up(self) -> bool:
        if self._stop_at is None or self.buffer.rows or self._inflight is not None:
            return False
        consumer = self._require_consumer()
        for tp, end in self._stop_at.items():
            if tp in self._assigned and consumer.position(tp) < end:
                # transaction markers can leave the position one short of the end: accept when idle
                if time.monotonic() - self._idle_since < max(5.0, 3 * self.cfg.batch_max_seconds):
                    return False
        return True

    def _maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log < self.cfg.log_interval_s:
            return
        self._last_log = now
        self.counters.lag = self._lag()
        log.info("load: %s", self.counters.line())

    def _lag(self) -> int:
        """Records behind the high watermarks of the partitions this process holds (for the log line).

        During a rebalance (e.g. the broker restarting) the consumer may already have dropped a partition
        our bookkeeping still lists: such a partition is skipped, never an error.
        """
        consumer = self._consumer
        if consumer is None:
            return 0
        lag = 0
        for tp in list(self._assigned):
            try:
                hw = consumer.highwater(tp)
                pos = consumer.position(tp, timeout_ms=0) if hw is not None else None
            except KafkaError:  # IllegalStateError: not assigned (any more)
                continue
            if hw is not None and pos is not None:
                lag += max(0, hw - pos)
        return lag

    # ------------------------------------------------------------------ assignment: intents, positions
    def _setup_assignment(self) -> None:
        consumer = self._require_consumer()
        self._needs_setup = False
        self._rebalanced = False
        tps = set(self._assigned)
        self.buffer.clear()
        if not tps:
            return
        self._retry("read topic ids", self._load_topic_ids)
        ends: dict[TopicPartition, int] = self._retry("read end offsets", self._end_offsets)
        self._retry("read high-water marks", lambda: self._load_hwm(ends))
        committed = self._retry(
            "read committed offsets", lambda: {tp: consumer.committed(tp, metadata=True) for tp in tps}
        )
        intents: dict[tuple[str, tuple[Range, ...], str], None] = {}
        for tp, om in list(committed.items()):
            meta = om.metadata if om is not None else None
            recorded, current = metadata_topic_id(meta), self._topic_ids.get(tp.topic, "")
            if recorded and current and recorded != current:
                log.warning(
                    "%s[%d]: committed offset %s belongs to an earlier incarnation of the topic (id %s, now "
                    "%s): ignored", tp.topic, tp.partition, om.offset if om else None, recorded, current,
                )  # fmt: skip
                committed[tp] = None
                continue
            ranges = parse_intent(tp.topic, meta)
            if ranges is not None:
                intents[(tp.topic, ranges, recorded)] = None
        replayed_to: dict[TopicPartition, int] = {}
        for topic, ranges, topic_id in intents:
            self._replay(Unit(topic, self._table_of[topic], ranges, topic_id), tps)
            for r in ranges:
                tp = TopicPartition(r.topic, r.partition)
                if tp in tps:
                    replayed_to[tp] = r.end
        first_time = tps - self._seen
        for tp in sorted(tps):
            om = committed.get(tp)
            if tp in replayed_to:
                consumer.seek(tp, replayed_to[tp])
            elif tp in first_time and self.cfg.starting_offsets is StartingOffsets.EARLIEST:
                consumer.seek_to_beginning(tp)
            elif tp in first_time and self.cfg.starting_offsets is StartingOffsets.LATEST:
                consumer.seek_to_end(tp)
            elif om is not None and om.offset >= 0:
                consumer.seek(tp, om.offset)
            else:
                consumer.seek_to_beginning(tp)
            self.buffer.position(tp.topic, tp.partition, consumer.position(tp))
        self._seen |= tps
        if self.cfg.bounded and self._stop_at is None:
            self._stop_at = dict(consumer.end_offsets(list(tps)))
        if self._needs_setup or self._rebalanced:
            raise _Abandon
        consumer.resume(*tps)
        self._idle_since = time.monotonic()
        log.info(
            "positions: %s",
            ", ".join(f"{tp.topic}[{tp.partition}]@{consumer.position(tp)}" for tp in sorted(tps)),
        )

    def _replay(self, unit: Unit, owned: set[TopicPartition]) -> None:
        """Insert an intent's unit again, exactly as recorded; commit the owned partitions at its ends."""
        log.info("replaying intent %s", unit.token(self.db))
        msgs = self._retry("read intent ranges", lambda: self._read_ranges(unit.ranges))
        self._load_units([unit], _group(msgs))
        commits = {
            TopicPartition(r.topic, r.partition): OffsetAndMetadata(r.end, loaded_metadata(unit.topic_id), -1)
            for r in unit.ranges
            if TopicPartition(r.topic, r.partition) in owned
        }
        self._commit(commits)
        self.counters.replays += 1

    def _read_ranges(self, ranges: Sequence[Range]) -> list[Msg]:
        """Read exactly ``ranges`` with a group-less consumer (works for partitions owned by others)."""
        side = KafkaConsumer(
            **self.cfg.kafka_security,
            bootstrap_servers=self.cfg.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            check_crcs=False,
        )
        try:
            want = {TopicPartition(r.topic, r.partition): r for r in ranges if r.end > r.start}
            side.assign(list(want))
            for tp, r in want.items():
                side.seek(tp, r.start)
            out: list[Msg] = []
            pending = set(want)
            deadline = time.monotonic() + 120
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not read intent ranges {sorted(want.values())}")
                for tp, recs in side.poll(timeout_ms=500).items():
                    end = want[tp].end
                    out.extend(
                        Msg(x.topic, x.partition, x.offset, x.key, x.value) for x in recs if x.offset < end
                    )
                for tp in list(pending):
                    pos = side.position(tp)
                    if pos is not None and pos >= want[tp].end:
                        pending.discard(tp)
                        side.pause(tp)
            return out
        finally:
            side.close()

    # ------------------------------------------------------------------ flush
    def _flush(self) -> None:
        """Cut a batch and commit its intents, then load it on the insert thread (:meth:`_finish_flush`
        completes it). The previous batch is finished first: batches are committed strictly in order (a
        later intent must never be overwritten by an earlier batch's final commit). While a batch loads,
        the loop keeps polling the next one, so Kafka parsing overlaps ClickHouse's insert."""
        self._finish_flush()
        if self._needs_setup:
            return
        ranges, records = self.buffer.take()
        if not ranges:
            return
        units = plan_units(ranges, self._table_of, topic_ids=self._topic_ids)
        try:
            intents = {
                TopicPartition(r.topic, r.partition): OffsetAndMetadata(r.start, u.intent, -1)
                for u in units
                for r in u.ranges
            }
            self._commit(intents)
        except (_Abandon, _Stopping) as exc:
            self._give_up(exc)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader-insert")
        self._inflight = (units, self._pool.submit(self._load_units, units, records))

    def _finish_flush(self) -> None:
        """Wait for the batch in flight (polling with every partition paused, as while retrying), then
        commit its ends."""
        if self._inflight is None:
            return
        units, done = self._inflight
        try:
            while not done.done():
                if self._stop.is_set():
                    wait_futures([done])
                    break
                self._idle(0.2)
        except (_Abandon, _Stopping):
            wait_futures([done])  # the insert thread notices the rebalance / stop and returns
        self._inflight = None
        try:
            done.result()
            self._commit(
                {
                    TopicPartition(r.topic, r.partition): OffsetAndMetadata(
                        r.end, loaded_metadata(u.topic_id), -1
                    )
                    for u in units
                    for r in u.ranges
                }
            )
        except (_Abandon, _Stopping) as exc:
            self._give_up(exc)
            return
        self.counters.batches += 1
        self._idle_since = time.monotonic()  # a slow batch (retries, bisection) is not idleness
        self._maybe_log()

    def _give_up(self, exc: BaseException) -> None:
        if isinstance(exc, _Abandon):
            self.counters.abandoned += 1
            log.warning("batch abandoned after a rebalance; its intent will be replayed by the new owner")
        else:
            log.warning("stopped while retrying; the batch will be replayed on the next start")
        self._needs_setup = True

    def _load_units(self, units: Sequence[Unit], records: Mapping[tuple[str, int], list[Msg]]) -> None:
        """Insert each unit (token), send its rejects to the DLQ, then record the high-water marks."""
        dlq: list[tuple[Msg, str, str]] = []
        for unit in units:
            msgs: list[Msg] = []
            for r in unit.ranges:
                floor = max(self._hwm.get((r.topic, r.partition), 0), r.start)
                part = records.get((r.topic, r.partition), [])
                keep = [m for m in part if floor <= m.offset < r.end]
                self.counters.skipped_loaded += len(part) - len(keep)
                msgs.extend(keep)
            if not msgs:
                continue
            spec = self._spec_of[unit.topic]
            if self.cfg.json_insert and self._insert_fast(spec, msgs, unit.token(self.db)):
                continue
            converted = convert(spec, msgs)
            dlq.extend((m, LOAD_ERROR, detail) for m, detail in converted.rejected)
            if converted.table.num_rows:
                for i, why in self._insert_unit(spec, converted.table, unit.token(self.db)):
                    m = converted.msgs[i]
                    log.warning(
                        "ClickHouse rejected %s[%d]@%d, dead-lettered: %s",
                        m.topic,
                        m.partition,
                        m.offset,
                        why.detail,
                    )
                    dlq.append((m, CLICKHOUSE_REJECTED, why.detail))
                    self.counters.rejected += 1
        if dlq:
            self._retry("write events.dlq", lambda: self._send_dlq(dlq))
            self.counters.dlq += len(dlq)
        marks = [r for u in units for r in u.ranges if r.end > self._hwm.get((r.topic, r.partition), 0)]
        if marks:
            self._retry("write high-water marks", lambda: self._write_hwm(marks))

    # ------------------------------------------------------------------ I/O
    def _ch(self) -> Client:
        if self._client is None:
            self._client = client_from_url(
                self.cfg.clickhouse_url,
                database=self.db,
                autogenerate_session_id=False,
                connect_timeout=5,
                send_receive_timeout=int(self.cfg.insert_timeout_s),
            )
        return self._client

    def _insert_unit(self, spec: TableSpec, table: pa.Table, token: str) -> list[tuple[int, RowsRejected]]:
        """Insert a unit's rows; the rows ClickHouse refuses (after ``reject_attempts``) are returned.

        Unavailability is retried without limit. A refusal (:data:`ROW_ERROR_CODES`) is retried a few times,
        then the rows are bisected (:func:`isolate_rejected`): each slice goes in under
        ``<unit token>|<p>:<offset>..<p>:<offset>`` (its first and last record), so a replay after a crash
        splits the same way, repeats the same tokens, and ClickHouse drops what already landed.
        """
        delay = self.cfg.retry_initial_s
        attempt = 0
        while True:
            try:
                self._insert_counted(spec, table, token)
                return []
            except RowsRejected as exc:
                attempt += 1
                if attempt >= self.cfg.reject_attempts:
                    first = exc
                    break
                self.counters.retries += 1
                log.warning(
                    "insert into %s refused (attempt %d of %d, retrying in %.1fs): %s",
                    spec.table, attempt, self.cfg.reject_attempts, delay, exc.detail[:300],
                )  # fmt: skip
            if self._stop.is_set():
                raise _Stopping
            self._idle(delay)
            delay = min(delay * 2, self.cfg.retry_max_s)
        log.warning(
            "insert into %s refused %d times (%s): bisecting its %d rows to find the rows at fault",
            spec.table, attempt, first.detail[:300], table.num_rows,
        )  # fmt: skip
        partitions = table.column("kafka_partition").to_pylist()
        offsets = table.column("kafka_offset").to_pylist()

        def insert(lo: int, hi: int) -> None:
            last = hi - 1
            sub = f"{token}|{partitions[lo]}:{offsets[lo]}..{partitions[last]}:{offsets[last]}"
            self._insert_counted(spec, table.slice(lo, hi - lo), sub)

        return isolate_rejected(table.num_rows, insert, first)

    def _insert_fast(self, spec: TableSpec, msgs: Sequence[Msg], token: str) -> bool:
        """Insert a unit's records through the JSONEachRow fast path; False when it does not apply or
        ClickHouse refused it (nothing written: the caller converts the unit in Python)."""
        sql = fast_insert_sql(spec, self.db)
        if sql is None or len(msgs) > FAST_MAX_ROWS:
            return False
        body = json_rows(msgs)
        if body is None or len(body) > FAST_MAX_BYTES:
            self.counters.fallbacks += 1
            return False
        settings = {**FAST_INPUT_SETTINGS, **DEDUP_SETTINGS, "insert_deduplication_token": token}

        def insert() -> bool:
            try:
                self._ch().command(sql, data=body, settings=settings)
            except ClickHouseError as exc:
                if declines_fast_path(exc):
                    log.info(
                        "fast insert into %s declined (%s): converting the unit's %d records in Python",
                        spec.table, _short(exc), len(msgs),
                    )  # fmt: skip
                    return False
                raise
            return True

        if not self._retry(f"insert into {spec.table}", insert):
            self.counters.fallbacks += 1
            return False
        self._count_insert(spec, len(msgs))
        return True

    def _insert_counted(self, spec: TableSpec, table: pa.Table, token: str) -> None:
        """One insert (unavailability retried without limit; :class:`RowsRejected` raised), counted."""
        self._retry(f"insert into {spec.table}", functools.partial(self._insert, spec, table, token))
        self._count_insert(spec, table.num_rows)

    def _count_insert(self, spec: TableSpec, rows: int) -> None:
        self.counters.inserts += 1
        self.counters.rows[spec.table] += rows
        if self.cfg.fail_after_inserts and self.counters.inserts >= self.cfg.fail_after_inserts:
            log.error("CLICKPULSE_LOADER_FAIL_AFTER_INSERT reached: exiting before commit (test hook)")
            logging.shutdown()
            os._exit(17)

    def _insert(self, spec: TableSpec, table: pa.Table, token: str) -> None:
        try:
            self._ch().insert_arrow(
                spec.table,
                table,
                database=self.db,
                settings={**DEDUP_SETTINGS, "insert_deduplication_token": token},
            )
        except ClickHouseError as exc:
            rejected = rows_rejected(exc)
            if rejected is not None:
                raise rejected from exc
            raise

    def _end_offsets(self) -> dict[TopicPartition, int]:
        """End offsets of every partition of the source topics (not only the assigned ones)."""
        consumer = self._require_consumer()
        tps = [
            TopicPartition(t, p)
            for t in self.cfg.topics
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        return dict(consumer.end_offsets(tps)) if tps else {}

    def _load_topic_ids(self) -> None:
        """Kafka's id of each source topic (KIP-516), '' where the broker does not tell."""
        from connectors.kafka import topic_ids

        names = self.cfg.topics
        self._topic_ids = {
            t: i
            for t, i in topic_ids(self.cfg.bootstrap_servers, names, **self.cfg.kafka_security).items()
            if i
        }

    def _load_hwm(self, ends: Mapping[TopicPartition, int]) -> None:
        """The marks of each topic's current incarnation (see :func:`choose_marks`)."""
        rows = (
            self._ch()
            .query(
                f"SELECT topic, topic_id, partition, max(end_offset) FROM {self.db}.loader_offsets "
                "WHERE topic IN {topics:Array(String)} GROUP BY topic, topic_id, partition",
                parameters={"topics": self.cfg.topics},
            )
            .result_rows
        )
        marks: dict[str, dict[str, dict[int, int]]] = {}
        for t, tid, p, e in rows:
            marks.setdefault(str(t), {}).setdefault(str(tid), {})[int(p)] = int(e)
        hwm: dict[tuple[str, int], int] = {}
        for topic in self.cfg.topics:
            current = self._topic_ids.get(topic, "")
            topic_ends = {tp.partition: e for tp, e in ends.items() if tp.topic == topic}
            chosen, verdict = choose_marks(marks.get(topic, {}), current, topic_ends)
            if verdict == "recreated":
                self.counters.recreated += 1
                log.warning(
                    "topic %s was recreated (id now %s, marks of ids %s): its earlier high-water marks do "
                    "not apply and are set aside", topic, current, sorted(marks[topic]),
                )  # fmt: skip
            elif verdict == "adopted":
                log.info(
                    "topic %s: marks written before topic ids were recorded adopted for id %s", topic, current
                )
                ranges = [Range(topic, p, e, e) for p, e in sorted(chosen.items())]
                self._ch().insert(
                    "loader_offsets",
                    [[r.topic, current, r.partition, r.end, self._table_of[topic]] for r in ranges],
                    database=self.db,
                    column_names=["topic", "topic_id", "partition", "end_offset", "loaded_table"],
                )
            hwm.update({(topic, p): e for p, e in chosen.items()})
        self._hwm = hwm

    def _write_hwm(self, ranges: Sequence[Range]) -> None:
        self._ch().insert(
            "loader_offsets",
            [
                [r.topic, self._topic_ids.get(r.topic, ""), r.partition, r.end, self._table_of[r.topic]]
                for r in ranges
            ],
            database=self.db,
            column_names=["topic", "topic_id", "partition", "end_offset", "loaded_table"],
        )
        for r in ranges:
            key = (r.topic, r.partition)
            self._hwm[key] = max(self._hwm.get(key, 0), r.end)

    def _send_dlq(self, rejected: Sequence[tuple[Msg, str, str]]) -> None:
        if self._producer is None:
            from connectors.kafka import producer

            self._producer = producer(
                self.cfg.bootstrap_servers, client_id=f"{self.cfg.group_id}-dlq", **self.cfg.kafka_security
            )
        now_ms = int(time.time() * 1000)
        futures = [
            self._producer.send(
                self.cfg.dlq_topic,
                key=msg.key,
                value=dlq_record(
                    msg.value,
                    error_code=code,
                    error_detail=detail[:1000],
                    source_topic=msg.topic,
                    partition=msg.partition,
                    offset=msg.offset,
                    received_at_ms=now_ms,
                ),
            )
            for msg, code, detail in rejected
        ]
        self._producer.flush(timeout=30)
        for f in futures:
            f.get(timeout=30)
        log.warning("sent %d records to %s (%s)", len(rejected), self.cfg.dlq_topic, rejected[0][2])

    def _commit(self, offsets: Mapping[TopicPartition, OffsetAndMetadata]) -> None:
        if not offsets:
            return
        consumer = self._require_consumer()
        if self._rebalanced and self._needs_setup:
            raise _Abandon

        def commit() -> None:
            try:
                consumer.commit(dict(offsets))
            except CommitFailedError as exc:
                raise _Abandon from exc

        self._retry("commit offsets", commit)

    # ------------------------------------------------------------------ retries
    def _retry(self, what: str, fn: Callable[[], _T]) -> _T:
        delay = self.cfg.retry_initial_s
        attempt = 0
        while True:
            try:
                return fn()
            except _RETRYABLE as exc:
                attempt += 1
                self.counters.retries += 1
                level = logging.WARNING if attempt == 1 or attempt % 10 == 0 else logging.DEBUG
                log.log(
                    level, "%s failed (attempt %d, retrying in %.1fs): %s", what, attempt, delay, _short(exc)
                )
                if what.startswith("insert") and self._client is not None and attempt % 5 == 0:
                    self._client.close()  # start from a fresh connection pool now and then
                    self._client = None
            if self._stop.is_set():
                raise _Stopping
            self._idle(delay)
            delay = min(delay * 2, self.cfg.retry_max_s)

    def _idle(self, seconds: float) -> None:
        """Wait while keeping the group membership alive (poll with every partition paused).

        On the insert thread only wait: the consumer belongs to the loop's thread, which polls meanwhile;
        a rebalance it saw abandons the batch here too."""
        consumer = self._consumer
        if threading.get_ident() != self._loop_thread:
            self._stop.wait(seconds)
            if self._rebalanced and self._needs_setup:
                raise _Abandon
            return
        if consumer is None or not self._assigned:
            self._stop.wait(seconds)
            return
        deadline = time.monotonic() + seconds
        paused = set(consumer.paused())
        consumer.pause(*self._assigned)
        try:
            while not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    consumer.poll(timeout_ms=int(min(left, 0.5) * 1000))
                except KafkaError as exc:
                    log.debug("poll while idle failed: %s", exc)
                    self._stop.wait(min(left, 0.5))
                if self._rebalanced and self._needs_setup:
                    raise _Abandon
        finally:
            if not self._needs_setup:
                resume = [tp for tp in self._assigned if tp not in paused]
                if resume:
                    consumer.resume(*resume)

    def _require_consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("loader is not running")
        return self._consumer


def _group(msgs: Iterable[Msg]) -> dict[tuple[str, int], list[Msg]]:
    out: dict[tuple[str, int], list[Msg]] = {}
    for m in msgs:
        out.setdefault((m.topic, m.partition), []).append(m)
    return out


def _fmt_tps(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
