"""The front door and the window in a real browser: tracking script → collector → jobs → dashboard.

Headless Chromium (Debian's ``chromium``, driven by Playwright) opens a shop page served from its own
origin that loads the collector's ``clickpulse.js``; the visitor identifies, clicks a link to a second page
and presses a button. The events travel the real path: collector (CORS, write key, acks=all) →
``events.raw`` → the ingest job → ``events.enriched`` → the loader → ClickHouse. Then the dashboard is
opened, and its live feed must show those page views and clicks (read from ClickHouse through the saved
queries). Neither page may log a console error. A screenshot of the dashboard is kept as a test artifact
(``.clickpulse/artifacts/browser-dashboard.png``).
"""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.settings import Connections
from devstack.demo import Pipeline, PipelineConfig
from devstack.stack import free_port
from tests.support import until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".clickpulse" / "artifacts"
WRITE_KEY = "browser-test-key"

SHOP_HOME = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Shop home</title>
<script src="{collector}/v1/clickpulse.js"></script>
<script>clickpulse.load({{writeKey: "{write_key}", host: "{collector}", flushInterval: 200}});</script>
</head><body>
<h1>Shop</h1>
<a id="to-pricing" href="/pricing.html">See pricing</a>
</body></html>
"""

SHOP_PRICING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Pricing</title>
<script src="{collector}/v1/clickpulse.js"></script>
<script>clickpulse.load({{writeKey: "{write_key}", host: "{collector}", flushInterval: 200}});</script>
</head><body>
<h1>Pricing</h1>
<button id="choose" onclick="clickpulse.track('Plan Chosen', {{plan: 'pro'}}); clickpulse.flush()">Choose pro</button>
<a id="to-home" href="/">Back home</a>
</body></html>
"""


@dataclass
class Service:
    """A server process of this test (collector or dashboard) on its own port."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        """SIGTERM, then wait (it must stop cleanly)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _serve(module: str, env: dict[str, str], log: Path, health: str) -> Service:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [sys.executable, "-m", module, "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    svc = Service(proc, f"http://127.0.0.1:{port}", log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{module} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(svc.url + health, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    until(up, 60, f"{module} answering {health}")
    return svc


@pytest.fixture
def shop_site(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A static site on its own loopback origin (so the script's requests are cross-origin)."""
    root = tmp_path / "site"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def _feed(page: Any) -> list[tuple[str, str]]:
    rows = page.locator("[data-testid=feed-event]")
    return [
        (
            rows.nth(i).locator("[data-testid=feed-event-name]").inner_text(),
            rows.nth(i).locator("[data-testid=feed-event-path]").inner_text(),
        )
        for i in range(rows.count())
    ]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make sysdeps)")
def test_tracked_clicks_appear_on_the_live_dashboard(
    job_env: dict[str, str], connections: Connections, tmp_path: Path, shop_site: tuple[Path, str]
) -> None:
    from playwright.sync_api import sync_playwright

    database = f"browser_{uuid.uuid4().hex[:8]}"
    env = {**job_env, "CLICKPULSE_WRITE_KEY": WRITE_KEY, "CLICKPULSE_CLICKHOUSE_DATABASE": database}
    pipeline = Pipeline(
        PipelineConfig(
            env=env,
            workdir=tmp_path / "jobs",
            rules_file=REPO / "docs" / "rules.demo.yaml",
            database=database,
            group_prefix=f"browser-{uuid.uuid4().hex[:6]}",
        )
    )
    services: list[Service] = []
    try:
        pipeline.start_all(("ingest", "load"))
        collector = _serve("connectors.collector", env, tmp_path / "collector.log", "/ping")
        services.append(collector)
        dashboard = _serve("connectors.dashboard", env, tmp_path / "dashboard.log", "/healthz")
        services.append(dashboard)

        root, site = shop_site
        for name, text in (("index.html", SHOP_HOME), ("pricing.html", SHOP_PRICING)):
            (root / name).write_text(text.format(collector=collector.url, write_key=WRITE_KEY))

        errors: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            try:
                context = browser.new_context(viewport={"width": 1400, "height": 1800})
                page = context.new_page()
                page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))

                page.goto(site + "/")
                page.evaluate("clickpulse.identify('browser-visitor', {plan: 'free'})")
                with page.expect_navigation():
                    page.click("#to-pricing")  # a Link Clicked event, sent by sendBeacon on pagehide
                page.click("#choose")  # Plan Chosen, flushed by fetch
                page.evaluate("clickpulse.flush()")

                dash = context.new_page()
                dash.on("console", lambda m: errors.append(f"dashboard console {m.type}: {m.text}") if m.type == "error" else None)
                dash.on("pageerror", lambda e: errors.append(f"dashboard page error: {e}"))
                dash.goto(dashboard.url + "/")
                started = time.monotonic()

                def shown() -> bool:
                    pipeline.check_alive()
                    feed = _feed(dash)
                    names = {n for n, _ in feed}
                    paths = {p for _, p in feed}
                    return {"Link Clicked", "Plan Chosen"} <= names and {"/", "/pricing.html"} <= paths

                until(shown, 120, "the browser's page views and clicks in the dashboard's live feed", every_s=0.5)
                waited = time.monotonic() - started
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                dash.screenshot(path=str(ARTIFACTS / "browser-dashboard.png"), full_page=True)
                feed = _feed(dash)
            finally:
                browser.close()
        print(f"live feed showed the browser's events {waited:.1f} s after the dashboard opened: {feed}")
        assert errors == [], errors
        # every page view of the two pages is there, as page views
        assert sum(1 for n, p in feed if p == "/pricing.html") >= 2  # its page view and Plan Chosen
    finally:
        for svc in services:
            svc.stop()
        pipeline.stop_all()
