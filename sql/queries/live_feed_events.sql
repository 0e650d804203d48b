-- Live: the newest events (by arrival, received_at) of the last day before now_ms (Unix ms); `name` is
-- the event name of a track call, else the call's type (page, identify, alias).
-- param limit = 50
-- param now_ms = now
SELECT
    received_at,
    timestamp,
    message_id,
    if(event = '', type, event) AS name,
    type,
    page_path,
    user_key,
    country,
    device_type
FROM events
WHERE timestamp > fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC') - toIntervalDay(1)
ORDER BY received_at DESC, message_id
LIMIT {limit:UInt16}
