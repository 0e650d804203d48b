-- Purchase funnel: Product Viewed -> Product Added -> Order Completed, per user (user_key), each step
-- within 24 hours of the first one (windowFunnel), bots excluded, over all loaded events (add a
-- `timestamp >= now() - INTERVAL 30 DAY` condition to the WHERE for a recent window).
-- Run: clickpulse query funnel
WITH levels AS
(
    SELECT
        user_key,
        windowFunnel(86400)(
            toDateTime(timestamp),
            event = 'Product Viewed',
            event = 'Product Added',
            event = 'Order Completed'
        ) AS level
    FROM clickpulse.events
    WHERE event IN ('Product Viewed', 'Product Added', 'Order Completed') AND NOT is_bot
    GROUP BY user_key
)
SELECT
    ['1. Product Viewed', '2. Product Added', '3. Order Completed'][step] AS step_name,
    countIf(level >= step) AS users,
    round(100 * users / nullIf(countIf(level >= 1), 0), 1) AS pct_of_first_step
FROM levels
ARRAY JOIN [1, 2, 3] AS step
GROUP BY step
ORDER BY step
