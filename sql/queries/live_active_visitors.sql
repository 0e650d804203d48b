-- Live: visitors (distinct user_key, bots excluded) with an event in the window_s seconds before now_ms
-- (Unix milliseconds, the caller's clock).
-- param window_s = 300
-- param now_ms = now
SELECT uniqExact(user_key) AS visitors
FROM events
WHERE NOT is_bot
    AND timestamp > fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC') - toIntervalSecond({window_s:UInt32})
    AND timestamp <= fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC')
