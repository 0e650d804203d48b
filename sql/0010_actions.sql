-- 0010: actions — what the triggers fired (topic `actions`) and what dispatch gave up on (topic
-- `actions.dlq`), one row per action and status, loaded by the loader like events and sessions
-- (effectively exactly once per Kafka record: intents, dedup tokens, high-water marks).
--
-- status: 'fired' for a record of `actions`, 'dead_lettered' for a record of `actions.dlq`.
-- Nothing records a successful delivery in Kafka (dispatch commits its offset and moves on), so
-- "delivered" is read as "fired and not dead-lettered": it includes actions still being retried
-- (`actions.retry`) and is exact once dispatch has caught up (sql/queries/actions_per_rule.sql).
--
-- Actions are at-least-once: the triggers may fire the same action (same deterministic action_id)
-- again after a restart. ReplacingMergeTree on (status, rule_id, action_id) folds such repeats
-- eventually; readers count uniqExact(action_id), which is exact before merges too. No partitioning:
-- a repeat carries a new fired_at (wall clock), and the table stays small next to events.
CREATE TABLE IF NOT EXISTS {db}.actions
(
    action_id        String,
    rule_id          LowCardinality(String),
    user_key         String,
    status           LowCardinality(String),
    fired_at         DateTime64(3, 'UTC'),
    event_time       DateTime64(3, 'UTC'),
    events           UInt32,
    attempts         UInt32,
    last_error       String,
    kafka_partition  UInt32,
    kafka_offset     UInt64,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (status, rule_id, action_id)
SETTINGS non_replicated_deduplication_window = 10000
