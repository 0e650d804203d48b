-- Live: the pages with the most page views that *arrived* (received_at) in the window_s seconds up to
-- now_ms (Unix ms), from the per-arrival-minute page rollup (sql/0011; whole minutes, the current one
-- included). Arrival, not event time, as every live panel: see live_active_visitors.sql.
-- param window_s = 300
-- param limit = 10
-- param now_ms = now
SELECT page_host, page_path, countMerge(page_views) AS page_views, countMerge(events) AS events
FROM page_arrivals_per_minute_agg
WHERE minute > toStartOfMinute(fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC') - toIntervalSecond({window_s:UInt32}))
    AND minute <= fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC')
    AND page_path != ''
GROUP BY page_host, page_path
ORDER BY page_views DESC, events DESC, page_path
LIMIT {limit:UInt16}
