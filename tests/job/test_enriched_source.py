"""The ``events.enriched`` source as Flink plans and evaluates it (a local JVM, no Kafka needed).

The watermark must be generated in the Kafka source (per partition) from the event time capped at the
record's Kafka time + the lead; the rowtime stays the event's own time. The end-to-end behaviour (a burst
of future-dated events does not make normal traffic late) is
``tests/job/test_sessionize_job.py::test_future_dated_burst_does_not_move_the_watermark``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from connectors.flink import (
    ENRICHED_EVENT_TIME_SQL,
    connector_jars,
    create_enriched_source,
    watermark_time_sql,
)
from connectors.settings import Connections, ConsumerSettings

pytestmark = [pytest.mark.job, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def table_env(streaming: bool) -> Any:
    from pyflink.common import Configuration
    from pyflink.table import EnvironmentSettings, TableEnvironment

    conf = Configuration()
    conf.set_string("table.local-time-zone", "UTC")
    conf.set_string("parallelism.default", "1")
    jars_dir = os.environ.get("CLICKPULSE_MAVEN_JARS_DIR")
    conf.set_string("pipeline.jars", ";".join(connector_jars(Path(jars_dir) if jars_dir else None)))
    builder = EnvironmentSettings.new_instance()
    builder = builder.in_streaming_mode() if streaming else builder.in_batch_mode()
    return TableEnvironment.create(builder.with_configuration(conf).build())


def test_the_capped_watermark_is_generated_in_the_kafka_source() -> None:
    t_env = table_env(streaming=True)
    create_enriched_source(t_env, Connections(), ConsumerSettings(), "g", 60_000, 300_000)
    plan = t_env.explain_sql("SELECT k, v FROM enriched_events")
    optimized = plan.split("== Optimized Execution Plan ==")[1]
    scan = next(line for line in optimized.splitlines() if "TableSourceScan" in line)
    # pushed into the source (per-partition watermarks), with the cap on the Kafka time
    assert "watermark=[-(LEAST(" in scan, scan
    assert "kafka_ts" in scan and "300000:INTERVAL DAY(3) TO SECOND(3)" in scan, scan
    assert "60000:INTERVAL DAY(3) TO SECOND(3)" in scan, scan


def test_the_cap_only_bites_on_events_ahead_of_their_kafka_time() -> None:
    t_env = table_env(streaming=False)
    kafka = "2026-11-22 20:00:00.000"

    def at(day_hh_mm: str) -> str:
        return f"2026-11-{day_hh_mm}:00.000"

    rows = {
        # name: (value JSON, expected event_time, expected watermark time)
        "on time": ('{"event_time_ms": 1795377000000}', at("22 19:50"), at("22 19:50")),
        "old (replay)": ('{"event_time_ms": 1795291200000}', at("21 20:00"), at("21 20:00")),
        "within lead": ('{"event_time_ms": 1795377840000}', at("22 20:04"), at("22 20:04")),
        "23 h ahead": ('{"event_time_ms": 1795460400000}', at("23 19:00"), at("22 20:05")),
        "no event time": ('{"event": "x"}', kafka, kafka),
        "malformed": ("not json", kafka, kafka),
    }
    values = ", ".join(
        f"('{name}', CAST('{value}' AS BYTES), CAST(TIMESTAMP '{kafka}' AS TIMESTAMP_LTZ(3)))"
        for name, (value, _, _) in rows.items()
    )
    result = t_env.sql_query(
        f"SELECT name, CAST(event_time AS STRING), CAST({watermark_time_sql(300_000)} AS STRING) FROM ("
        f"  SELECT name, {ENRICHED_EVENT_TIME_SQL} AS event_time, kafka_ts"
        f"  FROM (VALUES {values}) AS t(name, v, kafka_ts))"
    ).execute()
    with result.collect() as results:
        got = {r[0]: (r[1], r[2]) for r in results}
    assert got == {name: (event_time, wm) for name, (_, event_time, wm) in rows.items()}
