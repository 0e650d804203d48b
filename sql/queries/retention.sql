-- Weekly retention cohorts: users (user_key, bots excluded) grouped by the week (Monday, UTC) of their
-- first event, for the cohorts that start in [date_from, date_to]; for each later week, how many of
-- them were active again (week_offset 0 is the cohort itself).
-- Run: clickpulse query retention [--param date_from=2026-10-01 --param date_to=2026-11-30]
-- param date_from = today-56
-- param date_to = today
WITH
    activity AS
    (
        SELECT DISTINCT user_key, toMonday(timestamp) AS week
        FROM events
        WHERE NOT is_bot
    ),
    cohorts AS
    (
        SELECT user_key, min(week) AS cohort_week
        FROM activity
        GROUP BY user_key
        HAVING cohort_week >= toMonday({date_from:Date}) AND cohort_week <= {date_to:Date}
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
