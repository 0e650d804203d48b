"""Pipeline job: ingest → dedup → identity → enrichment → sessions and triggers, in one Flink job graph.

Run it as ``python -m jobs.pipeline [--rules FILE]``, ``clickpulse run pipeline`` or
``flink run -py jobs/pipeline.py``. It composes the parts the single jobs are built from
(:func:`jobs.ingest.build`, :func:`jobs.sessionize.build`, :func:`jobs.triggers.build`): the enriched
stream is materialized once inside the graph and read by the sessions and trigger operators directly,
so no Kafka transaction commit stands between an event and its action.

Outputs: ``events.enriched``, ``events.dlq``, ``sessions``, ``events.late`` exactly-once (Kafka
transactions committed with checkpoints, for the loader and other consumers), ``actions`` at-least-once
with deterministic ids. It accepts the options of ``jobs.triggers`` (``--rules``, ``--no-dispatch``,
…) and of the other jobs; by default the driver also runs the dispatch loop, as ``jobs.triggers`` does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyflink.table.expressions import col

from connectors.dispatch import DispatchSettings
from connectors.flink import (
    FlinkSettings,
    create_kafka_sinks,
    create_table_env,
    job_options,
    with_event_time,
)
from connectors.runtime import exit_status, setup_logging
from connectors.settings import Connections, ConsumerSettings, compose, environment
from jobs import ingest as ingest_job
from jobs import sessionize as sessionize_job
from jobs import triggers as triggers_job

log = logging.getLogger("clickpulse.pipeline")

JOB = "pipeline"

EVENT_TIME_COLUMN = "event_time_ms"
"""The enriched stream's column with the stage's event time (see :func:`jobs.ingest.build`)."""


@dataclass(frozen=True)
class PipelineJobSettings:
    """Everything the pipeline reads: the areas of every part, with one ``Connections``."""

    connections: Connections
    consumer: ConsumerSettings
    flink: FlinkSettings
    ingest: ingest_job.IngestSettings
    sessionize: sessionize_job.SessionizeSettings
    triggers: triggers_job.TriggersSettings
    dispatch: DispatchSettings

    def ingest_part(self) -> ingest_job.IngestJobSettings:
        """The settings the ingest part reads."""
        return ingest_job.IngestJobSettings(self.connections, self.consumer, self.flink, self.ingest)

    def sessionize_part(self) -> sessionize_job.SessionizeJobSettings:
        """The settings the sessionize part reads."""
        return sessionize_job.SessionizeJobSettings(
            self.connections, self.consumer, self.flink, self.sessionize
        )

    def triggers_part(self) -> triggers_job.TriggersJobSettings:
        """The settings the triggers part (and the dispatch loop) reads."""
        return triggers_job.TriggersJobSettings(
            self.connections, self.consumer, self.flink, self.triggers, self.dispatch
        )


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The options of every part. ``--out-of-orderness-ms`` sets the watermark delay of both the sessions
    and the trigger operators, ``--engine`` the implementation of both (their variables set them one by
    one: ``CLICKPULSE_SESSIONIZE_ENGINE``, ``CLICKPULSE_TRIGGERS_ENGINE``)."""
    ingest_job.add_ingest_args(p)
    sessionize_job.add_sessionize_args(p)
    triggers_job.add_triggers_args(p)
    # both parts declare it, with the same dest and choices (job_options(shared_flags=True) keeps the last
    # declaration): the one value reaches both settings areas; restated here for its help text
    p.add_argument(
        "--engine",
        choices=[e.value for e in triggers_job.TriggersEngine],
        default=None,
        help="sessions and trigger operators (jvm)",
    )


def build(t_env: Any, s: PipelineJobSettings, config: triggers_job.FunctionConfig) -> dict[str, Any]:
    """The whole graph from the ``events.raw`` and ``rules`` sources: ``{sink table: output table}``."""
    # Event time: each events.raw partition's watermark trails its records' receive times (Kafka record
    # timestamps) by the triggers' out-of-orderness; the keyed parts use these source watermarks. A
    # generator after the partitions merged would follow the fastest partition of a backlog and turn the
    # others' events late; received_at also cannot be dragged ahead by events claiming future times.
    ingest_job.create_raw_source(
        t_env, "raw_events", s.ingest_part(), job=JOB, watermark_delay_ms=s.triggers.out_of_orderness_ms
    )
    rules = triggers_job.create_rules_source(t_env, s.triggers_part(), job=JOB)
    enriched, dlq = ingest_job.build(
        t_env,
        t_env.from_path("raw_events"),
        s.ingest_part(),
        propagate_watermarks=True,
        event_time_column=True,
    )
    # materialize the deduplicated stream once: the sink and both keyed parts read this one stream; the
    # keyed parts take their rowtime from the stage's event_time_ms column, not from the JSON again
    enriched_stream = t_env.to_data_stream(enriched)
    # The sessions see the receive-time watermark, consistent across partitions; the per-key bound
    # (newest event time of the key minus the out-of-orderness) is off: one user's events come from
    # several events.raw partitions (devices, then identity), read at different paces in a backlog, so
    # their event times would make events of the slower partition late by chance.
    sessions, late = sessionize_job.build(
        t_env,
        with_event_time(t_env, enriched_stream, event_time_ms_sql=EVENT_TIME_COLUMN),
        s.sessionize_part(),
        per_key_bound=False,
    )
    actions = triggers_job.build(
        t_env, with_event_time(t_env, enriched_stream, event_time_ms_sql=EVENT_TIME_COLUMN), rules, config
    )
    return {
        "enriched_sink": t_env.from_data_stream(enriched_stream).select(col("k"), col("v")),
        "dlq_sink": dlq,
        "sessions_sink": sessions,
        "late_sink": late,
        "actions_sink": actions,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline (and, unless ``--no-dispatch``, the dispatch loop) until stopped."""
    setup_logging()
    s = compose(
        PipelineJobSettings, environment(), job_options(JOB, argv, add_pipeline_args, shared_flags=True)
    )
    part = s.triggers_part()
    file_rules = triggers_job.load_file_rules(part)
    config = triggers_job.function_config(part, file_rules)
    # one source feeds both keyed parts: a partition may only count as idle after the longer of their idle
    # timeouts (marked idle too early, it lets the watermark run ahead and its events turn late)
    idle_ms = max(s.sessionize.idle_timeout_ms, s.triggers.idle_timeout_ms)
    extra = {**triggers_job.flink_options(part), "table.exec.source.idle-timeout": f"{idle_ms} ms"}
    _, t_env = create_table_env(
        JOB, s.flink, s.connections.state_dir, extra=extra, bounded=s.consumer.bounded
    )
    outputs = build(t_env, s, config)
    create_kafka_sinks(
        t_env,
        s.connections,
        s.flink,
        s.consumer.group(JOB),
        {
            "enriched_sink": "events.enriched",
            "dlq_sink": "events.dlq",
            "sessions_sink": "sessions",
            "late_sink": "events.late",
        },
    )
    triggers_job.create_actions_sink(t_env, part, job=JOB)
    statements = t_env.create_statement_set()
    for sink, table in outputs.items():
        statements.add_insert(sink, table)
    return triggers_job.run_with_dispatch(JOB, part, statements, t_env, file_rules)


if __name__ == "__main__":
    # run the imported module's main, so the keyed functions are pickled by reference
    from jobs import pipeline

    sys.exit(exit_status(pipeline.main))
