"""The dashboard against the stack's ClickHouse endpoint: known rows in a database of this test, every JSON
endpoint of a running app asserted to exact values, as the stack's read-only user; that user cannot write;
the stack's own dashboard answers; the loader loads ``actions`` and ``actions.dlq`` exactly once."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from clickhouse_connect.driver.exceptions import DatabaseError
from kafka import KafkaProducer
from rich.console import Console

from connectors.clickhouse import client_from_url
from connectors.dashboard.app import create_app
from connectors.dashboard.settings import DashboardSettings
from connectors.loader import Loader, LoaderConfig, StartingOffsets
from connectors.migrate import migrate
from connectors.query import load_query
from connectors.settings import Connections
from devstack.stack import READONLY_PASSWORD_VAR, READONLY_USER_VAR, Stack
from tests.support import until

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 22, 20, 0, 0, tzinfo=UTC)
WEEK_AGO = datetime(2026, 11, 15, 10, 0, 0, tzinfo=UTC)
OFFLINE = datetime(2026, 11, 2, 20, 0, 0, tzinfo=UTC)  # before RANGE
RANGE = "from=2026-11-15&to=2026-11-22"


def _stack_env(stack: Stack) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line)


def _event(
    mid: str, ts: datetime, user: str, type_: str, event: str, path: str, **extra: Any
) -> dict[str, Any]:
    row = {
        "message_id": mid,
        "type": type_,
        "event": event,
        "user_key": user,
        "anonymous_id": user,
        "timestamp": ts,
        "received_at": ts + timedelta(seconds=1),
        "page_host": "shop.example",
        "page_path": path,
        "page_url": f"https://shop.example{path}",
        "country": "DE",
        "device_type": "desktop",
        "is_bot": False,
    }
    row.update(extra)
    return row


EVENTS = [
    _event("e1", NOW - timedelta(seconds=60), "u1", "page", "", "/home",
           referrer_host="www.google.com", referrer_type="search"),
    _event("e2", NOW - timedelta(seconds=50), "u1", "track", "Product Viewed", "/p/42"),
    _event("e3", NOW - timedelta(seconds=120), "u2", "page", "", "/home", country="FR", device_type="mobile",
           referrer_host="news.example", referrer_type="referral"),
    _event("e4", NOW - timedelta(seconds=40), "u1", "track", "Product Added", "/p/42"),
    _event("e5", NOW - timedelta(minutes=10), "u3", "page", "", "/about"),
    _event("e6", NOW - timedelta(seconds=35), "bot1", "page", "", "/home", is_bot=True, country="US"),
    _event("e7", NOW - timedelta(seconds=30), "u1", "track", "Order Completed", "/checkout"),
    _event("e8", WEEK_AGO, "u2", "page", "", "/home", country="FR", device_type="mobile"),
    # sent from a device that was offline for 20 days: an old event time, but it *arrived* 20 s ago, so
    # the live panels (arrival time) show it and the history of the range (event time) does not
    _event("e9", OFFLINE, "u4", "page", "", "/offline", received_at=NOW - timedelta(seconds=20)),
]  # fmt: skip


def _session(
    sid: str, user: str, start: datetime, duration: float, version: int, **extra: Any
) -> dict[str, Any]:
    row = {
        "session_id": sid,
        "user_key": user,
        "start": start,
        "end": start + timedelta(seconds=duration),
        "duration_s": duration,
        "events": 1,
        "page_views": 1,
        "is_bounce": True,
        "converted": False,
        "version": version,
        "retracted": 0,
    }
    row.update(extra)
    return row


SESSIONS = [
    _session("s1", "u1", NOW - timedelta(seconds=60), 10.0, 1),  # replaced by version 2
    _session("s1", "u1", NOW - timedelta(seconds=60), 30.0, 2, events=4, is_bounce=False, converted=True,
             revenue=129.99, utm_source="google", utm_medium="cpc", utm_campaign="xmas"),
    _session("s2", "u2", NOW - timedelta(seconds=120), 0.0, 1),
    _session("s3", "u2", WEEK_AGO, 60.0, 1),
]  # fmt: skip


def _action(aid: str, rule: str, user: str, fired: datetime, status: str, **extra: Any) -> dict[str, Any]:
    row = {"action_id": aid, "rule_id": rule, "user_key": user, "fired_at": fired, "event_time": fired,
           "events": 4, "status": status}  # fmt: skip
    row.update(extra)
    return row


ACTIONS = [
    _action("a1", "deal_promo", "u1", NOW - timedelta(seconds=20), "fired"),
    _action("a1", "deal_promo", "u1", NOW - timedelta(seconds=20), "fired"),  # at-least-once: again
    _action("a2", "cart_abandoned", "u2", NOW - timedelta(seconds=15), "fired"),
    _action("a2", "cart_abandoned", "u2", NOW - timedelta(seconds=15), "dead_lettered", attempts=5,
            last_error="HTTP 500"),
    _action("a3", "deal_promo", "u3", NOW - timedelta(seconds=5), "fired"),
]  # fmt: skip


def _insert(client: Any, db: str, table: str, rows: list[dict[str, Any]]) -> None:
    columns = sorted({k for r in rows for k in r})
    defaults = {"revenue": 0, "attempts": 0, "last_error": "", "utm_source": "", "utm_medium": "",
                "utm_campaign": "", "referrer_host": "", "referrer_type": ""}  # fmt: skip
    data = [[r.get(c, defaults.get(c)) for c in columns] for r in rows]
    client.insert(table, data, column_names=columns, database=db)


@pytest.fixture(scope="module")
def dataset(stack: Stack) -> Iterator[tuple[str, Connections, DashboardSettings]]:
    env = _stack_env(stack)
    db = f"cp_dash_{uuid.uuid4().hex[:10]}"
    full = client_from_url(env["CLICKHOUSE_URL"])
    migrate(full, db)
    _insert(full, db, "events", EVENTS)
    _insert(full, db, "sessions", SESSIONS)
    _insert(full, db, "actions", ACTIONS)
    conn = Connections.from_env({**env, "CLICKPULSE_CLICKHOUSE_DATABASE": db})
    settings = DashboardSettings.from_env(env)
    assert settings.clickhouse_readonly_user and settings.clickhouse_readonly_password.get_secret_value()
    yield db, conn, settings
    full.command(f"DROP DATABASE IF EXISTS {db}")
    full.close()


class Running:
    """An app served on a loopback port from a thread of its own."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as resp:
                body = resp.read()
                return resp.status, json.loads(
                    body
                ) if resp.headers.get_content_type() == "application/json" else body
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def rows(self, path: str) -> list[dict[str, Any]]:
        status, body = self.get(path)
        assert status == 200, (path, body)
        return list(body["rows"])

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def app(dataset: tuple[str, Connections, DashboardSettings]) -> Iterator[Running]:
    _, conn, settings = dataset
    running = Running(create_app(settings, conn, clock=NOW.timestamp))
    yield running
    running.close()


# ------------------------------------------------------------------------------------------------ live


def test_live_panels(app: Running) -> None:
    """Live panels count by arrival (received_at): e9, from a device offline for 20 days, is live."""
    # u1, u2 and u4 (e9); u3 arrived too long ago, the bot is excluded
    assert app.rows("/api/live/active_visitors") == [{"visitors": 3}]

    per_minute = app.rows("/api/live/events_per_minute")
    assert len(per_minute) == 60
    assert (
        per_minute[0]["minute"] == "2026-11-22T19:01:00.000Z"
        and per_minute[-1]["minute"] == "2026-11-22T20:00:00.000Z"
    )
    nonzero = {r["minute"][11:16]: r["events"] for r in per_minute if r["events"]}
    assert nonzero == {"19:50": 1, "19:58": 1, "19:59": 6}

    assert app.rows("/api/live/top_pages") == [
        {"page_host": "shop.example", "page_path": "/home", "page_views": 3, "events": 3},
        {"page_host": "shop.example", "page_path": "/offline", "page_views": 1, "events": 1},
        {"page_host": "shop.example", "page_path": "/p/42", "page_views": 0, "events": 2},
        {"page_host": "shop.example", "page_path": "/checkout", "page_views": 0, "events": 1},
    ]

    feed = app.rows("/api/live/feed_events")
    assert [(r["message_id"], r["name"], r["page_path"]) for r in feed] == [
        ("e9", "page", "/offline"),
        ("e7", "Order Completed", "/checkout"),
        ("e6", "page", "/home"),
        ("e4", "Product Added", "/p/42"),
        ("e2", "Product Viewed", "/p/42"),
        ("e1", "page", "/home"),
        ("e3", "page", "/home"),
        ("e5", "page", "/about"),
    ]
    assert (feed[0]["timestamp"], feed[0]["received_at"]) == (
        "2026-11-02T20:00:00.000Z",
        "2026-11-22T19:59:40.000Z",
    )
    assert feed[1]["timestamp"] == "2026-11-22T19:59:30.000Z"

    actions = app.rows("/api/live/feed_actions")
    assert [(r["action_id"], r["status"], r["rule_id"], r["attempts"]) for r in actions] == [
        ("a3", "fired", "deal_promo", 0),
        ("a2", "dead_lettered", "cart_abandoned", 5),
        ("a2", "fired", "cart_abandoned", 0),
        ("a1", "fired", "deal_promo", 0),
    ]


# --------------------------------------------------------------------------------------------- history


def test_history_panels(app: Running) -> None:
    assert app.rows(f"/api/history/active_users?{RANGE}") == [
        {"day": "2026-11-15", "dau": 1, "wau": 1, "mau": 1},
        {"day": "2026-11-22", "dau": 3, "wau": 3, "mau": 3},
    ]
    assert app.rows(f"/api/history/sessions?{RANGE}") == [
        {"day": "2026-11-15", "sessions": 1, "users": 1, "bounce_rate": 1.0, "avg_duration_s": 60.0},
        {"day": "2026-11-22", "sessions": 2, "users": 2, "bounce_rate": 0.5, "avg_duration_s": 15.0},
    ]
    assert [
        (r["page_path"], r["page_views"], r["events"]) for r in app.rows(f"/api/history/top_pages?{RANGE}")
    ] == [
        ("/home", 4, 4),
        ("/about", 1, 1),
        ("/p/42", 0, 2),
        ("/checkout", 0, 1),
    ]
    assert app.rows(f"/api/history/top_referrers?{RANGE}") == [
        {"referrer_host": "news.example", "referrer_type": "referral", "page_views": 1, "visitors": 1},
        {"referrer_host": "www.google.com", "referrer_type": "search", "page_views": 1, "visitors": 1},
    ]
    assert app.rows(f"/api/history/top_campaigns?{RANGE}") == [
        {"utm_source": "google", "utm_medium": "cpc", "utm_campaign": "xmas", "sessions": 1, "conversions": 1,
         "revenue": 129.99},
    ]  # fmt: skip
    assert app.rows(f"/api/history/top_countries?{RANGE}") == [
        {"country": "DE", "events": 5},
        {"country": "FR", "events": 2},
        {"country": "US", "events": 1},
    ]
    assert app.rows(f"/api/history/top_devices?{RANGE}") == [
        {"device_type": "desktop", "events": 6},
        {"device_type": "mobile", "events": 2},
    ]
    assert app.rows(f"/api/history/funnel?{RANGE}") == [
        {"step": 1, "step_name": "Product Viewed", "users": 1, "pct_of_first_step": 100.0},
        {"step": 2, "step_name": "Product Added", "users": 1, "pct_of_first_step": 100.0},
        {"step": 3, "step_name": "Order Completed", "users": 1, "pct_of_first_step": 100.0},
    ]
    two = app.rows(f"/api/history/funnel?{RANGE}&steps=Order%20Completed,Product%20Viewed&window_s=3600")
    assert [(r["step_name"], r["users"]) for r in two] == [("Order Completed", 1), ("Product Viewed", 0)]
    assert app.rows(f"/api/history/retention?{RANGE}") == [
        {"cohort_week": "2026-11-09", "week_offset": 0, "users": 1, "cohort_size": 1, "retention_pct": 100.0},
        {"cohort_week": "2026-11-09", "week_offset": 1, "users": 1, "cohort_size": 1, "retention_pct": 100.0},
        {"cohort_week": "2026-11-16", "week_offset": 0, "users": 2, "cohort_size": 2, "retention_pct": 100.0},
    ]
    assert app.rows(f"/api/history/actions_per_rule?{RANGE}") == [
        {"rule_id": "deal_promo", "fired": 2, "dead_lettered": 0, "delivered": 2},
        {"rule_id": "cart_abandoned", "fired": 1, "dead_lettered": 1, "delivered": 0},
    ]
    # the range is honoured: the week before holds only u2's page view
    assert app.rows("/api/history/top_pages?from=2026-11-15&to=2026-11-15") == [
        {"page_host": "shop.example", "page_path": "/home", "page_views": 1, "events": 1}
    ]


def test_bad_requests_are_answered_400_and_counted(app: Running) -> None:
    before = app.get("/healthz")[1]["bad_requests"]
    for path in (
        "/api/history/top_pages?from=yesterday",
        "/api/history/top_pages?from=2026-11-22&to=2026-11-01",
        "/api/history/top_pages?limit=5",
        "/api/live/top_pages?from=2026-11-01",
        "/api/history/funnel?steps=" + ",".join(f"s{i}" for i in range(7)),
        "/api/history/funnel?window_s=abc",
        "/api/history/funnel?steps=x'%20OR%201=1%20--&from=1900-01-01&to=2100-01-01",
    ):
        status, body = app.get(path)
        if "OR" in path:  # hostile text is a value like any other: bound, not spliced (the range is too wide)
            assert status == 400 and "731 days" in body["error"]
            continue
        assert status == 400 and body["error"], path
    status, body = app.get("/api/history/funnel?steps=x'%20OR%201=1%20--&" + RANGE)
    assert status == 200 and body["rows"] == [] and body["params"]["steps"] == ["x' OR 1=1 --"]
    assert app.get("/api/history/nope")[0] == 404
    assert app.get("/healthz")[1]["bad_requests"] == before + 7


def test_page_config_and_static_files(app: Running) -> None:
    status, body = app.get("/api/config")
    assert status == 200 and body["refresh_ms"] <= 2000 and body["funnel_steps"][0] == "Product Viewed"
    status, html = app.get("/")
    assert (
        status == 200
        and b'data-testid="live-feed-events"' in html
        and b"/static/vendor/uPlot.iife.min.js" in html
    )
    assert b"http" not in html.replace(b"http-equiv", b"")  # nothing from another origin
    for path in (
        "/static/app.js",
        "/static/app.css",
        "/static/vendor/uPlot.iife.min.js",
        "/static/vendor/uPlot.min.css",
    ):
        status, body = app.get(path)
        assert status == 200 and len(body) > 100, path


# ------------------------------------------------------------------------------------- read-only user


def test_readonly_user_cannot_write(
    stack: Stack, dataset: tuple[str, Connections, DashboardSettings]
) -> None:
    db, conn, settings = dataset
    env = _stack_env(stack)
    assert READONLY_PASSWORD_VAR in env and env[READONLY_USER_VAR] == settings.clickhouse_readonly_user
    ro = client_from_url(
        env["CLICKHOUSE_URL"],
        database=db,
        username=settings.clickhouse_readonly_user,
        password=settings.clickhouse_readonly_password.get_secret_value(),
    )
    assert ro.command("SELECT count() FROM events") == len(EVENTS)
    for sql in (
        "INSERT INTO events (message_id) VALUES ('x')",
        "CREATE TABLE t (n UInt8) ENGINE = Memory",
        "DROP TABLE events",
        "CREATE DATABASE nope",
    ):
        with pytest.raises(DatabaseError, match="164|READONLY"):
            ro.command(sql)
    with pytest.raises(DatabaseError, match="164|READONLY"):
        ro.insert("actions", [["zz"]], column_names=["action_id"])
    with pytest.raises(DatabaseError, match="516"):
        client_from_url(env["CLICKHOUSE_URL"], username=settings.clickhouse_readonly_user, password="wrong")
    assert ro.command("SELECT count() FROM events") == len(EVENTS)
    ro.close()


def test_stack_runs_the_dashboard(stack: Stack) -> None:
    env = _stack_env(stack)
    url = env["CLICKPULSE_DASHBOARD_URL"]
    assert url.startswith("http://127.0.0.1:")
    row = {r["service"]: r for r in stack.status()}["dashboard"]
    assert row["state"] == "running" and row["healthy"]
    migrate(client_from_url(env["CLICKHOUSE_URL"]), "clickpulse")  # what it reads (a no-op when done)
    with urllib.request.urlopen(url + "/api/live/active_visitors", timeout=30) as resp:
        assert resp.status == 200 and "visitors" in json.loads(resp.read())["columns"]


# ------------------------------------------------------------------------------- loader: actions


def test_loader_loads_actions_and_dead_letters_exactly_once(
    stack: Stack, connections: Connections, topic_factory
) -> None:
    topics = {name: topic_factory(name.replace(".", "_"), partitions=2) for name in
              ("events", "sessions", "dlq", "actions", "actions.dlq")}  # fmt: skip
    db = f"cp_act_{uuid.uuid4().hex[:10]}"
    client = client_from_url(connections.clickhouse_url.get_secret_value())
    migrate(client, db)
    fired: list[dict[str, Any]] = [
        {"action_id": f"a{i}", "rule_id": "deal_promo" if i % 2 else "cart_abandoned", "user_key": f"u{i}",
         "fired_at": "2026-11-22T20:00:00.000Z", "event_time": "2026-11-22T19:59:00.000Z",
         "events": [{"message_id": f"m{i}"}], "details": {}}
        for i in range(40)
    ]  # fmt: skip
    dead = [{**a, "attempts": 5, "last_error": "HTTP 500"} for a in fired[:6]]
    producer = KafkaProducer(bootstrap_servers=connections.kafka_bootstrap_servers)
    for a in fired:
        producer.send(topics["actions"], key=a["user_key"].encode(), value=orjson.dumps(a))
    for a in dead:
        producer.send(topics["actions.dlq"], key=a["action_id"].encode(), value=orjson.dumps(a))
    producer.send(topics["actions"], key=b"bad", value=b'{"action_id": "broken"}')  # no rule_id, no fired_at
    producer.flush()
    producer.close()

    def run(group: str) -> Any:
        cfg = LoaderConfig(
            bootstrap_servers=connections.kafka_bootstrap_servers,
            clickhouse_url=connections.clickhouse_url.get_secret_value(),
            database=db,
            events_topic=topics["events"],
            sessions_topic=topics["sessions"],
            dlq_topic=topics["dlq"],
            actions_topic=topics["actions"],
            actions_dlq_topic=topics["actions.dlq"],
            group_id=group,
            starting_offsets=StartingOffsets.EARLIEST,
            bounded=True,
            batch_max_seconds=0.2,
        )
        return Loader(cfg).run()

    first = run(f"g1-{uuid.uuid4().hex[:6]}")
    assert first.rows == {"events": 0, "sessions": 0, "actions": len(fired) + len(dead)} and first.dlq == 1
    again = run(f"g2-{uuid.uuid4().hex[:6]}")  # a new group from the beginning: nothing loads twice
    assert again.rows["actions"] == 0 and again.skipped_loaded == len(fired) + len(dead) + 1

    def counts() -> list[Any]:
        return list(
            client.query(
                f"SELECT status, count(), uniqExact(action_id), sum(attempts) FROM {db}.actions "
                "GROUP BY status ORDER BY status"
            ).result_rows
        )

    until(
        lambda: counts() == [("dead_lettered", 6, 6, 30), ("fired", 40, 40, 0)], 30, "actions in ClickHouse"
    )
    in_db = client_from_url(connections.clickhouse_url.get_secret_value(), database=db)
    saved = load_query("actions_per_rule")
    per_rule = in_db.query(
        saved.sql, parameters=saved.bind({"date_from": "2026-11-22", "date_to": "2026-11-22"})
    )
    assert per_rule.result_rows == [("cart_abandoned", 20, 3, 17), ("deal_promo", 20, 3, 17)]
    in_db.close()
    client.command(f"DROP DATABASE IF EXISTS {db}")
    client.close()


def test_demo_dashboard_serves_until_interrupted(stack: Stack, tmp_path: Path) -> None:
    """What ``clickpulse demo`` ends with: its dashboard on the demo database, served until Ctrl-C."""
    from devstack.demo import DATABASE, DemoDashboard, serve_until_interrupted

    dashboard = DemoDashboard(stack, tmp_path / "dashboard.log")
    try:
        with urllib.request.urlopen(dashboard.url + "/api/config", timeout=30) as resp:
            assert json.loads(resp.read())["database"] == DATABASE
        buf = io.StringIO()
        out = Console(file=buf, width=200)

        def interrupt() -> None:
            until(lambda: "dashboard: http://127.0.0.1:" in buf.getvalue(), 30, "the URL printed")
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt, daemon=True).start()
        serve_until_interrupted(dashboard, out)
        assert dashboard.alive()  # serving stops on Ctrl-C; the demo's finally stops the process
    finally:
        dashboard.stop()
    assert not dashboard.alive()
