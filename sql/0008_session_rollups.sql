-- 0008: sessions per day — count, bounce rate, average duration, conversion rate, revenue.
--
-- A view over `sessions FINAL`, deliberately not a materialized view: sessions are versioned and
-- a session can be retracted, so an insert-time MV would count every version of a session (and
-- never un-count a retracted one). Making an MV correct would need the sessionize job to emit a
-- -1 row carrying the previous version's values for every update (VersionedCollapsingMergeTree),
-- which it does not know at load time. FINAL costs a merge at read time over one day's sessions
-- — cheap at this scale; revisit with a refreshable MV if it is ever not.
CREATE VIEW IF NOT EXISTS {db}.sessions_per_day AS
SELECT
    toDate(start) AS day,
    count() AS sessions,
    uniqExact(user_key) AS users,
    avg(is_bounce) AS bounce_rate,
    avg(duration_s) AS avg_duration_s,
    avg(converted) AS conversion_rate,
    sum(revenue) AS revenue
FROM {db}.sessions FINAL
WHERE retracted = 0
GROUP BY day;

-- Revenue attributed to the campaign that started the session (first touch within the session).
CREATE VIEW IF NOT EXISTS {db}.revenue_per_day_by_session_campaign AS
SELECT
    toDate(start) AS day,
    utm_source,
    utm_medium,
    utm_campaign,
    count() AS sessions,
    countIf(converted) AS conversions,
    sum(revenue) AS revenue
FROM {db}.sessions FINAL
WHERE retracted = 0
GROUP BY day, utm_source, utm_medium, utm_campaign
