-- Events of [date_from, date_to] per device type, from the per-minute device rollup (sql/0005).
-- param date_from = today-30
-- param date_to = today
-- param limit = 10
SELECT device_type, countMerge(events) AS events
FROM device_events_per_minute_agg
WHERE minute >= toDateTime({date_from:Date}, 'UTC') AND minute < toDateTime({date_to:Date} + 1, 'UTC')
GROUP BY device_type
ORDER BY events DESC, device_type
LIMIT {limit:UInt16}
