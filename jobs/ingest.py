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

Counters (Flink metrics, and one log line every ``CLICKPULSE_JOB_LOG_INTERVAL_MS`` from the driver via
:mod:`connectors.flink_metrics`): records_in, valid, dlq and dlq_reason.<code>, redis_fallbacks,
redis_poison, links_flushed, links_dropped and the gauge links_pending from the stage; duplicates = what
the Deduplicate operator read minus what it wrote (= enriched).
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
    FlinkSettings,
    create_kafka_sinks,
    create_table,
    create_table_env,
    job_options,
    kafka_source_options,
    run_job,
    sql_interval,
)
from connectors.runtime import setup_logging
from connectors.settings import Connections, ConsumerSettings, Settings, compose, environment, seconds_flag

log = logging.getLogger("clickpulse.ingest")

JOB = "ingest"


class IngestSettings(Settings):
    """Options of the ingest stage and its deduplication."""

    dedup_window_ms: int = Field(24 * 3600 * 1000, alias="CLICKPULSE_INGEST_DEDUP_WINDOW_MS", gt=0)
    """``CLICKPULSE_INGEST_DEDUP_WINDOW_MS`` / ``--dedup-window-ms``: how long a message_id is remembered
    (default 86400000 = 24 h)."""
    max_payload_bytes: int = Field(32 * 1024, alias="CLICKPULSE_INGEST_MAX_PAYLOAD_BYTES", gt=0)
    """``CLICKPULSE_INGEST_MAX_PAYLOAD_BYTES``: larger raw records go to the DLQ as size_exceeded (default
    32768)."""
    max_future_ms: int = Field(24 * 3600 * 1000, alias="CLICKPULSE_INGEST_MAX_FUTURE_MS", ge=0)
    """``CLICKPULSE_INGEST_MAX_FUTURE_MS``: reject events this far ahead of received_at (default 86400000 =
    24 h)."""
    max_past_ms: int = Field(30 * 24 * 3600 * 1000, alias="CLICKPULSE_INGEST_MAX_PAST_MS", ge=0)
    """``CLICKPULSE_INGEST_MAX_PAST_MS``: reject events this far behind received_at (default 2592000000 =
    30 d)."""
    internal_domains: str = Field("", alias="CLICKPULSE_INGEST_INTERNAL_DOMAINS")
    """``CLICKPULSE_INGEST_INTERNAL_DOMAINS``: comma-separated hosts counted as internal referrers (default
    none)."""
    anonymize_ip: bool = Field(False, alias="CLICKPULSE_INGEST_ANONYMIZE_IP")
    """``CLICKPULSE_INGEST_ANONYMIZE_IP``: zero the host part of IPs after the geo lookup (default off)."""
    redis_timeout_ms: int = Field(50, alias="CLICKPULSE_REDIS_TIMEOUT_MS", gt=0)
    """``CLICKPULSE_REDIS_TIMEOUT_MS``: latency bound of one Redis round trip; then fail open (default 50)."""
    redis_key_prefix: str = Field("clickpulse:", alias="CLICKPULSE_REDIS_KEY_PREFIX")
    """``CLICKPULSE_REDIS_KEY_PREFIX``: prefix of identity/profile keys (default ``clickpulse:``)."""
    pending_links_max: int = Field(100_000, alias="CLICKPULSE_INGEST_PENDING_LINKS_MAX", gt=0)
    """``CLICKPULSE_INGEST_PENDING_LINKS_MAX``: identity links made while Redis is down, kept per subtask
    and written once it is back; beyond it the oldest are dropped and counted (default 100000)."""


def add_ingest_args(p: argparse.ArgumentParser) -> None:
    """The ingest job's own command-line options."""
    p.add_argument("--dedup-window-ms", type=int, default=None, help="dedup window (default 86400000)")
    p.add_argument("--dedup-window-s", dest="dedup_window_ms", type=seconds_flag, help=argparse.SUPPRESS)


@dataclass(frozen=True)
class IngestJobSettings:
    """Everything the ingest job reads: the areas it is composed of."""

    connections: Connections
    consumer: ConsumerSettings
    flink: FlinkSettings
    ingest: IngestSettings


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
    pending_links_max: int
    log_interval_s: float
    skip_state_sampler: bool

    @classmethod
    def of(cls, s: IngestJobSettings) -> StageConfig:
        """Pick the stage's fields out of the job settings."""
        i = s.ingest
        return cls(
            source_topic=s.connections.topic("events.raw"),
            max_bytes=i.max_payload_bytes,
            max_future_s=i.max_future_ms // 1000,
            max_past_s=i.max_past_ms // 1000,
            internal_domains=tuple(d.strip() for d in i.internal_domains.split(",") if d.strip()),
            anonymize_ip=i.anonymize_ip,
            redis_url=s.connections.redis_url.get_secret_value(),
            redis_timeout_s=i.redis_timeout_ms / 1000.0,
            redis_prefix=i.redis_key_prefix,
            pending_links_max=i.pending_links_max,
            log_interval_s=s.consumer.log_interval_ms / 1000.0,
            skip_state_sampler=not s.flink.python_state_sampler,
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
        if c.skip_state_sampler:
            from connectors.python_worker import skip_state_sampler

            skip_state_sampler()
        warm_up()
        r = client(c.redis_url, timeout_s=c.redis_timeout_s)
        self.stage = IngestStage(
            IngestOptions(
                source_topic=c.source_topic,
                max_bytes=c.max_bytes,
                max_future_s=c.max_future_s,
                max_past_s=c.max_past_s,
                enrich=EnrichOptions(internal_domains=c.internal_domains, anonymize_ip=c.anonymize_ip),
                pending_links_max=c.pending_links_max,
            ),
            RedisIdentityStore(r, c.redis_prefix),
            RedisProfileStore(r, c.redis_prefix),
        )
        group = function_context.get_metric_group().add_group("clickpulse")
        self.m_in = group.counter("records_in")
        self.m_valid = group.counter("valid")
        self.m_dlq = group.counter("dlq")
        self.m_fallback = group.counter("redis_fallbacks")
        self.m_poison = group.counter("redis_poison")
        self.m_flushed = group.counter("links_flushed")
        self.m_dropped = group.counter("links_dropped")
        group.gauge("links_pending", lambda: self.stage.counters.links_pending)
        self.dlq_group = group.add_group("dlq_reason")
        self.m_dlq_reason: dict[str, Any] = {}
        self.next_log = time.monotonic() + c.log_interval_s
        self.last = (0, 0, 0)

    def close(self) -> None:
        """Try once more to write identity links still pending from a Redis outage."""
        stage = getattr(self, "stage", None)
        left = stage.flush_links() if stage is not None else 0
        if left:
            log.warning("ingest stage closing with %d identity links not written to Redis", left)

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
                "event_time_ms": out.event_times,
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
        for metric, total in (
            (self.m_poison, c.redis_poison),
            (self.m_flushed, c.links_flushed),
            (self.m_dropped, c.links_dropped),
        ):
            metric.inc(total - metric.get_count())
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
        DataTypes.FIELD("event_time_ms", DataTypes.BIGINT()),
    ]
)


# ---------------------------------------------------------------------------------------- wiring


def create_raw_source(
    t_env: Any, name: str, s: IngestJobSettings, job: str = JOB, watermark_delay_ms: int | None = None
) -> None:
    """The ``events.raw`` source table: key, value bytes, partition, offset and the record timestamp
    (= received_at). With ``watermark_delay_ms``, ``received_at`` is its rowtime and each partition's
    watermark trails it by that delay (the pipeline's event-time clock, see ``jobs.pipeline``)."""
    columns = """  k BYTES,
  v BYTES,
  `partition` INT METADATA VIRTUAL,
  `offset` BIGINT METADATA VIRTUAL,
  received_at TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL"""
    if watermark_delay_ms is not None:
        columns += f",\n  WATERMARK FOR received_at AS received_at - {sql_interval(watermark_delay_ms)}"
    create_table(
        t_env,
        name,
        columns,
        kafka_source_options(
            s.connections,
            s.consumer,
            s.connections.topic("events.raw"),
            s.consumer.group(job),
            key_fields="k",
        ),
    )


def build(
    t_env: Any,
    raw: Any,
    s: IngestJobSettings,
    propagate_watermarks: bool = False,
    event_time_column: bool = False,
) -> tuple[Any, Any]:
    """The ingest part of the graph: ``raw`` (a table shaped like :func:`create_raw_source`'s) ->
    ``(enriched, dlq)``, two ``(k STRING, v BYTES)`` tables: unique valid events keyed by user_key, and
    DLQ records keyed by the original key.

    ``event_time_column``: ``enriched`` has a third column ``event_time_ms BIGINT``, the event time the
    stage computed (= the payload's ``event_time_ms``), for keyed parts in the same graph: reading it
    back from the JSON with ``JSON_VALUE`` parsed the whole document into a map, once per part (a third of
    the deduplicating task's CPU in a profile of the pipeline).

    ``propagate_watermarks`` (``raw`` must then have the rowtime ``received_at``, see
    :func:`create_raw_source`'s ``watermark_delay_ms``): the source's watermarks travel on through the
    stage and the dedup to ``enriched``, for keyed parts in the same graph. A table made from a
    ``DataStream`` only passes on the watermarks it declares (``SOURCE_WATERMARK()``); without that the
    parts downstream saw no watermark but the final one of a bounded run."""
    from pyflink.table import Schema

    t_env.create_temporary_view("ingest_raw", raw)
    t_env.create_temporary_function(
        "ingest_stage", udf(IngestStageUdf(StageConfig.of(s)), result_type=STAGE_ROW, func_type="pandas")
    )
    # with propagate_watermarks, received_at (the rowtime) rides along: it becomes the stream records'
    # timestamps, which the watermarks declared below refer to
    rowtime = ", received_at" if propagate_watermarks else ""
    staged = t_env.sql_query(
        "SELECT r.kind AS kind, r.message_id AS message_id, r.user_key AS user_key, r.payload AS payload,"
        f" r.event_time_ms AS event_time_ms{rowtime} FROM (SELECT ingest_stage(k, v,"
        f" CAST(received_at AS TIMESTAMP(3)), `partition`, `offset`) AS r{rowtime} FROM ingest_raw)"
    )
    # Materialize the stage once: both outputs read this stream, so the Python UDF runs once per record.
    stream = t_env.to_data_stream(staged)
    schema = Schema.new_builder()
    if propagate_watermarks:
        schema = schema.column_by_metadata("rowtime", "TIMESTAMP_LTZ(3)").watermark(
            "rowtime", "SOURCE_WATERMARK()"
        )
    t_env.create_temporary_view(
        "ingest_staged",
        t_env.from_data_stream(stream, schema.column_by_expression("proc", "PROCTIME()").build()),
    )
    t_env.get_config().set("table.exec.state.ttl", f"{s.ingest.dedup_window_ms} ms")
    dlq = t_env.sql_query("SELECT user_key AS k, payload AS v FROM ingest_staged WHERE kind = 'dlq'")
    time_column = ", event_time_ms" if event_time_column else ""
    enriched = t_env.sql_query(
        f"SELECT user_key AS k, payload AS v{time_column} FROM ("
        "  SELECT user_key, payload, event_time_ms,"
        "    ROW_NUMBER() OVER (PARTITION BY message_id ORDER BY proc ASC) AS rn"
        "  FROM ingest_staged WHERE kind = 'ok'"
        ") WHERE rn = 1"
    )
    return enriched, dlq


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ingest job (blocks until it ends: bounded runs end, unbounded ones run until killed)."""
    setup_logging()
    s = compose(IngestJobSettings, environment(), job_options(JOB, argv, add_ingest_args))
    _, t_env = create_table_env(JOB, s.flink, s.connections.state_dir, bounded=s.consumer.bounded)
    create_raw_source(t_env, "raw_events", s)
    enriched, dlq = build(t_env, t_env.from_path("raw_events"), s)
    create_kafka_sinks(
        t_env,
        s.connections,
        s.flink,
        s.consumer.group(JOB),
        {"enriched_sink": "events.enriched", "dlq_sink": "events.dlq"},
    )
    statements = t_env.create_statement_set()
    statements.add_insert("dlq_sink", dlq)
    statements.add_insert("enriched_sink", enriched)
    log.info("submitting %s (group %s)", JOB, s.consumer.group(JOB))
    run_job(JOB, statements, t_env, s.flink, s.consumer.log_interval_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
