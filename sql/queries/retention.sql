-- Weekly retention cohorts: users (user_key, bots excluded) grouped by the week (Monday, UTC) of their
-- first event; for each later week, how many of them were active again.
-- Run: clickpulse query retention
WITH
    activity AS
    (
        SELECT DISTINCT user_key, toMonday(timestamp) AS week
        FROM clickpulse.events
        WHERE NOT is_bot
    ),
    cohorts AS
    (
        SELECT user_key, min(week) AS cohort_week
        FROM activity
        GROUP BY user_key
    ),
    sizes AS
    (
        SELECT cohort_week, count() AS cohort_size
        FROM cohorts
        GROUP BY cohort_week
    )
SELECT
    c.cohort_week AS cohort_week,
    intDiv(dateDiff('day', c.cohort_week, a.week), 7) AS week_offset,
    uniqExact(a.user_key) AS users,
    any(s.cohort_size) AS cohort_size,
    round(100 * users / cohort_size, 1) AS retention_pct
FROM activity AS a
INNER JOIN cohorts AS c ON a.user_key = c.user_key
INNER JOIN sizes AS s ON c.cohort_week = s.cohort_week
GROUP BY cohort_week, week_offset
ORDER BY cohort_week, week_offset
