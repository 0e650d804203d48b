-- 0003: loader high-water marks — for every (topic, partition), the end of the offset range whose
-- rows are known to be in this database.
--
-- The loader writes a row after each successful insert and never inserts a record whose offset is
-- below the mark, so resetting the consumer group (or starting a new group) replays Kafka without
-- loading anything twice, whatever the batch boundaries of the second run
-- (docs/adr/003-loader-exactly-once.md). ReplacingMergeTree(end_offset) keeps one row per key
-- eventually; readers take max(end_offset), which is exact before merges too.
CREATE TABLE IF NOT EXISTS {db}.loader_offsets
(
    topic        String,
    partition    UInt32,
    end_offset   UInt64,
    loaded_table LowCardinality(String),
    updated_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(end_offset)
ORDER BY (topic, partition)
