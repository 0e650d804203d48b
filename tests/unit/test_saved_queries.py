"""Saved queries (sql/queries): parameters declared and typed, defaults bind, no value ever in the SQL."""

from __future__ import annotations

import ast
import re
from datetime import date
from pathlib import Path

import pytest

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
    from connectors.dashboard.app import PANELS

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
