"""The dashboard's request parameters and JSON values, without ClickHouse."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from connectors.dashboard.app import PANELS, BadRequest, json_value, request_params
from connectors.query import load_query

pytestmark = pytest.mark.unit

NOW_MS = int(datetime(2026, 11, 22, 20, 0, tzinfo=UTC).timestamp() * 1000)
PANEL = {p.name: p for p in PANELS}


def test_every_panel_binds_with_no_request_parameters() -> None:
    for p in PANELS:
        given = request_params(p, {}, now_ms=NOW_MS)
        query = load_query(p.query)
        if "now_ms" not in query.types:
            given.pop("now_ms", None)
        assert set(query.bind(given)) == set(query.types), p.name


def test_range_defaults_and_values() -> None:
    p = PANEL["history/top_pages"]
    assert request_params(p, {}, now_ms=NOW_MS) == {
        "limit": 10,
        "date_from": date(2026, 10, 23),
        "date_to": date(2026, 11, 22),
    }
    got = request_params(p, {"from": "2026-11-01", "to": "2026-11-02"}, now_ms=NOW_MS)
    assert (got["date_from"], got["date_to"]) == (date(2026, 11, 1), date(2026, 11, 2))
    live = request_params(PANEL["live/top_pages"], {}, now_ms=NOW_MS)
    assert live == {"window_s": 300, "limit": 10, "now_ms": NOW_MS}


def test_funnel_steps() -> None:
    p = PANEL["history/funnel"]
    got = request_params(p, {"steps": " A , B,,C ", "window_s": "60"}, now_ms=NOW_MS)
    assert got["steps"] == ["A", "B", "C"] and got["window_s"] == 60


@pytest.mark.parametrize(
    ("panel", "query"),
    [
        ("history/top_pages", {"from": "last week"}),
        ("history/top_pages", {"from": "2026-11-02", "to": "2026-11-01"}),
        ("history/top_pages", {"from": "2020-01-01", "to": "2026-01-01"}),
        ("history/top_pages", {"limit": "1000"}),
        ("live/feed_events", {"limit": "1000"}),
        ("history/funnel", {"steps": ","}),
        ("history/funnel", {"steps": "a,b,c,d,e,f,g"}),
        ("history/funnel", {"steps": "x" * 201}),
        ("history/funnel", {"window_s": "0"}),
        ("history/funnel", {"window_s": "1e3"}),
    ],
)
def test_bad_parameters(panel: str, query: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        request_params(PANEL[panel], query, now_ms=NOW_MS)


def test_json_values() -> None:
    assert json_value(datetime(2026, 11, 22, 19, 59, 30)) == "2026-11-22T19:59:30.000Z"
    assert json_value(datetime(2026, 11, 22, 19, 59, 30, 123000, tzinfo=UTC)) == "2026-11-22T19:59:30.123Z"
    assert json_value(date(2026, 11, 22)) == "2026-11-22"
    assert json_value(Decimal("129.9900")) == 129.99
    assert json_value(float("nan")) is None
    assert json_value([b"x", (1, 2)]) == ["x", [1, 2]]
