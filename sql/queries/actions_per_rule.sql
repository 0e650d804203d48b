-- Actions per rule fired in [date_from, date_to] (by fired_at, UTC): fired (distinct action ids of the
-- `actions` topic), dead_lettered (of those, the ones dispatch gave up on, `actions.dlq`) and delivered =
-- fired and not dead-lettered. Nothing in Kafka records a delivery, so "delivered" includes actions
-- still being retried; it is exact once dispatch has caught up (sql/0010_actions.sql).
-- param date_from = today-30
-- param date_to = today
WITH
    dead AS (SELECT DISTINCT action_id FROM actions WHERE status = 'dead_lettered'),
    fired AS
    (
        SELECT DISTINCT rule_id, action_id
        FROM actions
        WHERE status = 'fired'
            AND fired_at >= toDateTime64({date_from:Date}, 3, 'UTC')
            AND fired_at < toDateTime64({date_to:Date} + 1, 3, 'UTC')
    )
SELECT
    rule_id,
    count() AS fired,
    countIf(action_id IN (SELECT action_id FROM dead)) AS dead_lettered,
    fired - dead_lettered AS delivered
FROM fired
GROUP BY rule_id
ORDER BY fired DESC, rule_id
