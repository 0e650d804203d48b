-- 0006: active users — daily (contract: `daily_active_users (day, users)`), plus trailing 7-day
-- (WAU) and 28-day (MAU) views.
--
-- A user is a user_key (the resolved identity) with at least one non-bot event that day; crawler
-- traffic is not "users". uniqExact, not uniq: the number is exact (tests compare it with Python)
-- and, more importantly, exact states merge exactly, so WAU/MAU are unions of daily states rather
-- than sums of daily counts (which would count a returning user once per day).
CREATE TABLE IF NOT EXISTS {db}.daily_active_users_agg
(
    day   Date,
    users AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
ORDER BY day
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.daily_active_users_agg_mv TO {db}.daily_active_users_agg AS
SELECT toDate(timestamp) AS day, uniqExactState(user_key) AS users
FROM {db}.events
WHERE NOT is_bot
GROUP BY day;

CREATE VIEW IF NOT EXISTS {db}.daily_active_users AS
SELECT day, uniqExactMerge(users) AS users
FROM {db}.daily_active_users_agg
GROUP BY day;

-- WAU for day D = distinct users active in [D - 6, D]: each daily state is fanned out to the 7 days
-- whose window contains it, then merged. Days after the last day with data are not reported.
CREATE VIEW IF NOT EXISTS {db}.weekly_active_users AS
SELECT day + k AS day, uniqExactMerge(users) AS users
FROM {db}.daily_active_users_agg
ARRAY JOIN range(7) AS k
WHERE day + k <= (SELECT max(day) FROM {db}.daily_active_users_agg)
GROUP BY day;

-- MAU for day D = distinct users active in [D - 27, D] (28 days: four whole weeks, so weekday
-- mix does not make it wobble).
CREATE VIEW IF NOT EXISTS {db}.monthly_active_users AS
SELECT day + k AS day, uniqExactMerge(users) AS users
FROM {db}.daily_active_users_agg
ARRAY JOIN range(28) AS k
WHERE day + k <= (SELECT max(day) FROM {db}.daily_active_users_agg)
GROUP BY day
