-- 0007: revenue per day by currency and campaign, from `Order Completed` events.
--
-- properties.revenue is read as its raw JSON text and parsed as Decimal(18, 4), so sums are exact
-- (Float64 sums drift and depend on merge order); a revenue sent as a JSON string is accepted, a
-- missing or unparsable one counts as 0 (the order is still counted). Currencies are never added
-- together. The campaign is the event's own utm_campaign (the page URL of the order event, '' when
-- it has none); attribution to the campaign that brought the session is `revenue_per_day_by_session_campaign`
-- (0008).
CREATE TABLE IF NOT EXISTS {db}.revenue_per_day_agg
(
    day          Date,
    currency     LowCardinality(String),
    utm_source   LowCardinality(String),
    utm_campaign LowCardinality(String),
    orders       AggregateFunction(count),
    revenue      AggregateFunction(sum, Decimal(18, 4))
)
ENGINE = AggregatingMergeTree
ORDER BY (day, currency, utm_source, utm_campaign)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.revenue_per_day_agg_mv TO {db}.revenue_per_day_agg AS
SELECT
    toDate(timestamp) AS day,
    JSONExtractString(properties, 'currency') AS currency,
    utm_source,
    utm_campaign,
    countState() AS orders,
    sumState(toDecimal64OrZero(trim(BOTH '"' FROM JSONExtractRaw(properties, 'revenue')), 4)) AS revenue
FROM {db}.events
WHERE event = 'Order Completed'
GROUP BY day, currency, utm_source, utm_campaign;

CREATE VIEW IF NOT EXISTS {db}.revenue_per_day AS
SELECT day, currency, utm_source, utm_campaign, countMerge(orders) AS orders, sumMerge(revenue) AS revenue
FROM {db}.revenue_per_day_agg
GROUP BY day, currency, utm_source, utm_campaign
