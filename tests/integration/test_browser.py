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
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.demo import Pipeline, PipelineConfig
from devstack.service import Service, serve
from devstack.stack import Stack
from tests.support import until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".clickpulse" / "artifacts"
WRITE_KEY = "browser-test-key"
DESKTOP_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)

SHOP_HOME = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>Shop home</title>
<script src="{collector}/v1/clickpulse.js"></script>
<script>clickpulse.load({{writeKey: "{write_key}", host: "{collector}", flushInterval: 200}});</script>
</head><body>
<h1>Shop</h1>
<a id="to-pricing" href="/pricing.html">See pricing</a>
</body></html>
"""

SHOP_PRICING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>Pricing</title>
<script src="{collector}/v1/clickpulse.js"></script>
<script>clickpulse.load({{writeKey: "{write_key}", host: "{collector}", flushInterval: 200}});</script>
</head><body>
<h1>Pricing</h1>
<button id="choose"
  onclick="clickpulse.track('Plan Chosen', {{plan: 'pro'}}); clickpulse.flush()">Choose pro</button>
<a id="to-home" href="/">Back home</a>
</body></html>
"""


#: (name, page path) rows the dashboard's live feed must show: both page views, the identify call, the
#: link click (made on the home page, sent by sendBeacon as the page unloads) and the button's track call
EXPECTED = {
    ("page", "/"),
    ("identify", "/"),
    ("Link Clicked", "/"),
    ("page", "/pricing.html"),
    ("Plan Chosen", "/pricing.html"),
}


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


def _record_errors(page: Any, errors: list[str], label: str) -> None:
    """Collect the console errors and uncaught exceptions of ``page``."""
    page.on("console", lambda m: errors.append(f"{label} console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"{label} page error: {e}"))


def test_tracked_clicks_appear_on_the_live_dashboard(
    stack: Stack, job_env: dict[str, str], tmp_path: Path, shop_site: tuple[Path, str]
) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make sysdeps` installs it"
    database = f"browser_{uuid.uuid4().hex[:8]}"
    env = {**job_env, "CLICKPULSE_WRITE_KEY": WRITE_KEY, "CLICKPULSE_CLICKHOUSE_DATABASE": database}
    # the dashboard reads as the session stack's read-only ClickHouse user, as `stack up` sets it up
    stack_env = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line)
    env.update({k: v for k, v in stack_env.items() if k.startswith("CLICKPULSE_CLICKHOUSE_READONLY_")})
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
    errors: list[str] = []
    try:
        pipeline.start_all(("ingest", "load"))
        collector = serve("connectors.collector", env, tmp_path / "collector.log", "/ping")
        services.append(collector)
        dashboard = serve("connectors.dashboard", env, tmp_path / "dashboard.log", "/healthz")
        services.append(dashboard)
        root, site = shop_site
        for name, text in (("index.html", SHOP_HOME), ("pricing.html", SHOP_PRICING)):
            (root / name).write_text(text.format(collector=collector.url, write_key=WRITE_KEY))

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                # a desktop Chrome's user agent: headless Chromium's own says "HeadlessChrome", which
                # ingest rightly flags as a bot, and bots are not counted as visitors
                context = browser.new_context(viewport={"width": 1400, "height": 1800}, user_agent=DESKTOP_UA)
                shop = context.new_page()
                _record_errors(shop, errors, "shop")
                shop.goto(site + "/")  # the automatic page view
                shop.evaluate("clickpulse.identify('browser-visitor', {plan: 'free'})")
                with shop.expect_navigation():
                    shop.click("#to-pricing")  # Link Clicked, handed to sendBeacon as the page unloads
                shop.click("#choose")  # Plan Chosen, sent by fetch
                shop.evaluate("clickpulse.flush()")

                dash = context.new_page()
                _record_errors(dash, errors, "dashboard")
                dash.goto(dashboard.url + "/")
                opened = time.monotonic()

                def shown() -> bool:
                    pipeline.check_alive()
                    visitors = dash.locator("[data-testid=live-visitors]").inner_text().strip()
                    # one visitor, two user keys at most: the page view before identify is the anonymous id's
                    return EXPECTED <= set(_feed(dash)) and visitors in ("1", "2")

                until(shown, 120, "the browser's events in the live feed, one visitor", every_s=0.5)
                waited = time.monotonic() - opened
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                dash.screenshot(path=str(ARTIFACTS / "browser-dashboard.png"), full_page=True)
            finally:
                browser.close()
        logging.getLogger(__name__).info("the live feed showed the events %.1f s after it opened", waited)
        assert errors == [], errors
    finally:
        for svc in services:
            svc.stop()
        pipeline.stop_all()
