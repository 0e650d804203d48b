"""The live dashboard: an aiohttp app serving static HTML/JS/CSS and one JSON endpoint per panel.

Every panel is a saved query of ``sql/queries`` run with ClickHouse query parameters, as the read-only
ClickHouse user (``CLICKPULSE_CLICKHOUSE_READONLY_USER``), in ``Connections.clickhouse_database``. Run it
with ``clickpulse dashboard`` or ``python -m connectors.dashboard``; ``clickpulse stack up`` starts one.
"""
