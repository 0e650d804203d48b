"""Load job: ``events.enriched`` -> ClickHouse ``events``, ``sessions`` -> ``sessions``, effectively once.

Run it as ``python -m jobs.load [options]`` or ``clickpulse run load``. A Kafka consumer-group job, not a
Flink job (see ``docs/adr/003-loader-exactly-once.md``); the work is in :mod:`connectors.loader`. Settings
come from the command line, then the environment, then ``.clickpulse/stack.env``; they are read once, in
:func:`main`, into a frozen :class:`LoadSettings`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from connectors.loader import Loader, LoaderConfig, LoaderCounters, StartingOffsets

log = logging.getLogger("clickpulse.load")

JOB = "load"


class LoadSettings(BaseSettings):
    """Settings of the load job. Each field's docstring names its environment variable / option."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", alias="KAFKA_BOOTSTRAP_SERVERS")
    """``KAFKA_BOOTSTRAP_SERVERS``: Kafka bootstrap servers (default ``127.0.0.1:9092``)."""
    clickhouse_url: SecretStr = Field(SecretStr("http://127.0.0.1:8123"), alias="CLICKHOUSE_URL")
    """``CLICKHOUSE_URL``: ``http(s)://[user:password@]host:port`` (default ``http://127.0.0.1:8123``)."""
    database: str = Field("clickpulse", alias="CLICKPULSE_DATABASE")
    """``CLICKPULSE_DATABASE`` / ``--database``: target ClickHouse database (default ``clickpulse``)."""
    topic_prefix: str = Field("", alias="CLICKPULSE_TOPIC_PREFIX")
    """``CLICKPULSE_TOPIC_PREFIX``: prefix of every contract topic (default empty)."""
    group_id: str = Field("clickpulse-load", alias="CLICKPULSE_LOAD_GROUP_ID")
    """``CLICKPULSE_LOAD_GROUP_ID`` / ``--group-id``: consumer group (default ``clickpulse-load``)."""
    starting_offsets: StartingOffsets = Field(StartingOffsets.COMMITTED, alias="CLICKPULSE_STARTING_OFFSETS")
    """``CLICKPULSE_STARTING_OFFSETS`` / ``--starting-offsets``: earliest, latest or committed (default;
    falls back to earliest). Pending intents are replayed first in every mode, and records already in
    ClickHouse (below the high-water marks) are never loaded twice, so ``earliest`` is safe."""
    batch_max_rows: int = Field(20_000, alias="CLICKPULSE_LOAD_BATCH_MAX_ROWS", gt=0)
    """``CLICKPULSE_LOAD_BATCH_MAX_ROWS`` / ``--batch-max-rows``: rows per batch (default 20000)."""
    batch_max_seconds: float = Field(1.0, alias="CLICKPULSE_LOAD_BATCH_MAX_SECONDS", gt=0)
    """``CLICKPULSE_LOAD_BATCH_MAX_SECONDS`` / ``--batch-max-seconds``: max age of a batch (default 1.0):
    at most about one insert per table per second, as ClickHouse likes."""
    retry_initial_s: float = Field(0.2, alias="CLICKPULSE_LOAD_RETRY_INITIAL_S", gt=0)
    """``CLICKPULSE_LOAD_RETRY_INITIAL_S``: first retry delay when ClickHouse/Kafka fail (default 0.2)."""
    retry_max_s: float = Field(10.0, alias="CLICKPULSE_LOAD_RETRY_MAX_S", gt=0)
    """``CLICKPULSE_LOAD_RETRY_MAX_S``: cap of the exponential backoff (default 10)."""
    insert_timeout_s: float = Field(120.0, alias="CLICKPULSE_LOAD_INSERT_TIMEOUT_S", gt=0)
    """``CLICKPULSE_LOAD_INSERT_TIMEOUT_S``: HTTP timeout of one insert (default 120)."""
    log_interval_s: float = Field(10.0, alias="CLICKPULSE_LOG_INTERVAL_S", gt=0)
    """``CLICKPULSE_LOG_INTERVAL_S``: period of the one-line counter log (default 10)."""
    session_timeout_ms: int = Field(10_000, alias="CLICKPULSE_LOAD_SESSION_TIMEOUT_MS", ge=1000)
    """``CLICKPULSE_LOAD_SESSION_TIMEOUT_MS``: consumer-group session timeout, i.e. how long the partitions of
    a crashed loader stay blocked (default 10000; the broker's minimum is 6000)."""
    bounded: bool = Field(False, alias="CLICKPULSE_BOUNDED")
    """``CLICKPULSE_BOUNDED`` / ``--bounded``: stop once caught up with the offsets seen at start."""
    migrate: bool = Field(False, alias="CLICKPULSE_LOAD_MIGRATE")
    """``CLICKPULSE_LOAD_MIGRATE`` / ``--migrate``: apply pending migrations before loading (default off)."""
    fail_after_insert: int = Field(0, alias="CLICKPULSE_LOADER_FAIL_AFTER_INSERT", ge=0)
    """``CLICKPULSE_LOADER_FAIL_AFTER_INSERT``: **test hook** — exit with status 17 right after the N-th
    insert, before its offsets are committed (simulates a crash mid-batch). 0 = off (default)."""

    def topic(self, name: str) -> str:
        """Full name of a contract topic."""
        return f"{self.topic_prefix}{name}"

    def loader_config(self) -> LoaderConfig:
        """The :class:`connectors.loader.LoaderConfig` these settings describe."""
        return LoaderConfig(
            bootstrap_servers=self.kafka_bootstrap_servers,
            clickhouse_url=self.clickhouse_url.get_secret_value(),
            database=self.database,
            events_topic=self.topic("events.enriched"),
            sessions_topic=self.topic("sessions"),
            dlq_topic=self.topic("events.dlq"),
            group_id=self.group_id,
            starting_offsets=self.starting_offsets,
            batch_max_rows=self.batch_max_rows,
            batch_max_seconds=self.batch_max_seconds,
            retry_initial_s=self.retry_initial_s,
            retry_max_s=self.retry_max_s,
            insert_timeout_s=self.insert_timeout_s,
            log_interval_s=self.log_interval_s,
            session_timeout_ms=self.session_timeout_ms,
            bounded=self.bounded,
            fail_after_inserts=self.fail_after_insert,
        )


def load_settings(home: Path | None = None, **overrides: Any) -> LoadSettings:
    """Settings from ``overrides`` (e.g. command-line options; ``None`` values ignored), the environment
    and ``<home>/stack.env`` (``CLICKPULSE_HOME``, default ``.clickpulse``), in that order of precedence."""
    from connectors.settings import by_alias, home_dir

    given = by_alias(LoadSettings, {k: v for k, v in overrides.items() if v is not None})
    env_file = (home or home_dir()) / "stack.env"
    if env_file.is_file():
        return LoadSettings(_env_file=env_file, **given)
    return LoadSettings(**given)


def run(settings: LoadSettings) -> LoaderCounters:
    """Run the loader in this thread until SIGTERM/SIGINT (or, when bounded, until caught up).

    Installs signal handlers when called from the main thread (restored afterwards).
    """
    if settings.migrate:
        from connectors.migrate import migrate

        applied = migrate(settings.clickhouse_url.get_secret_value(), settings.database)
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The load job's command-line options (shared with ``clickpulse run load``)."""
    p.add_argument("--group-id", default=None, help="consumer group (default clickpulse-load)")
    p.add_argument(
        "--starting-offsets",
        choices=[s.value for s in StartingOffsets],
        default=None,
        help="where to start without committed offsets (default committed, falling back to earliest)",
    )
    p.add_argument("--database", default=None, help="ClickHouse database (default clickpulse)")
    p.add_argument("--batch-max-rows", type=int, default=None, help="rows per batch (default 20000)")
    p.add_argument("--batch-max-seconds", type=float, default=None, help="max batch age (default 1.0)")
    p.add_argument("--bounded", action="store_true", default=None, help="stop once caught up")
    p.add_argument("--migrate", action="store_true", default=None, help="apply pending migrations first")


def settings_from_args(args: argparse.Namespace) -> LoadSettings:
    """:class:`LoadSettings` from parsed :func:`add_arguments` options plus the environment."""
    return load_settings(
        group_id=args.group_id,
        starting_offsets=args.starting_offsets,
        database=args.database,
        batch_max_rows=args.batch_max_rows,
        batch_max_seconds=args.batch_max_seconds,
        bounded=args.bounded,
        migrate=args.migrate,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jobs.load``; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m jobs.load", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("kafka", "urllib3", "clickhouse_connect"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = settings_from_args(args)
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
