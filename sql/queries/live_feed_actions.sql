-- Live: the newest trigger fires and dead letters (sql/0010_actions.sql), newest first; an action
-- loaded twice (actions are at-least-once) is shown once per status.
-- param limit = 20
SELECT
    action_id,
    status,
    any(rule_id) AS rule_id,
    any(user_key) AS user_key,
    min(fired_at) AS fired_at,
    max(attempts) AS attempts,
    any(last_error) AS last_error
FROM actions
GROUP BY action_id, status
ORDER BY fired_at DESC, action_id, status
LIMIT {limit:UInt16}
