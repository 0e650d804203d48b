"""Saved queries (sql/queries): parameters declared and typed, defaults bind, no value ever in the SQL."""

from __future__ import annotations

import ast
import re
from datetime import date
from pathlib import Path

import pytest

from connectors.dashboard.app import PANELS
from connectors.query import (
    QueryParamError,
    SavedQuery,
    load_query,
    param_value,
    parse_param_args,
    resolve_query,
    saved_queries,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TODAY = date(2026, 12, 6)


@pytest.mark.parametrize("name", saved_queries())
def test_every_saved_query_binds_its_defaults(name: str) -> None:
    q = load_query(name)
    assert q.types, f"{name} takes no parameters"
    bound = q.bind({}, today=TODAY, now_ms=1_765_000_000_000)
    assert set(bound) == set(q.types)
    # tables are unqualified: the database comes from the settings, never from the file
    assert not re.search(r"\bclickpulse\.", q.sql)


def test_dashboard_queries_exist() -> None:
    assert {p.query for p in PANELS} <= set(saved_queries())


def test_types_and_defaults() -> None:
    q = load_query("funnel")
    assert q.types == {
        "window_s": "UInt32",
        "steps": "Array(String)",
        "date_from": "Date",
        "date_to": "Date",
    }
    bound = q.bind({"steps": "Signed Up, Order Completed", "date_from": "2026-11-01"}, today=TODAY)
    assert bound == {
        "window_s": 86400,
        "steps": ["Signed Up", "Order Completed"],
        "date_from": date(2026, 11, 1),
        "date_to": TODAY,
    }


@pytest.mark.parametrize(
    ("ch_type", "text", "value"),
    [
        ("Date", "today-30", date(2026, 11, 6)),
        ("Date", "today", TODAY),
        ("Date", "today+1", date(2026, 12, 7)),
        ("UInt16", "10", 10),
        ("Int64", "-5", -5),
        ("Int64", "now", 42),
        ("String", "a'; DROP TABLE events; --", "a'; DROP TABLE events; --"),
        ("LowCardinality(String)", "x", "x"),
        ("Array(String)", "", []),
        ("DateTime64(3)", "2026-01-01 00:00:00", "2026-01-01 00:00:00"),
    ],
)
def test_param_value(ch_type: str, text: str, value: object) -> None:
    assert param_value(ch_type, text, today=TODAY, now_ms=42) == value


@pytest.mark.parametrize(
    ("ch_type", "text"), [("Date", "yesterday"), ("UInt16", "70000"), ("UInt8", "-1"), ("Int32", "1.5")]
)
def test_param_value_refuses(ch_type: str, text: str) -> None:
    with pytest.raises(QueryParamError):
        param_value(ch_type, text, today=TODAY)


def test_unknown_and_missing_parameters() -> None:
    q = SavedQuery.parse("q", "SELECT {a:UInt8} + {b:UInt8}\n-- param a = 1\n")
    with pytest.raises(QueryParamError, match="needs a value"):
        q.bind({})
    with pytest.raises(QueryParamError, match="unknown parameter c"):
        q.bind({"b": "2", "c": "3"})
    assert q.bind({"b": "2"}) == {"a": 1, "b": 2}
    with pytest.raises(QueryParamError, match="used as UInt8 and as String"):
        SavedQuery.parse("q", "SELECT {a:UInt8}, {a:String}")
    with pytest.raises(QueryParamError, match="does not use"):
        SavedQuery.parse("q", "SELECT 1\n-- param a = 1\n")


def test_user_input_never_reaches_the_sql_text() -> None:
    hostile = "x' OR 1=1 --"
    q = load_query("funnel")
    bound = q.bind({"steps": hostile}, today=TODAY)
    assert bound["steps"] == [hostile] and hostile not in q.sql


def test_param_args_and_resolution(tmp_path: Path) -> None:
    assert parse_param_args(["a=1", "b=x=y", "a=2"]) == {"a": "2", "b": "x=y"}
    with pytest.raises(QueryParamError):
        parse_param_args(["novalue"])
    assert resolve_query("funnel") == (load_query("funnel"), True)
    f = tmp_path / "mine.sql"
    f.write_text("SELECT {n:UInt8}")
    q, saved = resolve_query(str(f))
    assert not saved and q.types == {"n": "UInt8"}
    q, saved = resolve_query("SELECT 1")
    assert not saved and q.sql == "SELECT 1" and not q.types
    with pytest.raises(QueryParamError):
        load_query("../etc/passwd")


def test_dashboard_code_builds_no_sql() -> None:
    """Every statement of the dashboard is a saved query file: its code holds no SQL text, and no string
    it builds at runtime (f-string, %, .format) goes to ClickHouse."""
    for path in sorted((REPO / "connectors" / "dashboard").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not re.search(r"\b(SELECT|INSERT|ALTER|DROP|CREATE)\s", node.value), (
                    f"{path.name}: SQL text in code: {node.value[:60]!r}"
                )


def _code(sql: str) -> str:
    """``sql`` without its comment lines."""
    return "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--")).strip()


def _where(sql: str) -> str:
    """The code of ``sql`` from its first WHERE on ("" without one)."""
    code = _code(sql)
    return code[code.find("WHERE") :] if "WHERE" in code else ""


@pytest.mark.parametrize("name", sorted(p.query for p in PANELS if p.kind == "live"))
def test_live_panels_select_by_arrival_time(name: str) -> None:
    """Live is what just arrived: the live panels filter on received_at (or read the per-arrival-minute
    rollups of sql/0011), never on event time, so late, replayed and clock-skewed events show up at once."""
    q = load_query(name)
    where = _where(q.sql)
    if name == "live_feed_actions":  # trigger fires: fired_at is the triggers' wall clock, an arrival too
        assert "timestamp" not in q.sql and "event_time" not in q.sql
        return
    assert where, f"{name} has no WHERE"
    assert not re.search(r"\btimestamp\b", where), f"{name} filters on event time"
    reads_events = re.search(r"\bFROM\s+events\b", q.sql)
    if reads_events:
        assert re.search(r"\breceived_at\s*>", where), f"{name} does not filter on received_at"
    else:
        assert re.search(r"\bFROM\s+(page_)?arrivals_per_minute_agg\b", q.sql), (
            f"{name} reads an event-time rollup"
        )


def test_live_arrival_migration_indexes_received_at_and_keeps_rollups_exactly_once() -> None:
    """The migration the live queries rely on: a skip index on events.received_at, arrival rollups with a
    dedup window (the loader's tokens), chained `<rollup>_mv TO <rollup>` with GROUP BY = ORDER BY."""
    from connectors.migrate import discover, split_statements

    migration = next(m for m in discover() if m.name == "0011_live_arrivals")
    statements = [_code(s) for s in split_statements(migration.text)]
    assert any(
        re.search(r"ADD INDEX IF NOT EXISTS idx_received_at received_at TYPE minmax", s) for s in statements
    )
    tables = [s for s in statements if s.startswith("CREATE TABLE")]
    views = [s for s in statements if s.startswith("CREATE MATERIALIZED VIEW")]
    assert len(tables) == len(views) == 2
    for table in tables:
        name = re.search(r"\{db\}\.(\w+)", table).group(1)  # type: ignore[union-attr]
        assert "IF NOT EXISTS" in table and "non_replicated_deduplication_window" in table, name
        order_by = re.search(r"ORDER BY \(([^)]*)\)", table).group(1)  # type: ignore[union-attr]
        view = next(v for v in views if f"TO {{db}}.{name} " in v)
        assert f"{{db}}.{name}_mv TO" in view and "toStartOfMinute(received_at) AS minute" in view
        group_by = re.search(r"GROUP BY (.*)$", view.strip()).group(1)  # type: ignore[union-attr]
        assert group_by.replace(" ", "") == order_by.replace(" ", ""), name
