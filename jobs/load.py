"""Load job: Kafka -> ClickHouse ``events``, ``sessions`` and ``actions``, effectively once.

``events.enriched`` -> ``events``, ``sessions`` -> ``sessions``, ``actions`` and ``actions.dlq`` ->
``actions`` (status ``fired`` / ``dead_lettered``).

Run it as ``python -m jobs.load [options]`` or ``clickpulse run load``. A Kafka consumer-group job, not a
Flink job (see ``docs/adr/003-loader-exactly-once.md``); the work is in :mod:`connectors.loader`. Settings
come from the command line, then the environment, then ``.clickpulse/stack.env``; they are read once, in
:func:`main`, into a frozen :class:`LoadJobSettings`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from connectors.loader import Loader, LoaderConfig, LoaderCounters
from connectors.runtime import setup_logging
from connectors.settings import (
    Connections,
    ConsumerSettings,
    Settings,
    add_consumer_args,
    compose,
    environment,
    seconds_flag,
)

log = logging.getLogger("clickpulse.load")

JOB = "load"


class LoadSettings(Settings):
    """Options of the loader: batching, retries and its consumer group's liveness."""

    batch_max_rows: int = Field(50_000, alias="CLICKPULSE_LOAD_BATCH_MAX_ROWS", gt=0)
    """``CLICKPULSE_LOAD_BATCH_MAX_ROWS`` / ``--batch-max-rows``: rows per batch (default 50000). Bounds a
    batch in a backlog only (live traffic fills batches by age); fewer, larger inserts cost the views less:
    47k rows/s at 20000, 65-79k at 50000 (bench/RESULTS.md)."""
    batch_max_age_ms: int = Field(250, alias="CLICKPULSE_LOAD_BATCH_MAX_AGE_MS", gt=0)
    """``CLICKPULSE_LOAD_BATCH_MAX_AGE_MS`` / ``--batch-max-age-ms``: max age of a batch (default 250): an
    event waits at most this long in the loader, part of the live dashboard's 3 s budget; at most about
    four inserts per table per second under steady traffic (1000 gives ClickHouse's one per second)."""
    retry_initial_ms: int = Field(200, alias="CLICKPULSE_LOAD_RETRY_INITIAL_MS", gt=0)
    """``CLICKPULSE_LOAD_RETRY_INITIAL_MS``: first retry delay when ClickHouse/Kafka fail (default 200)."""
    retry_max_ms: int = Field(10_000, alias="CLICKPULSE_LOAD_RETRY_MAX_MS", gt=0)
    """``CLICKPULSE_LOAD_RETRY_MAX_MS``: cap of the exponential backoff (default 10000)."""
    reject_attempts: int = Field(3, alias="CLICKPULSE_LOAD_REJECT_ATTEMPTS", gt=0)
    """``CLICKPULSE_LOAD_REJECT_ATTEMPTS``: attempts of an insert ClickHouse refuses because of its rows (a
    constraint, a value the column cannot hold) before the batch is bisected and the refused rows go to
    ``events.dlq`` (default 3)."""
    insert_timeout_ms: int = Field(120_000, alias="CLICKPULSE_LOAD_INSERT_TIMEOUT_MS", gt=0)
    """``CLICKPULSE_LOAD_INSERT_TIMEOUT_MS``: HTTP timeout of one insert (default 120000)."""
    session_timeout_ms: int = Field(10_000, alias="CLICKPULSE_LOAD_SESSION_TIMEOUT_MS", ge=1000)
    """``CLICKPULSE_LOAD_SESSION_TIMEOUT_MS``: consumer-group session timeout, i.e. how long the partitions of
    a crashed loader stay blocked (default 10000; the broker's minimum is 6000)."""
    migrate: bool = Field(False, alias="CLICKPULSE_LOAD_MIGRATE")
    """``CLICKPULSE_LOAD_MIGRATE`` / ``--migrate``: apply pending migrations before loading (default off)."""
    fail_after_insert: int = Field(0, alias="CLICKPULSE_LOAD_FAIL_AFTER_INSERT", ge=0)
    """``CLICKPULSE_LOAD_FAIL_AFTER_INSERT``: **test hook** — exit with status 17 right after the N-th
    insert, before its offsets are committed (simulates a crash mid-batch). 0 = off (default)."""


@dataclass(frozen=True)
class LoadJobSettings:
    """Everything the load job reads. ``consumer.starting_offsets``: pending intents are replayed first in
    every mode, and records already in ClickHouse (below the high-water marks) are never loaded twice, so
    ``earliest`` is safe."""

    connections: Connections
    consumer: ConsumerSettings
    load: LoadSettings

    def loader_config(self) -> LoaderConfig:
        """The :class:`connectors.loader.LoaderConfig` these settings describe."""
        conn, load = self.connections, self.load
        return LoaderConfig(
            bootstrap_servers=conn.kafka_bootstrap_servers,
            clickhouse_url=conn.clickhouse_url.get_secret_value(),
            database=conn.clickhouse_database,
            events_topic=conn.topic("events.enriched"),
            sessions_topic=conn.topic("sessions"),
            dlq_topic=conn.topic("events.dlq"),
            actions_topic=conn.topic("actions"),
            actions_dlq_topic=conn.topic("actions.dlq"),
            group_id=self.consumer.group(JOB),
            starting_offsets=self.consumer.starting_offsets,
            batch_max_rows=load.batch_max_rows,
            batch_max_seconds=load.batch_max_age_ms / 1000,
            retry_initial_s=load.retry_initial_ms / 1000,
            retry_max_s=load.retry_max_ms / 1000,
            reject_attempts=load.reject_attempts,
            insert_timeout_s=load.insert_timeout_ms / 1000,
            log_interval_s=self.consumer.log_interval_ms / 1000,
            session_timeout_ms=load.session_timeout_ms,
            bounded=self.consumer.bounded,
            fail_after_inserts=load.fail_after_insert,
            kafka_security=conn.kafka_security_options(),
        )


def run(settings: LoadJobSettings) -> LoaderCounters:
    """Run the loader in this thread until SIGTERM/SIGINT (or, when bounded, until caught up).

    Installs signal handlers when called from the main thread (restored afterwards).
    """
    if settings.load.migrate:
        from connectors.migrate import migrate

        conn = settings.connections
        applied = migrate(conn.clickhouse_url.get_secret_value(), conn.clickhouse_database)
        log.info("migrations applied: %s", ", ".join(applied) or "none pending")
    loader = Loader(settings.loader_config())
    previous: dict[signal.Signals, Any] = {}

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, finishing the current batch", signal.Signals(signum).name)
        loader.stop()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        return loader.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_load_args(p: argparse.ArgumentParser) -> None:
    """The load job's own command-line options (with :func:`connectors.settings.add_consumer_args`)."""
    p.add_argument("--database", dest="clickhouse_database", default=None, help="ClickHouse database")
    p.add_argument("--batch-max-rows", type=int, default=None, help="rows per batch (default 50000)")
    p.add_argument("--batch-max-age-ms", type=int, default=None, help="max batch age (default 1000)")
    p.add_argument("--batch-max-seconds", dest="batch_max_age_ms", type=seconds_flag, help=argparse.SUPPRESS)
    p.add_argument("--migrate", action="store_true", default=None, help="apply pending migrations first")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jobs.load``; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m jobs.load", description=__doc__.splitlines()[0])
    add_consumer_args(p)
    add_load_args(p)
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = p.parse_args(argv)
    setup_logging(getattr(logging, args.log_level.upper(), logging.INFO))
    run(compose(LoadJobSettings, environment(), vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
