-- Top pages of [date_from, date_to] by page views, from the per-minute page rollup (sql/0005).
-- param date_from = today-30
-- param date_to = today
-- param limit = 10
SELECT page_host, page_path, countMerge(page_views) AS page_views, countMerge(events) AS events
FROM page_events_per_minute_agg
WHERE minute >= toDateTime({date_from:Date}, 'UTC') AND minute < toDateTime({date_to:Date} + 1, 'UTC')
    AND page_path != ''
GROUP BY page_host, page_path
ORDER BY page_views DESC, events DESC, page_path
LIMIT {limit:UInt16}
