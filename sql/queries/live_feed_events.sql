-- Live: the newest events by *arrival* (received_at) of the last day before now_ms (Unix ms), newest
-- first; `name` is the event name of a track call, else the call's type (page, identify, alias).
-- Filtered on arrival too, not event time: an event sent days late (offline device, replay) is new to
-- the feed when it arrives. Arrivals after now_ms (hosts' clocks a little apart) are shown as well. The
-- minmax index on received_at (sql/0011) skips the granules of older arrivals.
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
WHERE received_at > fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC') - toIntervalDay(1)
ORDER BY received_at DESC, message_id
LIMIT {limit:UInt16}
