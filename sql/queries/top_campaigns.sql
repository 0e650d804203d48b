-- Top campaigns (utm_source / utm_medium / utm_campaign of the session) of [date_from, date_to] by
-- sessions, with conversions and revenue (sql/0008's revenue_per_day_by_session_campaign).
-- param date_from = today-30
-- param date_to = today
-- param limit = 10
SELECT
    utm_source,
    utm_medium,
    utm_campaign,
    sum(sessions) AS sessions,
    sum(conversions) AS conversions,
    sum(revenue) AS revenue
FROM revenue_per_day_by_session_campaign
WHERE day >= {date_from:Date} AND day <= {date_to:Date} AND utm_campaign != ''
GROUP BY utm_source, utm_medium, utm_campaign
ORDER BY sessions DESC, utm_campaign
LIMIT {limit:UInt16}
