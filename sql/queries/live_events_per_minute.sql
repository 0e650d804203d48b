-- Live: events per minute over the `minutes` minutes up to now_ms (Unix ms), from the per-minute rollup
-- (sql/0004), every minute present (0 where nothing arrived).
-- param minutes = 60
-- param now_ms = now
SELECT minute, toUInt64(sum(events)) AS events
FROM
(
    SELECT minute, countMerge(events) AS events
    FROM events_per_minute_agg
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
