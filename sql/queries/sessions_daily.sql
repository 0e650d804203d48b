-- Sessions per day of [date_from, date_to] (by session start, UTC), with the bounce rate (share of
-- single-page sessions) and the mean session duration in seconds (sql/0008's sessions_per_day).
-- param date_from = today-30
-- param date_to = today
SELECT day, sessions, users, round(bounce_rate, 4) AS bounce_rate, round(avg_duration_s, 1) AS avg_duration_s
FROM sessions_per_day
WHERE day >= {date_from:Date} AND day <= {date_to:Date}
ORDER BY day
