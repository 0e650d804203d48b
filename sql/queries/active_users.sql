-- DAU, WAU and MAU (rolling 7 and 28 days) per day of [date_from, date_to], bots excluded, from the
-- active-users rollup (sql/0006).
-- param date_from = today-30
-- param date_to = today
SELECT d.day AS day, d.users AS dau, w.users AS wau, m.users AS mau
FROM daily_active_users AS d
LEFT JOIN weekly_active_users AS w ON w.day = d.day
LEFT JOIN monthly_active_users AS m ON m.day = d.day
WHERE d.day >= {date_from:Date} AND d.day <= {date_to:Date}
ORDER BY day
