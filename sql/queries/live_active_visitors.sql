-- Live: visitors (distinct user_key, bots excluded) with an event that *arrived* (received_at) in the
-- window_s seconds before now_ms (Unix milliseconds, the caller's clock). Arrival, not event time: an
-- event sent late (offline device, SDK retry) or stamped by a skewed device clock still makes its visitor
-- active now. Arrivals after now_ms (the collector's clock a little ahead of the dashboard's) count too.
-- The minmax index on received_at (sql/0011) skips the granules outside the window.
-- param window_s = 300
-- param now_ms = now
SELECT uniqExact(user_key) AS visitors
FROM events
WHERE NOT is_bot
    AND received_at > fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC') - toIntervalSecond({window_s:UInt32})
