"""The SQL text of the Flink sources: intervals and the ``events.enriched`` watermark clamp.

How Flink plans and evaluates it is checked with a JVM in ``tests/job/test_enriched_source.py``.
"""

from __future__ import annotations

import pytest

from connectors.flink import FlinkSettings, enriched_source_columns, sql_interval, watermark_time_sql

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("ms", "sql"),
    [
        (0, "INTERVAL '0 00:00:00.000' DAY(3) TO SECOND(3)"),
        (2000, "INTERVAL '0 00:00:02.000' DAY(3) TO SECOND(3)"),
        (60_000, "INTERVAL '0 00:01:00.000' DAY(3) TO SECOND(3)"),
        # from 100 s on, the old ``INTERVAL '300.000' SECOND`` exceeded SECOND(2) and Flink refused it
        (300_000, "INTERVAL '0 00:05:00.000' DAY(3) TO SECOND(3)"),
        (90_061_001, "INTERVAL '1 01:01:01.001' DAY(3) TO SECOND(3)"),
        (999 * 86_400_000, "INTERVAL '999 00:00:00.000' DAY(3) TO SECOND(3)"),
    ],
)
def test_sql_interval_is_a_day_to_second_literal(ms: int, sql: str) -> None:
    assert sql_interval(ms) == sql


@pytest.mark.parametrize("ms", [-1, 1000 * 86_400_000])
def test_sql_interval_rejects_what_flink_cannot_hold(ms: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        sql_interval(ms)


def test_watermark_follows_the_event_time_capped_at_the_kafka_time_plus_the_lead() -> None:
    columns = enriched_source_columns(out_of_orderness_ms=60_000, max_lead_ms=300_000)
    lines = [line.strip() for line in columns.splitlines()]
    # the rowtime is still the event's own time (the JSON event_time_ms, else the Kafka time) ...
    assert "kafka_ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL," in lines
    assert any(line.startswith("event_time AS COALESCE(") and line.endswith("kafka_ts),") for line in lines)
    # ... but the watermark is generated from it capped at kafka_ts + lead
    assert lines[-1] == (
        "WATERMARK FOR event_time AS LEAST(event_time, kafka_ts + INTERVAL '0 00:05:00.000' DAY(3) TO "
        "SECOND(3)) - INTERVAL '0 00:01:00.000' DAY(3) TO SECOND(3)"
    )
    assert (
        watermark_time_sql(0) == "LEAST(event_time, kafka_ts + INTERVAL '0 00:00:00.000' DAY(3) TO SECOND(3))"
    )


def test_the_watermark_lead_defaults_to_minutes_not_to_ingests_future_window() -> None:
    lead = FlinkSettings.model_fields["watermark_max_lead_ms"].default
    assert 60_000 <= lead <= 15 * 60_000
