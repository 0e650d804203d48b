"""I/O adapters around the pure logic in ``udfs``: Kafka, ClickHouse, Redis, webhooks and Flink plumbing.

Also the configuration owner (:mod:`connectors.settings`) and the long-running loops that are not
Flink jobs: the exactly-once ClickHouse loader (:mod:`connectors.loader`) and the webhook dispatch
loop (:mod:`connectors.actions`, :mod:`connectors.dispatch`).
"""
