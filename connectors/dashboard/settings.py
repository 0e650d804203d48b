"""Settings of the dashboard (``clickpulse dashboard``, ``python -m connectors.dashboard``)."""

from __future__ import annotations

import argparse

from pydantic import Field, SecretStr

from connectors.settings import Settings


class DashboardSettings(Settings):
    """Where the dashboard listens, how often its live panels refresh, and the read-only ClickHouse user
    it reads with (the server and database are :class:`connectors.settings.Connections`')."""

    host: str = Field("127.0.0.1", alias="CLICKPULSE_DASHBOARD_HOST")
    """``CLICKPULSE_DASHBOARD_HOST`` / ``--host``: address to listen on (default ``127.0.0.1``)."""
    port: int = Field(8050, alias="CLICKPULSE_DASHBOARD_PORT", ge=0, le=65535)
    """``CLICKPULSE_DASHBOARD_PORT`` / ``--port``: TCP port, 0 picks a free one (default 8050)."""
    refresh_ms: int = Field(500, alias="CLICKPULSE_DASHBOARD_REFRESH_MS", ge=200, le=2000)
    """``CLICKPULSE_DASHBOARD_REFRESH_MS``: how often the browser refreshes the live panels, 200 to 2000
    (default 500: an event waits up to this long for the page's next refresh, part of the 3 s from the
    collector to the live view; each refresh is five small queries)."""
    query_timeout_ms: int = Field(10_000, alias="CLICKPULSE_DASHBOARD_QUERY_TIMEOUT_MS", gt=0)
    """``CLICKPULSE_DASHBOARD_QUERY_TIMEOUT_MS``: HTTP timeout of one panel query (default 10000)."""
    max_concurrent_queries: int = Field(4, alias="CLICKPULSE_DASHBOARD_MAX_CONCURRENT_QUERIES", gt=0)
    """``CLICKPULSE_DASHBOARD_MAX_CONCURRENT_QUERIES``: panel queries in flight at once; more wait
    (default 4)."""
    clickhouse_readonly_user: str = Field("", alias="CLICKPULSE_CLICKHOUSE_READONLY_USER")
    """``CLICKPULSE_CLICKHOUSE_READONLY_USER``: the read-only ClickHouse user the dashboard reads with
    (``stack up`` writes one for the embedded endpoint; default empty: the user of ``CLICKHOUSE_URL``,
    with a warning)."""
    clickhouse_readonly_password: SecretStr = Field(
        SecretStr(""), alias="CLICKPULSE_CLICKHOUSE_READONLY_PASSWORD"
    )
    """``CLICKPULSE_CLICKHOUSE_READONLY_PASSWORD``: that user's password (default empty)."""


def add_dashboard_args(p: argparse.ArgumentParser) -> None:
    """The command-line options of :class:`DashboardSettings` (``clickpulse dashboard`` has the same)."""
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port, 0 for a free one (default 8050)")
