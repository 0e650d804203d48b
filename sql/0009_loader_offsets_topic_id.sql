-- 0009: loader high-water marks per topic *incarnation*.
--
-- A topic that is deleted and created again under the same name starts its offsets at 0, so marks keyed
-- by name alone would skip the new topic's records below the old mark, silently. `topic_id` is Kafka's
-- topic UUID (KIP-516, from the topic metadata): the loader reads only the marks of the current id.
-- Rows written before this migration have topic_id = '' and are adopted once by the current incarnation
-- (docs/adr/003-loader-exactly-once.md, "Topic recreated").
--
-- The id joins the sorting key, which ReplacingMergeTree(end_offset) deduplicates on: without it a merge
-- would keep the old incarnation's (higher) mark and drop the new one's. A column added to the sorting
-- key in the same ALTER may not have a default expression; String's implicit default is ''.
ALTER TABLE {db}.loader_offsets
    ADD COLUMN IF NOT EXISTS topic_id String AFTER topic,
    MODIFY ORDER BY (topic, partition, topic_id)
