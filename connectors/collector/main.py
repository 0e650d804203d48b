"""The collector command: ``clickpulse collector`` and ``python -m connectors.collector``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from connectors.collector.settings import WRITE_KEY_VAR, CollectorSettings, add_collector_args
from connectors.settings import Connections, environment

if TYPE_CHECKING:
    from connectors.collector.app import Collector

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 2 when no write key is configured."""
    from connectors.collector.app import Collector
    from connectors.collector.sink import KafkaSink  # aiohttp and kafka only when serving, not for --help

    env = environment()
    settings = CollectorSettings.from_env(env, {"host": args.host, "port": args.port})
    conn = Connections.from_env(env)
    if not settings.write_keys():
        log.error("no write key: set %s (comma-separated for several)", WRITE_KEY_VAR)
        return 2
    sink = KafkaSink(
        conn.kafka_bootstrap_servers,
        conn.topic("events.raw"),
        ack_timeout_ms=settings.ack_timeout_ms,
        security=conn.kafka_security_options(),
    )
    collector = Collector(settings, sink)
    try:
        asyncio.run(_serve_until_signal(collector))
    finally:
        sink.close()
        log.info("collector stopped: %s", dict(collector.counters))
    return 0


async def _serve_until_signal(collector: Collector) -> None:
    from connectors.collector.app import serve

    task = asyncio.ensure_future(serve(collector))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m connectors.collector``."""
    p = argparse.ArgumentParser(prog="python -m connectors.collector", description=__doc__)
    add_collector_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    return run(args)
