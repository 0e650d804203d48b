"""PyFlink plumbing shared by the jobs: settings common to every job, the environment, Kafka DDL.

Nothing here runs at import time. ``jobs/<name>.py`` builds its frozen settings in ``main()``, calls
:func:`create_table_env` and then only wires sources, operators and sinks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class StartingOffsets(StrEnum):
    """Where a job starts reading when it has no checkpoint to restore."""

    EARLIEST = "earliest"
    LATEST = "latest"
    COMMITTED = "committed"  # the group's committed offsets, falling back to earliest


class JobSettings(BaseSettings):
    """Settings every job has. Environment variables are named in each field's docstring."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", alias="KAFKA_BOOTSTRAP_SERVERS")
    """``KAFKA_BOOTSTRAP_SERVERS``: Kafka bootstrap servers (default ``127.0.0.1:9092``)."""
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"), alias="REDIS_URL")
    """``REDIS_URL``: Redis for identity links and profiles (default ``redis://127.0.0.1:6379/0``)."""
    topic_prefix: str = Field("", alias="CLICKPULSE_TOPIC_PREFIX")
    """``CLICKPULSE_TOPIC_PREFIX``: prefix of every contract topic (default empty)."""
    group_id: str = Field("", alias="CLICKPULSE_GROUP_ID")
    """``CLICKPULSE_GROUP_ID`` / ``--group-id``: consumer group (default ``clickpulse-<job>``)."""
    starting_offsets: StartingOffsets = Field(StartingOffsets.COMMITTED, alias="CLICKPULSE_STARTING_OFFSETS")
    """``CLICKPULSE_STARTING_OFFSETS`` / ``--starting-offsets``: earliest, latest or committed (default)."""
    bounded: bool = Field(False, alias="CLICKPULSE_BOUNDED")
    """``CLICKPULSE_BOUNDED`` / ``--bounded``: stop at the offsets that were latest at start (default off)."""
    parallelism: int | None = Field(None, alias="CLICKPULSE_PARALLELISM", gt=0)
    """``CLICKPULSE_PARALLELISM`` / ``--parallelism``: operator parallelism (default: 1 on the local
    mini-cluster; under ``flink run`` the cluster's ``parallelism.default`` / ``-p``)."""
    checkpoint_interval_ms: int = Field(5000, alias="CLICKPULSE_CHECKPOINT_INTERVAL_MS")
    """``CLICKPULSE_CHECKPOINT_INTERVAL_MS``: exactly-once commit cadence (default 5000)."""
    checkpoint_dir: Path | None = Field(None, alias="CLICKPULSE_CHECKPOINT_DIR")
    """``CLICKPULSE_CHECKPOINT_DIR``: checkpoint storage (default ``<home>/flink/<job>/checkpoints``)."""
    restore: str = Field("auto", alias="CLICKPULSE_RESTORE")
    """``CLICKPULSE_RESTORE`` / ``--restore``: ``auto`` (latest retained checkpoint), ``none`` or a path."""
    transaction_timeout_ms: int = Field(600_000, alias="CLICKPULSE_TRANSACTION_TIMEOUT_MS")
    """``CLICKPULSE_TRANSACTION_TIMEOUT_MS``: Kafka transaction timeout (default 600000 = 10 min: below the
    broker's 15 min ``transaction.max.timeout.ms``, far above checkpoint interval + restart time)."""
    python_executable: str = Field("", alias="CLICKPULSE_PYTHON_EXECUTABLE")
    """``CLICKPULSE_PYTHON_EXECUTABLE``: Python of the UDF workers (default: the one running the job)."""
    jars_dir: Path | None = Field(None, alias="CLICKPULSE_JARS_DIR")
    """``CLICKPULSE_JARS_DIR``: connector jars from ``make jars`` (default ``<repo>/.clickpulse/jars``)."""
    flink_rest_url: str = Field("", alias="CLICKPULSE_FLINK_REST_URL")
    """``CLICKPULSE_FLINK_REST_URL``: JobManager REST URL for the counter log (default: the local
    mini-cluster's, on a free loopback port; empty under ``flink run`` unless set)."""
    home: Path = Field(Path(".clickpulse"), alias="CLICKPULSE_HOME")
    """``CLICKPULSE_HOME``: local state directory (default ``.clickpulse``)."""

    def topic(self, name: str) -> str:
        """Full name of a contract topic."""
        return f"{self.topic_prefix}{name}"


def connector_jars(jars_dir: Path | None) -> list[str]:
    """``file://`` URLs of the Flink connector jars resolved by ``make jars``."""
    root = (jars_dir or REPO_ROOT / ".clickpulse" / "jars").resolve() / "flink"
    jars = sorted(root.glob("*.jar"))
    if not jars:
        raise FileNotFoundError(f"no Flink connector jars in {root}: run `make jars`")
    return [j.as_uri() for j in jars]


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest completed checkpoint (``chk-N`` with ``_metadata``) under ``checkpoint_dir``."""
    found = [p.parent for p in checkpoint_dir.glob("*/chk-*/_metadata")]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr; re-enable our loggers (PyFlink's import configures logging and disables them)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and name.split(".")[0] in (
            "clickpulse",
            "connectors",
            "jobs",
            "udfs",
        ):
            logger.disabled = False
    for top in ("clickpulse", "connectors", "jobs", "udfs"):  # the gateway later sets root to WARNING
        logging.getLogger(top).setLevel(level)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)


def _free_port() -> int:
    """A free loopback port for the mini-cluster's REST endpoint, chosen *below* the kernel's ephemeral
    range: Flink binds it seconds later (JVM start-up), and a port from the ephemeral range can be taken
    by any outgoing connection (Kafka clients open many) in between. Random, so jobs started at the same
    moment do not pick the same one."""
    import random
    import socket

    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low > 12000:
        rng = random.SystemRandom()
        for _ in range(50):
            port = rng.randrange(10000, low)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def under_flink_run() -> bool:
    """True when ``flink run -py`` started this driver (its PythonDriver hands us the gateway port).

    Then the cluster's configuration and the command line rule (``docs/flink-run.md``): connector jars
    come from ``--jarfile`` (or the cluster's ``lib/``), the restore point from ``--fromSavepoint``, the
    checkpoint storage and the workers' Python from the cluster config / ``--pyExecutable``, unless
    ``CLICKPULSE_JARS_DIR`` / ``CLICKPULSE_CHECKPOINT_DIR`` / ``CLICKPULSE_PYTHON_EXECUTABLE`` /
    ``--restore <path>`` are given explicitly; there is no local REST port and no automatic restore.
    """
    return "PYFLINK_GATEWAY_PORT" in os.environ


def flink_config(job: str, s: JobSettings) -> dict[str, str]:
    """The Flink configuration of a job (checkpointing, state, restore, Python workers)."""
    cluster = under_flink_run()
    conf = {
        "pipeline.name": f"clickpulse-{job}",
        "execution.checkpointing.interval": f"{s.checkpoint_interval_ms} ms",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        "execution.checkpointing.min-pause": f"{max(s.checkpoint_interval_ms // 4, 100)} ms",
        "execution.checkpointing.timeout": "2 min",
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "execution.checkpointing.num-retained": "3",
        "execution.checkpointing.incremental": "true",
        "state.backend.type": "rocksdb",
        "restart-strategy.type": "exponential-delay",
        "table.local-time-zone": "UTC",
        # SQL operators get uids derived from the plan (stable while the plan is unchanged), so state
        # in savepoints maps back to the same operators after a restart or an upgrade.
        "table.exec.uid.generation": "ALWAYS",
        "table.exec.source.idle-timeout": "5 s",
        "python.fn-execution.bundle.time": "100",
        "python.fn-execution.arrow.batch.size": "2000",
        "python.fn-execution.bundle.size": "2000",
    }
    if s.parallelism is not None or not cluster:
        conf["parallelism.default"] = str(s.parallelism or 1)
    if not cluster or s.jars_dir is not None:
        conf["pipeline.jars"] = ";".join(connector_jars(s.jars_dir))
    if not cluster or s.python_executable:
        conf["python.executable"] = s.python_executable or sys.executable
        conf["python.client.executable"] = s.python_executable or sys.executable
    ckpt: Path | None = None
    if not cluster or s.checkpoint_dir is not None:
        ckpt = (s.checkpoint_dir or s.home / "flink" / job / "checkpoints").resolve()
        ckpt.mkdir(parents=True, exist_ok=True)
        conf["execution.checkpointing.dir"] = ckpt.as_uri()
    if not cluster:  # local mini-cluster
        conf["rest.address"] = "127.0.0.1"
        conf["rest.bind-address"] = "127.0.0.1"
        conf["rest.port"] = str(_free_port())
        conf["metrics.fetcher.update-interval"] = "1000"  # fresh numbers for the counter log
        # RocksDB names its info log after the full instance path; under the mini-cluster's deep temp
        # dirs, the temporary instance of a rescaling restore exceeds 255 bytes and the restore fails
        # (FLINK-31743 guards only the main instance). A short local dir keeps every name legal.
        conf["state.backend.rocksdb.localdir"] = str(Path(tempfile.gettempdir()) / "clickpulse-rocksdb")
    if s.restore == "auto":
        latest = latest_checkpoint(ckpt) if ckpt is not None and not cluster else None
        if latest is not None:
            log.info("restoring %s from %s", job, latest)
            conf["execution.state-recovery.path"] = latest.as_uri()
    elif s.restore not in ("", "none"):
        conf["execution.state-recovery.path"] = Path(s.restore).resolve().as_uri()
    return conf


def create_table_env(job: str, s: JobSettings, extra: Mapping[str, str] | None = None) -> Any:
    """A ``StreamTableEnvironment`` configured for ``job`` (returns ``(env, t_env)``)."""
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import EnvironmentSettings, StreamTableEnvironment

    conf = Configuration()
    for k, v in {**flink_config(job, s), **(extra or {})}.items():
        conf.set_string(k, v)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env, EnvironmentSettings.new_instance().in_streaming_mode().build())
    return env, t_env


# ------------------------------------------------------------------------------------------ DDL


def _quote_option(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def with_clause(options: Mapping[str, str]) -> str:
    """``WITH (...)`` with every key and value quoted safely."""
    return (
        "WITH (\n  "
        + ",\n  ".join(f"{_quote_option(k)} = {_quote_option(v)}" for k, v in options.items())
        + "\n)"
    )


def kafka_source_options(
    s: JobSettings, topic: str, group_id: str, *, key_fields: str | None = None, value_format: str = "raw"
) -> dict[str, str]:
    """Options of a Kafka source table reading ``topic`` (read_committed)."""
    startup = {
        StartingOffsets.EARLIEST: "earliest-offset",
        StartingOffsets.LATEST: "latest-offset",
        StartingOffsets.COMMITTED: "group-offsets",
    }[s.starting_offsets]
    opts = {
        "connector": "kafka",
        "topic": topic,
        "properties.bootstrap.servers": s.kafka_bootstrap_servers,
        "properties.group.id": group_id,
        "properties.isolation.level": "read_committed",
        "properties.auto.offset.reset": "earliest",
        "properties.partition.discovery.interval.ms": "60000",
        "scan.startup.mode": startup,
        "value.format": value_format,
    }
    if key_fields:
        opts.update({"key.format": "raw", "key.fields": key_fields, "value.fields-include": "EXCEPT_KEY"})
    if s.bounded:
        opts["scan.bounded.mode"] = "latest-offset"
    return opts


def kafka_sink_options(
    s: JobSettings, topic: str, transactional_id_prefix: str, *, exactly_once: bool = True
) -> dict[str, str]:
    """Options of a Kafka sink table with a raw ``k`` key column and raw ``v`` value column."""
    opts = {
        "connector": "kafka",
        "topic": topic,
        "properties.bootstrap.servers": s.kafka_bootstrap_servers,
        "key.format": "raw",
        "key.fields": "k",
        "value.format": "raw",
        "value.fields-include": "EXCEPT_KEY",
        "sink.partitioner": "default",
        "properties.compression.type": "lz4",
        "properties.linger.ms": "5",
    }
    if exactly_once:
        opts.update(
            {
                "sink.delivery-guarantee": "exactly-once",
                "sink.transactional-id-prefix": transactional_id_prefix,
                "properties.transaction.timeout.ms": str(s.transaction_timeout_ms),
            }
        )
    else:
        opts["sink.delivery-guarantee"] = "at-least-once"
    return opts


def create_table(t_env: Any, name: str, columns: str, options: Mapping[str, str]) -> None:
    """``CREATE TEMPORARY TABLE name (columns) WITH (options)``."""
    t_env.execute_sql(f"CREATE TEMPORARY TABLE {_quote_ident(name)} (\n{columns}\n) {with_clause(options)}")


def env_or_default(name: str, default: str) -> str:
    """Read one environment variable (only from ``main()`` code paths)."""
    return os.environ.get(name, default)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options every job accepts (``clickpulse run <job>`` passes them through)."""
    p.add_argument("--group-id", default=None, help="consumer group (default clickpulse-<job>)")
    p.add_argument(
        "--starting-offsets",
        choices=["earliest", "latest", "committed"],
        default=None,
        help="where to start without a checkpoint (default committed, falling back to earliest)",
    )
    p.add_argument("--parallelism", type=int, default=None, help="operator parallelism (default 1)")
    p.add_argument(
        "--bounded", action="store_const", const=True, default=None, help="stop at today's end offsets"
    )
    p.add_argument(
        "--restore", default=None, help="auto (latest checkpoint, default), none, or a checkpoint path"
    )
    p.add_argument(
        "--checkpoint-interval-ms", type=int, default=None, help="checkpoint interval (default 5000)"
    )


def submitted_detached(job: str, result: Any, t_env: Any) -> bool:
    """True (after logging the job id) when ``flink run --detached`` submitted the job: the driver must
    return then instead of waiting for a job that runs on after ``flink run`` exits."""
    if not under_flink_run() or t_env.get_config().get("execution.attached", "true").lower() != "false":
        return False
    client = result.get_job_client()
    log.info("%s: submitted as Flink job %s (detached)", job, client.get_job_id() if client else "?")
    return True


def execute_and_log(job: str, statements: Any, t_env: Any, s: JobSettings, interval_s: float = 10.0) -> None:
    """Execute a statement set, log the job's counters every ``interval_s`` and once at the end."""
    from connectors.flink_metrics import CounterLogger

    rest = s.flink_rest_url
    if not rest and "PYFLINK_GATEWAY_PORT" not in os.environ:
        rest = f"http://127.0.0.1:{t_env.get_config().get('rest.port', '')}"
    result = statements.execute()
    if submitted_detached(job, result, t_env):
        return
    if rest:
        log.info("%s: Flink REST API (metrics, job status) at %s", job, rest)
    logger = CounterLogger(job, rest, interval_s) if rest else None
    if logger is not None:
        logger.start()
    try:
        result.wait()
    finally:
        if logger is not None:
            logger.stop()
            logger.poll()  # final counts while the job is still known to the JobManager
