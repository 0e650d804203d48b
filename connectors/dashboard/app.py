"""The dashboard's aiohttp application: static files, ``/api/config``, one JSON endpoint per panel.

A panel is a saved query (``sql/queries/<query>.sql``) and the request parameters it accepts:

* ``live`` panels take none; the server's clock gives ``now_ms`` (Unix milliseconds);
* ``range`` panels take ``from`` and ``to`` (``YYYY-MM-DD``, UTC days, inclusive; default: the last 30
  days), bound to ``date_from`` / ``date_to``;
* the ``funnel`` takes a range and ``steps`` (comma-separated event names, 1 to 6) and ``window_s``.

Values are bound as ClickHouse query parameters; no SQL is built here. A bad request parameter gets
400 with ``{"error": ...}`` and is counted (``bad_requests``); a ClickHouse failure gets 502 and is
counted (``query_errors``). ``GET /healthz`` answers ``{"status": "ok", ...counters}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web
from clickhouse_connect.driver.client import Client

from connectors.clickhouse import client_from_url, redact_url
from connectors.dashboard.settings import DashboardSettings
from connectors.query import QueryParamError, SavedQuery, load_query, param_value
from connectors.settings import Connections

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Days a history range may span at most (a wider one is a bad request).
MAX_RANGE_DAYS = 731
#: Default history range: this many days up to today.
DEFAULT_RANGE_DAYS = 30
MAX_FUNNEL_STEPS = 6
_MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class Panel:
    """One JSON endpoint, ``/api/<name>``: the saved query it runs and the request parameters it takes."""

    name: str
    query: str
    kind: str  # "live", "range" or "funnel"
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """Parameters the app sets (over the query's defaults)."""


#: Every panel, in page order.
PANELS: tuple[Panel, ...] = (
    Panel("live/active_visitors", "live_active_visitors", "live", {"window_s": 300}),
    Panel("live/events_per_minute", "live_events_per_minute", "live", {"minutes": 60}),
    Panel("live/top_pages", "live_top_pages", "live", {"window_s": 300, "limit": 10}),
    Panel("live/feed_events", "live_feed_events", "live", {"limit": 30}),
    Panel("live/feed_actions", "live_feed_actions", "live", {"limit": 15}),
    Panel("history/active_users", "active_users", "range"),
    Panel("history/sessions", "sessions_daily", "range"),
    Panel("history/top_pages", "top_pages", "range", {"limit": 10}),
    Panel("history/top_referrers", "top_referrers", "range", {"limit": 10}),
    Panel("history/top_campaigns", "top_campaigns", "range", {"limit": 10}),
    Panel("history/top_countries", "top_countries", "range", {"limit": 10}),
    Panel("history/top_devices", "top_devices", "range", {"limit": 10}),
    Panel("history/funnel", "funnel", "funnel"),
    Panel("history/retention", "retention", "range"),
    Panel("history/actions_per_rule", "actions_per_rule", "range"),
)


class BadRequest(ValueError):
    """A request parameter the panel cannot take (answered 400)."""


@dataclass
class Counters:
    """What the app did, for ``/healthz`` and the logs."""

    requests: int = 0
    bad_requests: int = 0
    query_errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        """Count one ``name`` (``requests``, ``bad_requests`` or ``query_errors``)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        with self._lock:
            return {
                "requests": self.requests,
                "bad_requests": self.bad_requests,
                "query_errors": self.query_errors,
            }


# ---------------------------------------------------------------------------------------- parameters


def _day(text: str, name: str) -> date:
    try:
        value = param_value("Date", text)
    except QueryParamError as exc:
        raise BadRequest(f"{name}: {exc}") from None
    assert isinstance(value, date)
    return value


def request_params(panel: Panel, query: Mapping[str, str], *, now_ms: int) -> dict[str, Any]:
    """The query parameters of ``panel`` for a request whose query string is ``query``.

    Raises :class:`BadRequest` for anything the panel does not take or cannot use.
    """
    allowed = {"live": set(), "range": {"from", "to"}, "funnel": {"from", "to", "steps", "window_s"}}[
        panel.kind
    ]
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise BadRequest(f"unknown parameter {', '.join(unknown)} for {panel.name}")
    params: dict[str, Any] = dict(panel.fixed)
    if panel.kind == "live":
        params["now_ms"] = now_ms
        return params
    today = datetime.fromtimestamp(now_ms / 1000, UTC).date()
    date_to = _day(query["to"], "to") if query.get("to") else today
    date_from = (
        _day(query["from"], "from") if query.get("from") else date_to - timedelta(days=DEFAULT_RANGE_DAYS)
    )
    if date_from > date_to:
        raise BadRequest(f"from ({date_from}) is after to ({date_to})")
    if (date_to - date_from).days > MAX_RANGE_DAYS:
        raise BadRequest(f"the range spans more than {MAX_RANGE_DAYS} days")
    params.update(date_from=date_from, date_to=date_to)
    if panel.kind == "funnel":
        if "steps" in query:
            steps = [s.strip() for s in query["steps"].split(",") if s.strip()]
            if not 1 <= len(steps) <= MAX_FUNNEL_STEPS:
                raise BadRequest(f"steps: give 1 to {MAX_FUNNEL_STEPS} comma-separated event names")
            if any(len(s) > _MAX_NAME_CHARS for s in steps):
                raise BadRequest(f"steps: an event name is longer than {_MAX_NAME_CHARS} characters")
            params["steps"] = steps
        if "window_s" in query:
            try:
                window = int(query["window_s"])
            except ValueError:
                raise BadRequest(f"window_s: not an integer: {query['window_s']!r}") from None
            if not 1 <= window <= 90 * 86400:
                raise BadRequest("window_s: 1 s to 90 days")
            params["window_s"] = window
    return params


# ------------------------------------------------------------------------------------------- values


def json_value(value: Any) -> Any:
    """A query result value as JSON: datetimes as ISO-8601 UTC with ``Z``, dates as ``YYYY-MM-DD``,
    decimals as numbers, NaN as null."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return value


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ------------------------------------------------------------------------------------------- reader


class Reader:
    """Runs saved queries on ClickHouse as the read-only user; one client, made on first use and again
    after a connection failure. Queries run in worker threads, at most ``max_concurrent`` at once."""

    def __init__(self, settings: DashboardSettings, conn: Connections) -> None:
        """Read with ``conn``'s server and database and ``settings``' read-only user."""
        self.settings = settings
        self.conn = conn
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._slots = asyncio.Semaphore(settings.max_concurrent_queries)
        if not settings.clickhouse_readonly_user:
            log.warning(
                "no read-only ClickHouse user configured (CLICKPULSE_CLICKHOUSE_READONLY_USER): "
                "the dashboard reads as the user of CLICKHOUSE_URL"
            )

    def _make_client(self) -> Client:
        url = self.conn.clickhouse_url.get_secret_value()
        extra: dict[str, Any] = {}
        if self.settings.clickhouse_readonly_user:
            extra["username"] = self.settings.clickhouse_readonly_user
            extra["password"] = self.settings.clickhouse_readonly_password.get_secret_value()
        log.info(
            "reading %s at %s as %s",
            self.conn.clickhouse_database,
            redact_url(url),
            self.settings.clickhouse_readonly_user or "the CLICKHOUSE_URL user",
        )
        return client_from_url(
            url,
            database=self.conn.clickhouse_database,
            autogenerate_session_id=False,
            connect_timeout=5,
            send_receive_timeout=max(1, self.settings.query_timeout_ms // 1000),
            **extra,
        )

    def _run(self, query: SavedQuery, params: Mapping[str, Any]) -> tuple[list[str], list[Sequence[Any]]]:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            client = self._client
        try:
            result = client.query(query.sql, parameters=dict(params))
        except Exception:
            with self._lock:  # a fresh client next time (the server may have restarted)
                if self._client is client:
                    self._client = None
            client.close()
            raise
        return list(result.column_names), list(result.result_rows)

    async def run(
        self, query: SavedQuery, params: Mapping[str, Any]
    ) -> tuple[list[str], list[Sequence[Any]]]:
        """Column names and rows of ``query`` with ``params``."""
        async with self._slots:
            return await asyncio.to_thread(self._run, query, params)

    def close(self) -> None:
        """Close the client."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


# ---------------------------------------------------------------------------------------------- app

COUNTERS = web.AppKey("counters", Counters)
READER = web.AppKey("reader", Reader)

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    settings: DashboardSettings,
    conn: Connections,
    *,
    clock: Callable[[], float] = time.time,
    reader: Reader | None = None,
) -> web.Application:
    """The application. ``clock`` (seconds since the epoch) gives the live panels' ``now_ms``."""
    queries = {p.name: load_query(p.query) for p in PANELS}
    panels = {p.name: p for p in PANELS}

    @web.middleware
    async def headers(request: web.Request, handler: Any) -> web.StreamResponse:
        request.app[COUNTERS].add("requests")
        response: web.StreamResponse = await handler(request)
        response.headers.update(_SECURITY_HEADERS)
        if request.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    app = web.Application(middlewares=[headers])
    app[COUNTERS] = Counters()
    app[READER] = reader or Reader(settings, conn)

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **request.app[COUNTERS].snapshot()}, dumps=_dumps)

    async def config(_: web.Request) -> web.Response:
        body = {
            "refresh_ms": settings.refresh_ms,
            "database": conn.clickhouse_database,
            "default_range_days": DEFAULT_RANGE_DAYS,
            "max_funnel_steps": MAX_FUNNEL_STEPS,
            "funnel_steps": load_query("funnel").bind({})["steps"],
            "panels": [{"name": p.name, "kind": p.kind} for p in PANELS],
        }
        return web.json_response(body, dumps=_dumps)

    async def panel(request: web.Request) -> web.Response:
        name = f"{request.match_info['group']}/{request.match_info['panel']}"
        spec = panels.get(name)
        if spec is None:
            raise web.HTTPNotFound(
                text=_dumps({"error": f"no panel {name}"}), content_type="application/json"
            )
        counters = request.app[COUNTERS]
        started = time.perf_counter()
        try:
            given = request_params(spec, request.query, now_ms=int(clock() * 1000))
            if "now_ms" not in queries[name].types:  # a live panel that does not depend on the time
                given.pop("now_ms", None)
            params = queries[name].bind(given)
        except (BadRequest, QueryParamError) as exc:
            counters.add("bad_requests")
            log.info("bad request for %s: %s", name, exc)
            return web.json_response({"error": str(exc)}, status=400, dumps=_dumps)
        try:
            columns, rows = await request.app[READER].run(queries[name], params)
        except Exception as exc:  # clickhouse-connect raises DatabaseError / OperationalError
            counters.add("query_errors")
            log.warning("panel %s: query failed: %s", name, exc)
            return web.json_response({"error": f"ClickHouse: {exc}"}, status=502, dumps=_dumps)
        body = {
            "panel": name,
            "params": {k: json_value(v) for k, v in params.items()},
            "columns": columns,
            "rows": [dict(zip(columns, (json_value(v) for v in row), strict=True)) for row in rows],
            "took_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        return web.json_response(body, dumps=_dumps)

    async def on_cleanup(app: web.Application) -> None:
        app[READER].close()

    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/config", config)
    app.router.add_get("/api/{group:live|history}/{panel:[a-z_]+}", panel)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    app.on_cleanup.append(on_cleanup)
    return app
