-- 0004: events per minute by event name (contract: `events_per_minute (minute, event, events)`).
--
-- events -> events_per_minute_agg_mv TO events_per_minute_agg -> view events_per_minute.
-- AggregatingMergeTree with countState() on write and countMerge() on read: the view is exact
-- whether or not background merges have run. The MV's GROUP BY equals the target's ORDER BY.
-- Page/identify/alias calls have no event name; they are counted as `$page`, `$identify`,
-- `$alias` (so a chart of "everything per minute" adds up to the events table).
--
-- Exactly-once: the loader inserts into `events` with insert_deduplication_token and
-- deduplicate_blocks_in_dependent_materialized_views=1. On ClickHouse 26.x a deduplicated source
-- block is still pushed to the views, and each target drops it only if it keeps a dedup window of
-- its own — hence non_replicated_deduplication_window on every MV target (proved by
-- tests/integration/test_loader.py::test_mv_dedup_needs_window_and_setting).
CREATE TABLE IF NOT EXISTS {db}.events_per_minute_agg
(
    minute DateTime('UTC'),
    event  LowCardinality(String),
    events AggregateFunction(count)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (minute, event)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.events_per_minute_agg_mv TO {db}.events_per_minute_agg AS
SELECT
    toStartOfMinute(timestamp) AS minute,
    if(event = '', concat('$', type), event) AS event,
    countState() AS events
FROM {db}.events
GROUP BY minute, event;

CREATE VIEW IF NOT EXISTS {db}.events_per_minute AS
SELECT minute, event, countMerge(events) AS events
FROM {db}.events_per_minute_agg
GROUP BY minute, event
