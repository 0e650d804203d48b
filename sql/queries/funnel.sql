-- Funnel over chosen event names (1 to 6 steps, in order): per user (user_key, bots excluded), how far
-- the user got with each step within window_s seconds of the first one (windowFunnel), over the events
-- of [date_from, date_to] (UTC days, inclusive).
-- Run: clickpulse query funnel [--param steps='Product Viewed,Product Added' --param date_from=2026-11-01]
-- param steps = Product Viewed,Product Added,Order Completed
-- param window_s = 86400
-- param date_from = today-30
-- param date_to = today
WITH levels AS
(
    SELECT
        user_key,
        windowFunnel({window_s:UInt32})(
            toDateTime(timestamp),
            length({steps:Array(String)}) >= 1 AND event = {steps:Array(String)}[1],
            length({steps:Array(String)}) >= 2 AND event = {steps:Array(String)}[2],
            length({steps:Array(String)}) >= 3 AND event = {steps:Array(String)}[3],
            length({steps:Array(String)}) >= 4 AND event = {steps:Array(String)}[4],
            length({steps:Array(String)}) >= 5 AND event = {steps:Array(String)}[5],
            length({steps:Array(String)}) >= 6 AND event = {steps:Array(String)}[6]
        ) AS level
    FROM events
    WHERE event IN {steps:Array(String)}
        AND NOT is_bot
        AND timestamp >= toDateTime64({date_from:Date}, 3, 'UTC')
        AND timestamp < toDateTime64({date_to:Date} + 1, 3, 'UTC')
    GROUP BY user_key
)
SELECT
    step,
    {steps:Array(String)}[step] AS step_name,
    countIf(level >= step) AS users,
    round(100 * users / nullIf(countIf(level >= 1), 0), 1) AS pct_of_first_step
FROM levels
ARRAY JOIN arrayEnumerate(arraySlice({steps:Array(String)}, 1, 6)) AS step
GROUP BY step
ORDER BY step
