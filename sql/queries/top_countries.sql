-- Top countries of [date_from, date_to] by events, from the per-minute country rollup (sql/0005).
-- param date_from = today-30
-- param date_to = today
-- param limit = 10
SELECT country, countMerge(events) AS events
FROM country_events_per_minute_agg
WHERE minute >= toDateTime({date_from:Date}, 'UTC') AND minute < toDateTime({date_to:Date} + 1, 'UTC')
GROUP BY country
ORDER BY events DESC, country
LIMIT {limit:UInt16}
