-- 0005: per-minute event counts by page, country, device type and utm_source.
--
-- Same chain and rules as 0004 (countState on write, countMerge on read, MV GROUP BY = target
-- ORDER BY, dedup window on every target). One narrow table per dimension rather than one wide
-- table keyed by all four: a wide key would multiply rows (the cross product of dimensions per
-- minute) and every dashboard question here is about one dimension at a time.

-- Pages: every event on a page, and page views (type = 'page') separately.
CREATE TABLE IF NOT EXISTS {db}.page_events_per_minute_agg
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

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.page_events_per_minute_agg_mv TO {db}.page_events_per_minute_agg AS
SELECT
    toStartOfMinute(timestamp) AS minute,
    page_host,
    page_path,
    countState() AS events,
    countStateIf(type = 'page') AS page_views
FROM {db}.events
GROUP BY minute, page_host, page_path;

CREATE VIEW IF NOT EXISTS {db}.page_events_per_minute AS
SELECT minute, page_host, page_path, countMerge(events) AS events, countMerge(page_views) AS page_views
FROM {db}.page_events_per_minute_agg
GROUP BY minute, page_host, page_path;

-- Countries ('' = unknown: no IP or not in the geo database).
CREATE TABLE IF NOT EXISTS {db}.country_events_per_minute_agg
(
    minute  DateTime('UTC'),
    country LowCardinality(String),
    events  AggregateFunction(count)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (minute, country)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.country_events_per_minute_agg_mv TO {db}.country_events_per_minute_agg AS
SELECT toStartOfMinute(timestamp) AS minute, country, countState() AS events
FROM {db}.events
GROUP BY minute, country;

CREATE VIEW IF NOT EXISTS {db}.country_events_per_minute AS
SELECT minute, country, countMerge(events) AS events
FROM {db}.country_events_per_minute_agg
GROUP BY minute, country;

-- Device types (desktop, mobile, tablet, bot, other).
CREATE TABLE IF NOT EXISTS {db}.device_events_per_minute_agg
(
    minute      DateTime('UTC'),
    device_type LowCardinality(String),
    events      AggregateFunction(count)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (minute, device_type)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.device_events_per_minute_agg_mv TO {db}.device_events_per_minute_agg AS
SELECT toStartOfMinute(timestamp) AS minute, device_type, countState() AS events
FROM {db}.events
GROUP BY minute, device_type;

CREATE VIEW IF NOT EXISTS {db}.device_events_per_minute AS
SELECT minute, device_type, countMerge(events) AS events
FROM {db}.device_events_per_minute_agg
GROUP BY minute, device_type;

-- utm_source of the event's own page URL ('' = none; session-level attribution is in sessions).
CREATE TABLE IF NOT EXISTS {db}.utm_source_events_per_minute_agg
(
    minute     DateTime('UTC'),
    utm_source LowCardinality(String),
    events     AggregateFunction(count)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (minute, utm_source)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.utm_source_events_per_minute_agg_mv TO {db}.utm_source_events_per_minute_agg AS
SELECT toStartOfMinute(timestamp) AS minute, utm_source, countState() AS events
FROM {db}.events
GROUP BY minute, utm_source;

CREATE VIEW IF NOT EXISTS {db}.utm_source_events_per_minute AS
SELECT minute, utm_source, countMerge(events) AS events
FROM {db}.utm_source_events_per_minute_agg
GROUP BY minute, utm_source
