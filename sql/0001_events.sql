-- 0001: the events table — one row per unique message_id of `events.enriched`.
--
-- Engine: plain MergeTree. Rows are never updated; "exactly once" comes from the loader, not from a
-- merge-time engine: every insert carries `insert_deduplication_token` (one token per Kafka offset
-- range), and `non_replicated_deduplication_window` makes this non-replicated table remember the
-- last 10000 block ids, so a retried or replayed insert of the same range is dropped by ClickHouse.
-- (ReplacingMergeTree on message_id would only collapse duplicates eventually, at merge time, and
-- the materialized views below would already have counted them twice.)
--
-- Partitioning: by UTC day of the event time. Queries are almost always time-bounded, retention
-- is by day, and late events (up to 30 days, bounded by ingest) land in small day partitions of
-- their own without rewriting recent ones.
--
-- Sort key (event, hour, user_key, timestamp): the common questions are "how many X per
-- minute/hour", funnels (a few event names, grouped by user), and a user's timeline. `event` first
-- gives the best pruning for event filters and the best compression (LowCardinality, long runs);
-- the hour bucket keeps time-range scans tight within an event; user_key then groups a user's
-- events together for windowFunnel/retention. message_id is not in the key (it is unique by
-- construction, see above); the bloom filter serves point lookups by message_id.
--
-- Column types follow the enriched-event contract (udfs/enrich.py). Identity strings that may be
-- null in the JSON are stored as '' (no Nullable on hot columns); `sent_at` keeps NULL because
-- older SDKs do not send it and there is no honest default. properties/traits are JSON text.
-- kafka_partition/kafka_offset record where each row came from (audits, replays); inserted_at is
-- the server's clock at insert (ingest-to-queryable latency).
CREATE TABLE IF NOT EXISTS {db}.events
(
    message_id       String,
    type             LowCardinality(String),
    event            LowCardinality(String),
    anonymous_id     String,
    user_id          String,
    previous_id      String,
    user_key         String,
    timestamp        DateTime64(3, 'UTC'),
    sent_at          Nullable(DateTime64(3, 'UTC')),
    received_at      DateTime64(3, 'UTC'),
    ip               String,
    user_agent       String,
    page_url         String,
    page_path        String,
    page_host        LowCardinality(String),
    page_title       String,
    referrer         String,
    locale           LowCardinality(String),
    properties       String,
    traits           String,
    browser          LowCardinality(String),
    browser_version  LowCardinality(String),
    os               LowCardinality(String),
    device_type      LowCardinality(String),
    is_bot           Bool,
    country          LowCardinality(String),
    utm_source       LowCardinality(String),
    utm_medium       LowCardinality(String),
    utm_campaign     LowCardinality(String),
    utm_term         String,
    utm_content      String,
    click_id_type    LowCardinality(String),
    referrer_type    LowCardinality(String),
    referrer_host    LowCardinality(String),
    kafka_partition  UInt32,
    kafka_offset     UInt64,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_message_id message_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toDate(timestamp)
ORDER BY (event, toStartOfHour(timestamp), user_key, timestamp)
SETTINGS non_replicated_deduplication_window = 10000
