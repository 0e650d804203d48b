-- 0011: what the dashboard's live panels read — events by *arrival* time (received_at).
--
-- "Live" means "what just came in". The rollups of 0004/0005 are keyed by event time (`timestamp`), so an
-- event replayed from an offline device, sent late by an SDK's retry queue, or stamped by a skewed clock
-- lands in an old minute and never shows on a chart of the last hour; a visitor whose device clock is
-- 10 minutes behind is never "active in the last 5 minutes". received_at is the collector's clock when
-- the event arrived (ingest keeps it as it was; timestamp is derived from it), so it is monotone enough
-- for "the last N minutes" and the same for every client.
--
-- 1. A minmax skip index on events.received_at. `events` is sorted by (event, hour of timestamp, ...)
--    and partitioned by day of timestamp, so a filter on received_at alone would read every granule.
--    received_at follows timestamp closely for live traffic (ingest refuses events more than its
--    max-past/max-future bounds from their arrival), so each granule's received_at range is narrow and
--    the index skips nearly all of them for "the last 5 minutes" / "the newest 30 rows of the last day".
--    No partition bound on timestamp is derived from that: the ingest bounds are settings, and a query
--    that assumed them would silently hide rows loaded under other bounds. MATERIALIZE INDEX, in the same
--    ALTER, builds it for the parts that exist (a mutation, in the background; until it is done those
--    parts are simply read; running it again rebuilds, harmlessly).
--
-- 2. Per-minute rollups by arrival minute, the same chain and rules as 0004/0005 (countState on write,
--    countMerge on read, the MV's GROUP BY = the target's ORDER BY, a dedup window on every target so the
--    loader's insert_deduplication_token keeps them exactly-once). They start counting when this
--    migration runs (an MV sees only later inserts; docs/adr/003-loader-exactly-once.md): the live
--    panels cover the last hour, so they are complete an hour after the upgrade. No TTL, like 0004/0005
--    (retention is the operator's, by partition; a TTL would also drop fixed-date test and backfilled
--    rows on insert): they double as a record of arrival volume, which ingest lag makes differ from the
--    event-time rollups.
ALTER TABLE {db}.events
    ADD INDEX IF NOT EXISTS idx_received_at received_at TYPE minmax GRANULARITY 1,
    MATERIALIZE INDEX idx_received_at;

-- Events per arrival minute by event name (`$page`, `$identify`, `$alias` for calls without one, as 0004).
CREATE TABLE IF NOT EXISTS {db}.arrivals_per_minute_agg
(
    minute DateTime('UTC'),
    event  LowCardinality(String),
    events AggregateFunction(count)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (minute, event)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.arrivals_per_minute_agg_mv TO {db}.arrivals_per_minute_agg AS
SELECT
    toStartOfMinute(received_at) AS minute,
    if(event = '', concat('$', type), event) AS event,
    countState() AS events
FROM {db}.events
GROUP BY minute, event;

-- Page events and page views per arrival minute (as 0005's page rollup).
CREATE TABLE IF NOT EXISTS {db}.page_arrivals_per_minute_agg
(
    minute     DateTime('UTC'),
    page_host  LowCardinality(String),
    page_path  String,
    events     AggregateFunction(count),
    page_views AggregateFunction(count)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (minute, page_host, page_path)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.page_arrivals_per_minute_agg_mv TO {db}.page_arrivals_per_minute_agg AS
SELECT
    toStartOfMinute(received_at) AS minute,
    page_host,
    page_path,
    countState() AS events,
    countStateIf(type = 'page') AS page_views
FROM {db}.events
GROUP BY minute, page_host, page_path
