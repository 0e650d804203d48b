-- Top referring hosts of [date_from, date_to]: page views arriving from another site (referrer_host set),
-- and the distinct visitors they brought (bots excluded). No rollup holds referrers: read from events.
-- param date_from = today-30
-- param date_to = today
-- param limit = 10
SELECT referrer_host, any(referrer_type) AS referrer_type, count() AS page_views, uniqExact(user_key) AS visitors
FROM events
WHERE type = 'page' AND referrer_host != '' AND NOT is_bot
    AND timestamp >= toDateTime64({date_from:Date}, 3, 'UTC')
    AND timestamp < toDateTime64({date_to:Date} + 1, 3, 'UTC')
GROUP BY referrer_host
ORDER BY page_views DESC, referrer_host
LIMIT {limit:UInt16}
