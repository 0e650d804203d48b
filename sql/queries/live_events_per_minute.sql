-- Live: events per minute of *arrival* (received_at) over the `minutes` minutes up to now_ms (Unix ms),
-- from the arrival rollup (sql/0011), every minute present (0 where nothing arrived). Arrival, not event
-- time: late and replayed events count in the minute they came in, so the newest bar is what just
-- arrived (the event-time chart is events_per_minute, sql/0004).
-- param minutes = 60
-- param now_ms = now
SELECT minute, toUInt64(sum(events)) AS events
FROM
(
    SELECT minute, countMerge(events) AS events
    FROM arrivals_per_minute_agg
    WHERE minute > toStartOfMinute(fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC')) - toIntervalMinute({minutes:UInt16})
        AND minute <= toStartOfMinute(fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC'))
    GROUP BY minute
)
GROUP BY minute
ORDER BY minute
    WITH FILL
    FROM toStartOfMinute(fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC')) - toIntervalMinute({minutes:UInt16} - 1)
    TO toStartOfMinute(fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC')) + toIntervalMinute(1)
    STEP toIntervalMinute(1)
