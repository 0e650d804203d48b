"""PyFlink plumbing shared by the Flink jobs: one place for the execution environment, Kafka tables,
keying, keyed-state descriptors, operator counters and running a job.

Nothing here runs at import time. ``jobs/<name>.py`` composes its frozen settings in ``main()``
(:func:`connectors.settings.compose`), calls :func:`create_table_env`, creates its Kafka tables with
:func:`kafka_source` / :func:`kafka_sink`, builds its part of the graph from input tables, and hands the
statement set to :func:`run_job`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from connectors.settings import Connections, ConsumerSettings, Settings, StartingOffsets, add_consumer_args

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class PythonExecutionMode(StrEnum):
    """Where PyFlink runs Python operators."""

    THREAD = "thread"  # embedded in the TaskManager JVM (pemja): no serialization, no extra process
    PROCESS = "process"  # a separate Python worker per TaskManager (required by pandas/Arrow UDFs)


class FlinkSettings(Settings):
    """How a Flink job runs: checkpoints, restore, parallelism, its Python workers and its jars."""

    parallelism: int | None = Field(None, alias="CLICKPULSE_FLINK_PARALLELISM", gt=0)
    """``CLICKPULSE_FLINK_PARALLELISM`` / ``--parallelism``: operator parallelism (default: 1 on the local
    mini-cluster; under ``flink run`` the cluster's ``parallelism.default`` / ``-p``)."""
    checkpoint_interval_ms: int = Field(1000, alias="CLICKPULSE_FLINK_CHECKPOINT_INTERVAL_MS", gt=0)
    """``CLICKPULSE_FLINK_CHECKPOINT_INTERVAL_MS`` / ``--checkpoint-interval-ms``: exactly-once commit
    cadence (default 1000). Exactly-once output is readable only after the checkpoint that commits it,
    so this bounds how soon an event reaches the loader and the live dashboard (target: 3 s from the
    collector, ``bench/bench_live.py``); raise it to trade that latency for fewer checkpoints."""
    checkpoint_dir: Path | None = Field(None, alias="CLICKPULSE_FLINK_CHECKPOINT_DIR")
    """``CLICKPULSE_FLINK_CHECKPOINT_DIR``: checkpoint storage (default
    ``<state dir>/flink/<job>/checkpoints``)."""
    restore: str = Field("auto", alias="CLICKPULSE_FLINK_RESTORE")
    """``CLICKPULSE_FLINK_RESTORE`` / ``--restore``: ``auto`` (latest retained checkpoint), ``none`` or a
    path (default ``auto``)."""
    transaction_timeout_ms: int = Field(600_000, alias="CLICKPULSE_KAFKA_TRANSACTION_TIMEOUT_MS")
    """``CLICKPULSE_KAFKA_TRANSACTION_TIMEOUT_MS``: Kafka transaction timeout of the exactly-once sinks
    (default 600000 = 10 min: below the broker's 15 min ``transaction.max.timeout.ms``, far above
    checkpoint interval + restart time)."""
    python_executable: str = Field("", alias="CLICKPULSE_FLINK_PYTHON_EXECUTABLE")
    """``CLICKPULSE_FLINK_PYTHON_EXECUTABLE``: Python of the UDF workers (default: the one running the
    job)."""
    python_execution_mode: PythonExecutionMode = Field(
        PythonExecutionMode.THREAD, alias="CLICKPULSE_FLINK_PYTHON_EXECUTION_MODE"
    )
    """``CLICKPULSE_FLINK_PYTHON_EXECUTION_MODE``: ``thread`` (embedded in the JVM, default) or ``process``
    for the keyed Python operators of sessionize and triggers (ingest's vectorized stage always runs in
    process mode)."""
    jars_dir: Path | None = Field(None, alias="CLICKPULSE_MAVEN_JARS_DIR")
    """``CLICKPULSE_MAVEN_JARS_DIR``: where ``make jars`` put the Maven-resolved jars (default
    ``<repo>/.clickpulse/jars``)."""
    watermark_max_lead_ms: int = Field(300_000, alias="CLICKPULSE_FLINK_WATERMARK_MAX_LEAD_MS", ge=0)
    """``CLICKPULSE_FLINK_WATERMARK_MAX_LEAD_MS``: how far ahead of its Kafka record time (when ingest
    wrote it) an ``events.enriched`` event may move the watermarks of sessionize and triggers; an event
    further ahead keeps its event time for sessions and rules but drives the watermark as if it were
    this far ahead (default 300000 = 5 min)."""
    rest_url: str = Field("", alias="CLICKPULSE_FLINK_REST_URL")
    """``CLICKPULSE_FLINK_REST_URL``: JobManager REST URL for the counter log and ``clickpulse status``
    (default: a job's local mini-cluster's, on a free loopback port; empty under ``flink run`` and for
    ``clickpulse status`` unless set)."""
    state_changelog: bool = Field(True, alias="CLICKPULSE_FLINK_STATE_CHANGELOG")
    """``CLICKPULSE_FLINK_STATE_CHANGELOG``: Flink's changelog state backend over RocksDB (default true). A
    checkpoint then uploads the keyed state's changes since the last one in the background, where RocksDB
    alone flushed every instance on its task's thread: at 1,000 events/s that held the deduplicating,
    sessions and trigger tasks 28–64 ms per 1 s checkpoint (median; up to 141 ms), and the events behind
    them with it. RocksDB is still snapshotted every minute (Flink's periodic materialization), which
    bounds the changelog kept on disk; checkpoints taken without the changelog restore into it. A restore
    (``--restore``) then claims its checkpoint or savepoint (Flink's ``CLAIM`` mode, which the changelog
    requires): the job deletes it once newer checkpoints subsume it, so copy a savepoint to keep it. Under
    ``flink run`` it applies only with ``CLICKPULSE_FLINK_CHANGELOG_DIR`` (else the cluster's configuration
    decides), and ``--fromSavepoint`` needs ``--claimMode claim``."""
    changelog_dir: Path | None = Field(None, alias="CLICKPULSE_FLINK_CHANGELOG_DIR")
    """``CLICKPULSE_FLINK_CHANGELOG_DIR``: where the changelog state backend writes the state changes, a
    directory as durable as the checkpoints (default ``<state dir>/flink/<job>/changelog``; under ``flink
    run``: none, see ``CLICKPULSE_FLINK_STATE_CHANGELOG``)."""
    python_state_sampler: bool = Field(False, alias="CLICKPULSE_FLINK_PYTHON_STATE_SAMPLER")
    """``CLICKPULSE_FLINK_PYTHON_STATE_SAMPLER``: keep the sampling thread Beam starts for every bundle of
    a Python UDF (default false: the ingest stage's workers start Beam's state sampler without it, which
    spares the pipeline's source task 0.6-0.8 ms of waiting per bundle on average, up to 5 ms; see
    ``connectors.python_worker`` and ``bench_bundle_sampler``).
    Set true if a Beam upgrade disagrees with that."""
    options: str = Field("", alias="CLICKPULSE_FLINK_OPTIONS")
    """``CLICKPULSE_FLINK_OPTIONS``: more Flink configuration for every job, ``key=value`` entries
    separated by ``;`` or newlines, applied last, over what clickpulse sets (default empty). For tuning
    what clickpulse has no setting for, e.g. ``state.backend.rocksdb.thread.num=4``; the
    job logs the keys it applies (not the values). Under ``flink run``, ``-D`` and the cluster's
    configuration cannot change a key the job sets itself (``docs/flink-run.md``); this can."""

    @field_validator("options")
    @classmethod
    def _options_parse(cls, v: str) -> str:
        parse_flink_options(v)
        return v

    def extra_options(self) -> dict[str, str]:
        """:attr:`options` as a mapping."""
        return parse_flink_options(self.options)


def parse_flink_options(text: str) -> dict[str, str]:
    """``key=value`` entries separated by ``;`` or newlines (blank entries skipped) as a mapping.

    Raises ``ValueError`` for an entry without ``=`` or with an empty key.
    """
    out: dict[str, str] = {}
    for entry in re.split(r"[;\n]", text):
        if not entry.strip():
            continue
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"a Flink option must be key=value, not {entry.strip()!r}")
        out[key.strip()] = value.strip()
    return out


def add_flink_args(p: argparse.ArgumentParser) -> None:
    """The command-line options of :class:`FlinkSettings`."""
    p.add_argument("--parallelism", type=int, default=None, help="operator parallelism (default 1)")
    p.add_argument(
        "--restore", default=None, help="auto (latest checkpoint, default), none, or a checkpoint path"
    )
    p.add_argument(
        "--checkpoint-interval-ms", type=int, default=None, help="checkpoint interval in ms (default 1000)"
    )


def job_options(
    job: str,
    argv: Sequence[str] | None,
    add_args: Callable[[argparse.ArgumentParser], None],
    *,
    shared_flags: bool = False,
) -> dict[str, Any]:
    """Parse a job's command line: the consumer and Flink options plus the job's own (``add_args``).

    Returns the parsed values by field name (``None`` = not given), for :func:`connectors.settings.compose`.
    ``shared_flags``: parts may declare the same flag (the pipeline); it then sets that field in each.
    """
    p = argparse.ArgumentParser(
        prog=f"jobs.{job}",
        description=f"clickpulse {job} job",
        conflict_handler="resolve" if shared_flags else "error",
    )
    add_consumer_args(p)
    add_flink_args(p)
    add_args(p)
    return vars(p.parse_args(list(argv) if argv is not None else None))


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


#: How often the changelog state backend snapshots RocksDB (Flink's default is 10 min). The changelog since
#: the last snapshot stays on disk, ~1 KB per raw event in the pipeline (26–50 MB at 1,000 events/s with
#: 1 min, ~150 MB with 3 min). Each snapshot flushes and uploads a RocksDB instance: with 3 min the
#: deduplicating task's made the webhooks of the next ~25 s slow at 1,000 events/s, with 1 min nothing
#: stood out (bench/RESULTS.md, 2026-12-07 21:21–23:21).
CHANGELOG_MATERIALIZE_INTERVAL = "1 min"


def flink_config(job: str, s: FlinkSettings, state_dir: Path) -> dict[str, str]:
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
        # Universal (size-tiered) compaction: every 1 s checkpoint flushes small files of random keys
        # (message ids, user keys), and the default leveled compaction merged each few of them into the
        # whole of L1 (up to 256 MB), a cost that grew with the state: from 0.4 to 10 CPU-s per minute in
        # a pipeline's first 7 minutes at 1,000 events/s. Universal merges runs of similar size instead
        # (bench/RESULTS.md, 2026-12-07 18:46). Checkpoints taken with leveled compaction restore.
        "state.backend.rocksdb.compaction.style": "UNIVERSAL",
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
        ckpt = (s.checkpoint_dir or state_dir / "flink" / job / "checkpoints").resolve()
        ckpt.mkdir(parents=True, exist_ok=True)
        conf["execution.checkpointing.dir"] = ckpt.as_uri()
    if s.state_changelog and (not cluster or s.changelog_dir is not None):
        changelog = (s.changelog_dir or state_dir / "flink" / job / "changelog").resolve()
        changelog.mkdir(parents=True, exist_ok=True)
        conf.update(
            {
                # each checkpoint persists the changes since the last one, off the task threads; RocksDB's
                # own snapshot (a memtable flush on the task thread) runs every materialization interval
                "state.changelog.enabled": "true",
                "state.changelog.storage": "filesystem",
                "state.changelog.dstl.dfs.base-path": changelog.as_uri(),
                "state.changelog.periodic-materialize.interval": CHANGELOG_MATERIALIZE_INTERVAL,
            }
        )
    elif not s.state_changelog:
        conf["state.changelog.enabled"] = "false"
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
    if conf.get("state.changelog.enabled") == "true" and "execution.state-recovery.path" in conf:
        # The changelog state backend cannot take the full snapshot that NO_CLAIM (the default) forces
        # after a restore: the job would restore and then fail its first checkpoint. CLAIM hands the
        # snapshot to the job, which deletes it once newer checkpoints subsume it.
        conf["execution.state-recovery.claim-mode"] = "CLAIM"
    return conf


def embedded_python_path() -> None:
    """Let the JVM-embedded interpreter (THREAD mode, pemja) import this repo and this venv's packages.

    PyFlink starts the JVM from this process, so it inherits ``PYTHONPATH``; the embedded interpreter
    builds its ``sys.path`` from it. Call it from ``main()`` before :func:`create_table_env`.
    """
    paths = [str(REPO_ROOT), sysconfig.get_paths()["purelib"]]
    existing = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *([existing] if existing else [])])


def python_operator_options(s: FlinkSettings) -> dict[str, str]:
    """Flink options of a job whose keyed operators run in Python: the execution mode of
    :class:`FlinkSettings` (in THREAD mode the embedded interpreter must find our packages, see
    :func:`embedded_python_path`, which this calls)."""
    if s.python_execution_mode is PythonExecutionMode.THREAD:
        embedded_python_path()
    return {"python.execution-mode": s.python_execution_mode.value}


BOUNDED_OPTIONS = {"table.exec.source.idle-timeout": "0 ms"}
"""Options of a bounded run (``--bounded``). No source idleness: every partition ends, and its end moves
the watermark on. Idleness only did harm there: a source reader that had sent nothing for the timeout
while the job was starting on a loaded box counted as idle, so the other readers' end ("the end of
time") became the keyed operators' watermark, every pending timer fired, and the idle reader's events
arrived after the end of time, their timers never to fire (the engines' comparison test lost an action
so in about one run in five)."""


def create_table_env(
    job: str,
    s: FlinkSettings,
    state_dir: Path,
    extra: Mapping[str, str] | None = None,
    *,
    bounded: bool = False,
) -> tuple[Any, Any]:
    """``(env, t_env)``: a ``StreamExecutionEnvironment`` and its ``StreamTableEnvironment`` for ``job``.

    ``extra`` overrides :func:`flink_config`; a job with keyed Python operators passes
    :func:`python_operator_options` in it. ``bounded`` (``--bounded``: every source ends) turns source
    idleness off (:data:`BOUNDED_OPTIONS`).
    """
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import EnvironmentSettings, StreamTableEnvironment

    conf = Configuration()
    options = {**flink_config(job, s, state_dir), **(extra or {})}
    if bounded:
        options.update(BOUNDED_OPTIONS)
    given = s.extra_options()
    if given:
        log.info("Flink options from CLICKPULSE_FLINK_OPTIONS: %s", ", ".join(sorted(given)))
        options.update(given)
    for k, v in options.items():
        conf.set_string(k, v)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env, EnvironmentSettings.new_instance().in_streaming_mode().build())
    return env, t_env


# ------------------------------------------------------------------------------------------ Kafka


def _quote_option(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def quote_identifier(name: str) -> str:
    """A SQL identifier in backquotes."""
    return "`" + name.replace("`", "``") + "`"


def sql_string(text: str) -> str:
    """A SQL string literal."""
    return _quote_option(text)


def sql_interval(ms: int) -> str:
    """A SQL ``INTERVAL`` of ``ms`` milliseconds (0 to 999 days).

    Day-time, ``DAY(3) TO SECOND(3)``: Flink accepts a leading precision of at most 3, and a plain
    ``INTERVAL 'n' SECOND`` has the default leading precision 2, so it fails from 100 s on.
    """
    if not 0 <= ms < 1000 * 86_400_000:
        raise ValueError(f"interval out of range: {ms} ms")
    days, rest = divmod(ms, 86_400_000)
    hours, rest = divmod(rest, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"INTERVAL '{days} {hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}' DAY(3) TO SECOND(3)"


def with_clause(options: Mapping[str, str]) -> str:
    """``WITH (...)`` with every key and value quoted safely."""
    return (
        "WITH (\n  "
        + ",\n  ".join(f"{_quote_option(k)} = {_quote_option(v)}" for k, v in options.items())
        + "\n)"
    )


def create_table(t_env: Any, name: str, columns: str, options: Mapping[str, str]) -> None:
    """``CREATE TEMPORARY TABLE name (columns) WITH (options)``."""
    t_env.execute_sql(
        f"CREATE TEMPORARY TABLE {quote_identifier(name)} (\n{columns}\n) {with_clause(options)}"
    )


def _client_properties(conn: Connections) -> dict[str, str]:
    return {f"properties.{k}": v for k, v in conn.kafka_properties().items()}


def kafka_source_options(
    conn: Connections,
    consumer: ConsumerSettings,
    topic: str,
    group_id: str,
    *,
    key_fields: str | None = None,
    value_format: str = "raw",
) -> dict[str, str]:
    """Options of a Kafka source table reading ``topic`` (read_committed)."""
    startup = {
        StartingOffsets.EARLIEST: "earliest-offset",
        StartingOffsets.LATEST: "latest-offset",
        StartingOffsets.COMMITTED: "group-offsets",
    }[consumer.starting_offsets]
    opts = {
        "connector": "kafka",
        "topic": topic,
        **_client_properties(conn),
        "properties.group.id": group_id,
        "properties.isolation.level": "read_committed",
        "properties.auto.offset.reset": "earliest",
        "properties.partition.discovery.interval.ms": "60000",
        "scan.startup.mode": startup,
        "value.format": value_format,
    }
    if key_fields:
        opts.update({"key.format": "raw", "key.fields": key_fields, "value.fields-include": "EXCEPT_KEY"})
    if consumer.bounded:
        opts["scan.bounded.mode"] = "latest-offset"
    return opts


#: How long an exactly-once Kafka sink waits to fill a record batch (see :func:`kafka_sink_options`).
EXACTLY_ONCE_LINGER_MS = 100
#: The record batch size of exactly-once Kafka sinks (the client's default is 16 KiB).
EXACTLY_ONCE_BATCH_BYTES = 256 * 1024


def kafka_sink_options(
    conn: Connections,
    flink: FlinkSettings,
    topic: str,
    transactional_id_prefix: str,
    *,
    exactly_once: bool = True,
) -> dict[str, str]:
    """Options of a Kafka sink table with a raw ``k`` key column and raw ``v`` value column.

    Exactly-once sinks batch for up to :data:`EXACTLY_ONCE_LINGER_MS`: their records become readable only
    when the checkpoint commits the transaction, and the writer flushes before every checkpoint, so
    lingering adds no latency; it cuts the per-batch cost (record batch header, lz4 frame and checksum,
    one produce request) that dominated the sink threads at 5 ms."""
    opts = {
        "connector": "kafka",
        "topic": topic,
        **_client_properties(conn),
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
                "properties.transaction.timeout.ms": str(flink.transaction_timeout_ms),
                "properties.linger.ms": str(EXACTLY_ONCE_LINGER_MS),
                "properties.batch.size": str(EXACTLY_ONCE_BATCH_BYTES),
            }
        )
    else:
        opts["sink.delivery-guarantee"] = "at-least-once"
    return opts


def create_kafka_sinks(
    t_env: Any, conn: Connections, flink: FlinkSettings, group_id: str, sinks: Mapping[str, str]
) -> None:
    """Exactly-once ``(k STRING, v BYTES)`` sink tables, ``{table name: contract topic}``; each one's
    transactional id prefix is ``<group_id>-<topic>``."""
    for name, topic in sinks.items():
        create_table(
            t_env,
            name,
            "  k STRING,\n  v BYTES",
            kafka_sink_options(conn, flink, conn.topic(topic), f"{group_id}-{topic}"),
        )


#: The enriched event's ``event_time_ms`` (NULL when missing or malformed), parsed in the JVM.
EVENT_TIME_MS_SQL = "TRY_CAST(JSON_VALUE(CAST(v AS STRING), '$.event_time_ms') AS BIGINT)"

#: The event time of an ``events.enriched`` record: its JSON ``event_time_ms`` (parsed in the JVM), or the
#: Kafka record time ``kafka_ts`` when that is missing or malformed.
ENRICHED_EVENT_TIME_SQL = f"COALESCE(TO_TIMESTAMP_LTZ({EVENT_TIME_MS_SQL}, 3), kafka_ts)"


def watermark_time_sql(max_lead_ms: int) -> str:
    """The time an enriched record drives the watermark with: its ``event_time``, but at most
    ``max_lead_ms`` after its Kafka record time ``kafka_ts`` (when ingest wrote it)."""
    return f"LEAST(event_time, kafka_ts + {sql_interval(max_lead_ms)})"


def enriched_source_columns(out_of_orderness_ms: int, max_lead_ms: int) -> str:
    """The columns of the ``events.enriched`` source table (see :func:`create_enriched_source`)."""
    return f"""  k STRING,
  v BYTES,
  kafka_ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL,
  event_time AS {ENRICHED_EVENT_TIME_SQL},
  WATERMARK FOR event_time AS {watermark_time_sql(max_lead_ms)} - {sql_interval(out_of_orderness_ms)}"""


def create_enriched_source(
    t_env: Any,
    conn: Connections,
    consumer: ConsumerSettings,
    group_id: str,
    out_of_orderness_ms: int,
    max_lead_ms: int,
    extra: Mapping[str, str] | None = None,
    name: str = "enriched_events",
) -> Any:
    """The ``events.enriched`` source table: key ``k`` (user_key), value ``v`` (the event's JSON bytes)
    and the rowtime ``event_time``, taken in the JVM from the JSON ``event_time_ms`` (the Kafka record
    time when it is missing or malformed), with per-partition watermarks
    ``LEAST(event_time, kafka_ts + max_lead) - out_of_orderness``.

    ``kafka_ts`` is the record's Kafka timestamp, i.e. when ingest wrote it: ingest accepts events up to
    a day ahead of ``received_at``, and without the clamp a handful of such events would move the
    watermark a day ahead and make every normal event late (``docs/adr/004-sessions.md``). The rowtime
    stays the real event time; the keyed operators read their event time from the JSON anyway.
    Returns the table (also registered as ``name``).
    """
    create_table(
        t_env,
        name,
        enriched_source_columns(out_of_orderness_ms, max_lead_ms),
        {
            **kafka_source_options(conn, consumer, conn.topic("events.enriched"), group_id, key_fields="k"),
            **(extra or {}),
        },
    )
    return t_env.from_path(name)


def with_event_time(
    t_env: Any,
    stream: Any,
    out_of_orderness_ms: int | None = None,
    event_time_ms_sql: str = EVENT_TIME_MS_SQL,
) -> Any:
    """A table over ``stream`` (``k`` user_key, ``v`` enriched event JSON, e.g. ingest's output inside one
    job graph) with the rowtime ``event_time`` from the JSON ``event_time_ms``, or from what
    ``event_time_ms_sql`` says (e.g. a column of ``stream`` holding it already).

    Watermarks: ``event_time - out_of_orderness`` generated here, in the JVM; or, with
    ``out_of_orderness_ms=None``, the ones already in the stream (``SOURCE_WATERMARK()``: e.g. per-partition
    watermarks of the Kafka source the stream comes from, which a generator after the partitions merged
    could not reproduce). The in-graph counterpart of :func:`create_enriched_source`.
    """
    from pyflink.table import Schema

    strategy = (
        "SOURCE_WATERMARK()"
        if out_of_orderness_ms is None
        else f"event_time - {sql_interval(out_of_orderness_ms)}"
    )
    schema = (
        Schema.new_builder()
        .column_by_expression("event_time", f"TO_TIMESTAMP_LTZ(COALESCE({event_time_ms_sql}, 0), 3)")
        .watermark("event_time", strategy)
        .build()
    )
    return t_env.from_data_stream(stream, schema)


#: The user_key of an enriched event from its Kafka key, else from its JSON (for keying in the JVM). A
#: ``CASE``, not ``COALESCE(k, JSON_VALUE(…))``: Flink evaluates every argument of ``COALESCE``, so the
#: JSON was parsed for every event although the key is always there (12 % of the pipeline's JVM samples).
ENRICHED_USER_KEY_SQL = (
    "CASE WHEN k IS NOT NULL THEN k ELSE COALESCE(JSON_VALUE(CAST(v AS STRING), '$.user_key'), '') END"
)


# ------------------------------------------------------------------------------------ keyed operators


def key_by_first_field(t_env: Any, table: Any, value_type: Any) -> Any:
    """A PyFlink ``KeyedStream`` of ``table`` = ``(key STRING, value)``, keyed in the JVM; the keyed
    Python function receives ``value`` (typed ``value_type``) with the key as its current key.

    ``DataStream.key_by`` runs a Python operator before the shuffle only to compute the key, which here
    is already a column: a second Python hop per event, for nothing (~2,400 -> ~4,000 events/s for
    sessionize on this box, ``docs/adr/004-sessions.md``). This applies the Java ``KeyByKeySelector``
    PyFlink uses behind that operator straight to the SQL stream. It relies on PyFlink internals
    (``_j_data_stream``, ``KeyedStream``'s constructor): re-check on a PyFlink upgrade.
    """
    from pyflink.common import Types
    from pyflink.datastream.data_stream import KeyedStream
    from pyflink.java_gateway import get_gateway

    key_type = Types.STRING()
    typed = t_env.to_append_stream(table, Types.ROW([key_type, value_type]))
    j_keyed = typed._j_data_stream.keyBy(
        get_gateway().jvm.KeyByKeySelector(), Types.ROW([key_type]).get_java_type_info()
    )
    return KeyedStream(j_keyed, value_type, typed)


def string_value_state(name: str, ttl_ms: int) -> Any:
    """A ``ValueStateDescriptor`` of ``STRING`` with a processing-time TTL (``ttl_ms`` > 0) refreshed on
    every write, expired values never returned.

    Typed ``STRING``: in THREAD mode PyFlink converts ``PRIMITIVE_ARRAY(BYTE)`` state element by element
    into a tuple of ints (and fails on a missing value), while strings cross pemja as they are.
    """
    from pyflink.common import Types
    from pyflink.common.time import Time
    from pyflink.datastream.state import StateTtlConfig, ValueStateDescriptor

    descriptor = ValueStateDescriptor(name, Types.STRING())
    if ttl_ms > 0:
        descriptor.enable_time_to_live(
            StateTtlConfig.new_builder(Time.milliseconds(ttl_ms))
            .set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite)
            .set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired)
            .build()
        )
    return descriptor


def subtask_index(runtime_context: Any) -> int:
    """This subtask's index (0 if it cannot be told). PyFlink 2.2's THREAD-mode context calls a Java
    method Flink 2 moved to ``getTaskInfo()``; go through the wrapped Java context then."""
    try:
        return int(runtime_context.get_index_of_this_subtask())
    except Exception:  # noqa: BLE001 - pemja raises its own exception types
        try:
            java_context = runtime_context._runtime_context  # noqa: SLF001
            return int(java_context.getTaskInfo().getIndexOfThisSubtask())
        except Exception:  # noqa: BLE001
            return 0


class OperatorCounters:
    """Counters of a Python operator, counted in Python (``totals[name] += n`` on the hot path) and
    pushed to Flink counters (``clickpulse.<prefix>_<name>``) at most every ``flush_s`` (each ``inc``
    crosses into the JVM), with a log line ``<label>[subtask]: name=total …`` every ``log_interval_s``.

    ``shared`` names count the same on every subtask (e.g. broadcast rules): only subtask 0 reports them,
    so sums over subtasks stay right.
    """

    def __init__(
        self,
        runtime_context: Any,
        prefix: str,
        names: Iterable[str],
        *,
        label: str,
        log_interval_s: float,
        flush_s: float = 1.0,
        shared: frozenset[str] = frozenset(),
    ) -> None:
        """Register the counters with the operator's metric group."""
        names = tuple(names)
        group = runtime_context.get_metrics_group().add_group("clickpulse")
        self.subtask = subtask_index(runtime_context)
        self.label = label
        self.metrics = {
            n: group.counter(f"{prefix}_{n}") for n in names if not (self.subtask and n in shared)
        }
        self.totals = dict.fromkeys(names, 0)
        self.flushed = dict.fromkeys(names, 0)
        self.flush_s = flush_s
        self.log_interval_s = log_interval_s
        now = time.monotonic()
        self.next_flush = now + flush_s
        self.next_log = now + log_interval_s

    def maybe_flush(self, now: float | None = None) -> None:
        """Push deltas to Flink when ``flush_s`` has passed (and log when the log interval has)."""
        now = time.monotonic() if now is None else now
        if now < self.next_flush:
            return
        self.next_flush = now + self.flush_s
        for name, counter in self.metrics.items():
            delta = self.totals[name] - self.flushed[name]
            if delta:
                counter.inc(delta)
                self.flushed[name] = self.totals[name]
        if now >= self.next_log:
            self.next_log = now + self.log_interval_s
            log.info(
                "%s[%d]: %s", self.label, self.subtask, " ".join(f"{k}={v}" for k, v in self.totals.items())
            )

    def close(self) -> None:
        """Push the last counts and log them."""
        self.next_flush = self.next_log = 0.0
        self.maybe_flush()


# ---------------------------------------------------------------------------------------- running


def submitted_detached(job: str, result: Any, t_env: Any) -> bool:
    """True (after logging the job id) when ``flink run --detached`` submitted the job: the driver must
    return then instead of waiting for a job that runs on after ``flink run`` exits."""
    if not under_flink_run() or t_env.get_config().get("execution.attached", "true").lower() != "false":
        return False
    client = result.get_job_client()
    log.info("%s: submitted as Flink job %s (detached)", job, client.get_job_id() if client else "?")
    return True


Outcome = Literal["detached", "finished", "failed", "stopped"]


def run_job(
    job: str,
    statements: Any,
    t_env: Any,
    flink: FlinkSettings,
    log_interval_ms: int,
    *,
    stop: threading.Event | None = None,
    on_submitted: Callable[[], None] | None = None,
) -> Outcome:
    """Submit ``statements`` and wait for the job, logging its counters every ``log_interval_ms`` (from
    the REST API) and once at the end.

    Without ``stop`` it blocks until the job ends (bounded runs end; unbounded ones run until the process
    is killed) and raises if it failed. With ``stop`` it also returns when ``stop`` is set, after
    cancelling the job (``"stopped"``), and reports a failure as ``"failed"`` (logged).
    ``on_submitted`` runs once the job is submitted (not for a detached submission).
    """
    from connectors.flink_metrics import CounterLogger

    rest = flink.rest_url
    if not rest and not under_flink_run():
        rest = f"http://127.0.0.1:{t_env.get_config().get('rest.port', '')}"
    result = statements.execute()
    if submitted_detached(job, result, t_env):
        return "detached"
    if on_submitted is not None:
        on_submitted()
    if rest:
        log.info("%s: Flink REST API (metrics, job status) at %s", job, rest)
    counters = CounterLogger(job, rest, log_interval_ms / 1000) if rest else None
    if counters is not None:
        counters.start()
    try:
        if stop is None:
            result.wait()
            return "finished"
        return _wait_or_cancel(job, result, stop)
    finally:
        if counters is not None:
            counters.stop()
            counters.poll()  # final counts while the job is still known to the JobManager


def _wait_or_cancel(job: str, result: Any, stop: threading.Event) -> Outcome:
    done = threading.Event()
    failure: list[BaseException] = []

    def wait() -> None:
        try:
            result.wait()
        except Exception as exc:  # noqa: BLE001 - reported below
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=wait, name=f"{job}-job", daemon=True).start()
    while not stop.is_set() and not done.is_set():
        stop.wait(0.5)
    if done.is_set():
        if failure:
            log.error("%s job failed: %s", job, failure[0])
            return "failed"
        return "finished"
    log.info("cancelling the Flink job")
    try:
        result.get_job_client().cancel().result(30)
    except Exception as exc:  # noqa: BLE001 - the JVM may already be gone (SIGTERM to the group)
        log.debug("cancel: %s", exc)
    return "stopped"
