-- 0002: sessions — the latest version of every session from the `sessions` topic.
--
-- The sessionize job emits a new version of a session whenever late events change it, and
-- retracts a session that was merged into another (a record with `retracted = true` and a higher
-- version). ReplacingMergeTree(version, retracted) keeps, per session_id (the sort key), only the
-- row with the highest version; when that row has retracted = 1 the session disappears. Merges do
-- this eventually; `FINAL` (or the argMax view below) gives the exact answer at query time.
--
-- No PARTITION BY: ReplacingMergeTree only collapses rows inside one partition, and a session's
-- start can move (a late event before the first one) — partitioning by start would leave two
-- versions in two partitions forever. Sessions are ~1/8 of events; one partition is fine at this
-- scale (switch to a partition key derived from session_id, e.g. cityHash64(session_id) % 16, if
-- merges get too large).
--
-- Inserts carry deduplication tokens like events (same loader), hence the window setting.
CREATE TABLE IF NOT EXISTS {db}.sessions
(
    session_id       String,
    user_key         String,
    anonymous_id     String,
    start            DateTime64(3, 'UTC'),
    end              DateTime64(3, 'UTC'),
    duration_s       Float64,
    events           UInt32,
    page_views       UInt32,
    entry_page       String,
    exit_page        String,
    utm_source       LowCardinality(String),
    utm_medium       LowCardinality(String),
    utm_campaign     LowCardinality(String),
    utm_term         String,
    utm_content      String,
    referrer_type    LowCardinality(String),
    country          LowCardinality(String),
    device_type      LowCardinality(String),
    is_bounce        Bool,
    converted        Bool,
    revenue          Decimal(18, 4),
    version          UInt64,
    retracted        UInt8,
    kafka_partition  UInt32,
    kafka_offset     UInt64,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version, retracted)
ORDER BY session_id
SETTINGS non_replicated_deduplication_window = 10000;

-- Latest live version per session, exact regardless of merges. FINAL applies the engine's rule
-- (highest version wins, a retracted winner hides the session); the WHERE states it explicitly so
-- the view stays right on servers whose FINAL keeps is_deleted rows.
CREATE VIEW IF NOT EXISTS {db}.sessions_latest AS
SELECT * EXCEPT (retracted, kafka_partition, kafka_offset, inserted_at)
FROM {db}.sessions FINAL
WHERE retracted = 0
