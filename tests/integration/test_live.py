"""Issue 15: an event sent through the collector appears on the dashboard's live view.

The real path, each part its own process on this test's topics (``job_env``: its own prefix) and its own
ClickHouse database: collector (``python -m connectors.collector``) → ``events.raw`` → the ingest job →
``events.enriched`` → the loader → ClickHouse → the dashboard (``python -m connectors.dashboard``, as the
stack's read-only user), read through its JSON API as the browser's live view reads it. The event claims
to come from a device that was offline for two days: the live panels select by arrival time, so it is
live all the same. The test waits for the event to show (no fixed sleeps) and asserts *that* it shows;
how fast is ``bench/bench_live.py``'s to measure.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from connectors.clickhouse import client_from_url
from devstack.demo import Pipeline, PipelineConfig
from devstack.service import Service, serve
from devstack.stack import Stack
from tests.support import REPO, until

pytestmark = pytest.mark.integration

WRITE_KEY = "live-test-" + uuid.uuid4().hex


def get_json(svc: Service, path: str) -> Any:
    """GET ``path``, answered 200 with JSON."""
    resp = httpx.get(svc.url + path, timeout=30)
    assert resp.status_code == 200, (path, resp.status_code, resp.text[:500])
    return resp.json()


@pytest.fixture
def live_path(
    stack: Stack, job_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[Service, Service, Pipeline]]:
    """Collector, ingest, loader and dashboard on this test's topics and database."""
    database = f"cp_live_{uuid.uuid4().hex[:10]}"
    stack_env = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line)
    env = {
        **job_env,
        "CLICKPULSE_WRITE_KEY": WRITE_KEY,
        "CLICKPULSE_CLICKHOUSE_DATABASE": database,
        # the dashboard reads as the stack's read-only user, as `stack up` sets it up
        **{k: v for k, v in stack_env.items() if k.startswith("CLICKPULSE_CLICKHOUSE_READONLY_")},
    }
    pipeline = Pipeline(
        PipelineConfig(
            env=env,
            workdir=tmp_path / "jobs",
            rules_file=REPO / "docs" / "rules.demo.yaml",
            database=database,
            group_prefix=f"live-{uuid.uuid4().hex[:6]}",
        )
    )
    services: list[Service] = []
    try:
        pipeline.start_all(("ingest", "load"))
        services.append(serve("connectors.collector", env, tmp_path / "collector.log", "/ping"))
        services.append(serve("connectors.dashboard", env, tmp_path / "dashboard.log", "/healthz"))
        yield services[0], services[1], pipeline
    finally:
        for svc in services:
            svc.stop()
        pipeline.stop_all()
        client = client_from_url(stack_env["CLICKHOUSE_URL"])
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_an_event_sent_through_the_collector_appears_on_the_live_view(
    live_path: tuple[Service, Service, Pipeline],
) -> None:
    collector, dashboard, pipeline = live_path
    message_id = f"live-{uuid.uuid4().hex}"
    now = datetime.now(UTC)
    two_days_ago = (now - timedelta(days=2)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event = {
        "messageId": message_id,
        "anonymousId": "a-live-visitor",
        "timestamp": two_days_ago,  # recorded offline, sent now: event time two days back
        "sentAt": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "name": "Pricing",
        "properties": {"path": "/pricing", "url": "https://shop.example/pricing"},
        "context": {
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0.0.0 Safari/537.36",
            "page": {"url": "https://shop.example/pricing", "path": "/pricing"},
        },
    }
    auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    resp = httpx.post(
        collector.url + "/v1/page",
        content=orjson.dumps(event),
        headers={"Authorization": auth, "Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text

    def shown() -> dict[str, Any] | None:
        pipeline.check_alive()
        try:
            rows = get_json(dashboard, "/api/live/feed_events")["rows"]
        except AssertionError:  # 502 until the loader has created the tables
            return None
        return next((r for r in rows if r["message_id"] == message_id), None)

    row = until(shown, 180, "the event in the dashboard's live feed", every_s=0.2)
    assert (row["name"], row["type"], row["page_path"]) == ("page", "page", "/pricing")
    assert _time(row["timestamp"]) < now - timedelta(days=1)  # event time: two days back
    assert _time(row["received_at"]) > now - timedelta(minutes=5)  # arrival: just now

    # every live panel counts it (this database holds only this event)
    assert get_json(dashboard, "/api/live/active_visitors")["rows"] == [{"visitors": 1}]
    per_minute = get_json(dashboard, "/api/live/events_per_minute")["rows"]
    assert len(per_minute) == 60 and sum(r["events"] for r in per_minute) == 1
    top = get_json(dashboard, "/api/live/top_pages")["rows"]
    assert [(r["page_path"], r["page_views"]) for r in top] == [("/pricing", 1)]
