"""Ingest job: ``events.raw`` -> validate, stitch identity, enrich -> dedup -> ``events.enriched``.

Run it as ``python -m jobs.ingest``, ``clickpulse run ingest`` or ``flink run -py jobs/ingest.py``.

Plan (``EXPLAIN`` shows it):

1. Kafka source ``raw_events`` (key, value bytes, partition, offset, record timestamp = received_at).
2. ``ingest_stage`` — one vectorized (pandas) Python UDF over batches: validation, time normalization,
   identity stitching (Redis, in partition order), enrichment; one classified row per record.
3. The stage's output becomes a stream once (so the Python work is never planned twice), then:
   * invalid rows -> ``events.dlq`` (exactly-once);
   * valid rows -> Flink SQL deduplication on ``message_id`` (keep first row, proctime order; JVM
     keyed state in RocksDB with TTL = the dedup window) -> ``events.enriched`` (exactly-once).

Counters (Flink metrics, and one log line every ``--log-interval-s`` from the driver via
:mod:`connectors.flink_metrics`): records_in, valid, dlq and dlq_reason.<code> and redis_fallbacks
from the stage; duplicates = what the Deduplicate operator read minus what it wrote (= enriched).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field
from pyflink.table import DataTypes
from pyflink.table.udf import FunctionContext, ScalarFunction, udf

from connectors.flink import (
    JobSettings,
    add_common_args,
    create_table,
    create_table_env,
    execute_and_log,
    kafka_sink_options,
    kafka_source_options,
    setup_logging,
)

log = logging.getLogger("clickpulse.ingest")

JOB = "ingest"


class IngestSettings(JobSettings):
    """Settings of the ingest job (plus every :class:`connectors.flink.JobSettings` field)."""

    dedup_window_s: int = Field(24 * 3600, alias="CLICKPULSE_DEDUP_WINDOW_S")
    """``CLICKPULSE_DEDUP_WINDOW_S``: how long a message_id is remembered (default 86400 = 24 h)."""
    max_payload_bytes: int = Field(32 * 1024, alias="CLICKPULSE_MAX_PAYLOAD_BYTES")
    """``CLICKPULSE_MAX_PAYLOAD_BYTES``: larger raw records go to the DLQ as size_exceeded (default 32768)."""
    max_future_s: int = Field(24 * 3600, alias="CLICKPULSE_MAX_FUTURE_S")
    """``CLICKPULSE_MAX_FUTURE_S``: reject events this far ahead of received_at (default 86400)."""
    max_past_s: int = Field(30 * 24 * 3600, alias="CLICKPULSE_MAX_PAST_S")
    """``CLICKPULSE_MAX_PAST_S``: reject events this far behind received_at (default 2592000 = 30 d)."""
    internal_domains: str = Field("", alias="CLICKPULSE_INTERNAL_DOMAINS")
    """``CLICKPULSE_INTERNAL_DOMAINS``: comma-separated hosts counted as internal referrers (default none)."""
    anonymize_ip: bool = Field(False, alias="CLICKPULSE_ANONYMIZE_IP")
    """``CLICKPULSE_ANONYMIZE_IP``: zero the host part of IPs after the geo lookup (default off)."""
    redis_timeout_ms: int = Field(50, alias="CLICKPULSE_REDIS_TIMEOUT_MS")
    """``CLICKPULSE_REDIS_TIMEOUT_MS``: latency bound of one Redis round trip; then fail open (default 50)."""
    redis_prefix: str = Field("clickpulse:", alias="CLICKPULSE_REDIS_PREFIX")
    """``CLICKPULSE_REDIS_PREFIX``: prefix of identity/profile keys (default ``clickpulse:``)."""
    log_interval_s: float = Field(10.0, alias="CLICKPULSE_LOG_INTERVAL_S")
    """``CLICKPULSE_LOG_INTERVAL_S``: period of the one-line counter log (default 10)."""


# ------------------------------------------------------------------------------------------ UDF


@dataclass(frozen=True)
class StageConfig:
    """What the Python workers need from :class:`IngestSettings` (picklable, no secrets logged)."""

    source_topic: str
    max_bytes: int
    max_future_s: int
    max_past_s: int
    internal_domains: tuple[str, ...]
    anonymize_ip: bool
    redis_url: str
    redis_timeout_s: float
    redis_prefix: str
    log_interval_s: float

    @classmethod
    def of(cls, s: IngestSettings) -> StageConfig:
        """Pick the stage's fields out of the job settings."""
        return cls(
            source_topic=s.topic("events.raw"),
            max_bytes=s.max_payload_bytes,
            max_future_s=s.max_future_s,
            max_past_s=s.max_past_s,
            internal_domains=tuple(d.strip() for d in s.internal_domains.split(",") if d.strip()),
            anonymize_ip=s.anonymize_ip,
            redis_url=s.redis_url.get_secret_value(),
            redis_timeout_s=s.redis_timeout_ms / 1000.0,
            redis_prefix=s.redis_prefix,
            log_interval_s=s.log_interval_s,
        )


class IngestStageUdf(ScalarFunction):
    """Vectorized UDF: batches of raw records -> :class:`udfs.ingest.IngestStage` -> classified rows."""

    def __init__(self, config: StageConfig) -> None:
        """Keep the config; stores and metrics are created in :meth:`open` (in the worker)."""
        self.config = config

    def open(self, function_context: FunctionContext) -> None:
        """Create the stage, its Redis stores and the Flink metrics."""
        from connectors.redis_stores import RedisIdentityStore, RedisProfileStore, client
        from udfs.enrich import EnrichOptions, warm_up
        from udfs.ingest import IngestOptions, IngestStage

        c = self.config
        logging.getLogger("clickpulse").setLevel(logging.INFO)  # the worker's root logger is at WARNING
        warm_up()
        r = client(c.redis_url, timeout_s=c.redis_timeout_s)
        self.stage = IngestStage(
            IngestOptions(
                source_topic=c.source_topic,
                max_bytes=c.max_bytes,
                max_future_s=c.max_future_s,
                max_past_s=c.max_past_s,
                enrich=EnrichOptions(internal_domains=c.internal_domains, anonymize_ip=c.anonymize_ip),
            ),
            RedisIdentityStore(r, c.redis_prefix),
            RedisProfileStore(r, c.redis_prefix),
        )
        group = function_context.get_metric_group().add_group("clickpulse")
        self.m_in = group.counter("records_in")
        self.m_valid = group.counter("valid")
        self.m_dlq = group.counter("dlq")
        self.m_fallback = group.counter("redis_fallbacks")
        self.dlq_group = group.add_group("dlq_reason")
        self.m_dlq_reason: dict[str, Any] = {}
        self.next_log = time.monotonic() + c.log_interval_s
        self.last = (0, 0, 0)

    def eval(self, k: Any, v: Any, ts: Any, part: Any, off: Any) -> Any:
        """Process one Arrow batch (pandas Series in, DataFrame of the result row out)."""
        import pandas as pd

        received = ts.to_numpy().astype("datetime64[ms]").astype("int64").tolist()
        out = self.stage.process_batch(v.tolist(), received, part.tolist(), off.tolist(), k.tolist())
        self._count()
        return pd.DataFrame(
            {
                "kind": out.kinds,
                "message_id": out.message_ids,
                "user_key": out.user_keys,
                "payload": out.payloads,
            }
        )

    def _count(self) -> None:
        c = self.stage.counters
        fallbacks = c.identity_fallbacks + c.profile_fallbacks
        d_in, d_valid = c.records_in - self.last[0], c.valid - self.last[1]
        self.m_in.inc(d_in)
        self.m_valid.inc(d_valid)
        self.m_dlq.inc(d_in - d_valid)
        self.m_fallback.inc(fallbacks - self.last[2])
        for reason, n in c.dlq.items():
            counter = self.m_dlq_reason.get(reason)
            if counter is None:
                counter = self.m_dlq_reason[reason] = self.dlq_group.counter(reason)
            counter.inc(n - counter.get_count())
        self.last = (c.records_in, c.valid, fallbacks)
        now = time.monotonic()
        if now >= self.next_log:
            self.next_log = now + self.config.log_interval_s
            log.info("ingest stage: %s", c.line())


STAGE_ROW = DataTypes.ROW(
    [
        DataTypes.FIELD("kind", DataTypes.STRING()),
        DataTypes.FIELD("message_id", DataTypes.STRING()),
        DataTypes.FIELD("user_key", DataTypes.STRING()),
        DataTypes.FIELD("payload", DataTypes.BYTES()),
    ]
)


# ---------------------------------------------------------------------------------------- wiring


def build(t_env: Any, s: IngestSettings) -> Any:
    """Declare tables and return the statement set that runs the job."""
    from pyflink.table import Schema

    group_id = s.group_id or f"clickpulse-{JOB}"
    create_table(
        t_env,
        "raw_events",
        """  k BYTES,
  v BYTES,
  `partition` INT METADATA VIRTUAL,
  `offset` BIGINT METADATA VIRTUAL,
  received_at TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL""",
        kafka_source_options(s, s.topic("events.raw"), group_id, key_fields="k"),
    )
    for name, topic in (("enriched_sink", "events.enriched"), ("dlq_sink", "events.dlq")):
        create_table(
            t_env,
            name,
            "  k STRING,\n  v BYTES",
            kafka_sink_options(s, s.topic(topic), f"{group_id}-{topic}"),
        )
    t_env.create_temporary_function(
        "ingest_stage", udf(IngestStageUdf(StageConfig.of(s)), result_type=STAGE_ROW, func_type="pandas")
    )
    staged = t_env.sql_query(
        "SELECT r.kind AS kind, r.message_id AS message_id, r.user_key AS user_key, r.payload AS payload "
        "FROM (SELECT ingest_stage(k, v, CAST(received_at AS TIMESTAMP(3)), `partition`, `offset`) AS r "
        "FROM raw_events)"
    )
    # Materialize the stage once: both sinks read this stream, so the Python UDF runs once per record.
    stream = t_env.to_data_stream(staged)
    t_env.create_temporary_view(
        "staged",
        t_env.from_data_stream(
            stream, Schema.new_builder().column_by_expression("proc", "PROCTIME()").build()
        ),
    )
    t_env.get_config().set("table.exec.state.ttl", f"{s.dedup_window_s} s")
    statements = t_env.create_statement_set()
    statements.add_insert_sql("INSERT INTO dlq_sink SELECT user_key, payload FROM staged WHERE kind = 'dlq'")
    statements.add_insert_sql(
        "INSERT INTO enriched_sink SELECT user_key, payload FROM ("
        "  SELECT user_key, payload, ROW_NUMBER() OVER (PARTITION BY message_id ORDER BY proc ASC) AS rn"
        "  FROM staged WHERE kind = 'ok'"
        ") WHERE rn = 1"
    )
    return statements


def parse_args(argv: Sequence[str] | None) -> IngestSettings:
    """Settings from the environment (and ``.clickpulse/stack.env``) overridden by the command line."""
    from connectors.settings import by_alias, home_dir

    p = argparse.ArgumentParser(prog="jobs.ingest", description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--dedup-window-s", type=int, default=None, help="dedup window in seconds (default 86400)")
    args = p.parse_args(list(argv) if argv is not None else None)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    env_file = home_dir() / "stack.env"
    return IngestSettings(
        _env_file=env_file if env_file.is_file() else None, **by_alias(IngestSettings, overrides)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ingest job (blocks until it ends: bounded runs end, unbounded ones run until killed)."""
    setup_logging()
    settings = parse_args(argv)
    _, t_env = create_table_env(JOB, settings)
    statements = build(t_env, settings)
    log.info("submitting %s (group %s)", JOB, settings.group_id or f"clickpulse-{JOB}")
    execute_and_log(JOB, statements, t_env, settings, settings.log_interval_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
