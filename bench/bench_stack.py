"""Stack benchmark: embedded ClickHouse ``insert_arrow`` rows/s, Kafka produce/consume records/s.

Runs against the services in the environment / ``.clickpulse/stack.env``; prints markdown rows.
"""

from __future__ import annotations

import time
import uuid

import pyarrow as pa
from kafka import KafkaConsumer, TopicPartition

from connectors import kafka as kafka_io
from connectors.clickhouse import client_from_url
from connectors.settings import load_connections


def bench_clickhouse(url: str, rows: int = 1_000_000, batch: int = 100_000) -> float:
    """rows/s of clickhouse-connect ``insert_arrow`` (compression on) into a MergeTree table."""
    db = f"bench_{uuid.uuid4().hex[:8]}"
    client = client_from_url(url)
    client.command(f"CREATE DATABASE {db}")
    try:
        client.command(
            f"CREATE TABLE {db}.t (ts DateTime64(3, 'UTC'), event LowCardinality(String), user_key String, "
            "page_path String, revenue Float64) ENGINE = MergeTree ORDER BY (event, ts)"
        )
        table = pa.table(
            {
                "ts": pa.array([1_795_000_000_000 + i for i in range(batch)], pa.timestamp("ms", tz="UTC")),
                "event": pa.array(
                    [("Product Viewed", "page", "Order Completed")[i % 3] for i in range(batch)]
                ),
                "user_key": pa.array([f"user-{i % 5000}" for i in range(batch)]),
                "page_path": pa.array([f"/p/{i % 700}" for i in range(batch)]),
                "revenue": pa.array([float(i % 100) for i in range(batch)]),
            }
        )
        t0 = time.perf_counter()
        for _ in range(rows // batch):
            client.insert_arrow(f"{db}.t", table)
        secs = time.perf_counter() - t0
        assert client.query(f"SELECT count() FROM {db}.t").result_rows[0][0] == rows
        return rows / secs
    finally:
        client.command(f"DROP DATABASE {db}")


def bench_kafka(bootstrap: str, records: int = 200_000, size: int = 300) -> tuple[float, float]:
    """(produce, consume) records/s with kafka-python on a 4-partition topic."""
    topic = f"bench_{uuid.uuid4().hex[:8]}"
    kafka_io.ensure_topics(bootstrap, {topic: {}}, partitions=4)
    try:
        payload = b"x" * size
        producer = kafka_io.producer(bootstrap)
        t0 = time.perf_counter()
        for i in range(records):
            producer.send(topic, key=str(i % 1000).encode(), value=payload)
        producer.flush()
        produce_rate = records / (time.perf_counter() - t0)
        producer.close()
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000,
            fetch_max_bytes=50 * 1024 * 1024, max_partition_fetch_bytes=10 * 1024 * 1024,
        )  # fmt: skip
        consumer.assign([TopicPartition(topic, p) for p in range(4)])
        n = 0
        t0 = time.perf_counter()
        for _ in consumer:
            n += 1
            if n == records:
                break
        consume_rate = n / (time.perf_counter() - t0)
        consumer.close()
        return produce_rate, consume_rate
    finally:
        kafka_io.delete_topics(bootstrap, [topic])


def main() -> None:
    """Print the stack's rows."""
    conn = load_connections()
    ch = bench_clickhouse(conn.clickhouse_url.get_secret_value())
    print(
        f"| embedded ClickHouse insert_arrow (100k-row batches, compression on) | {ch:,.0f} rows/s | 1M rows, 5 columns |"
    )
    prod, cons = bench_kafka(conn.kafka_bootstrap_servers)
    print(
        f"| Kafka produce, kafka-python (lz4, acks=all, idempotent) | {prod:,.0f} records/s | 200k × 300 B |"
    )
    print(f"| Kafka consume, kafka-python | {cons:,.0f} records/s | 200k × 300 B, 4 partitions |")


if __name__ == "__main__":
    main()
