"""Ingest job benchmark: sustained events/s and per-event latency on this box (broker on the same box).

Throughput: pre-produce N simulated records, run the job bounded, and divide the records by the span
of the output's broker timestamps (start-up of the JVM and Python workers excluded).
Latency: run the job unbounded while producing at a steady rate; latency = time the record became
readable with ``read_committed`` minus the time it was produced (includes the checkpoint interval,
since output is transactional).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
from kafka import KafkaConsumer, TopicPartition

from connectors import kafka as kafka_io
from connectors.settings import CONTRACT_TOPICS, load_connections
from devstack.simulate import produce
from devstack.simulator import SimConfig, generate

REPO = Path(__file__).resolve().parent.parent


def _env(prefix: str, home: Path, **extra: str) -> dict[str, str]:
    conn = load_connections()
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=conn.kafka_bootstrap_servers,
        REDIS_URL=conn.redis_url.get_secret_value(),
        CLICKPULSE_TOPIC_PREFIX=prefix,
        CLICKPULSE_REDIS_KEY_PREFIX=f"bench:{prefix}",
        CLICKPULSE_STATE_DIR=str(home),
        **extra,
    )
    return env


def _topics(bootstrap: str, prefix: str) -> list[str]:
    names = [f"{prefix}{t}" for t in CONTRACT_TOPICS]
    kafka_io.ensure_topics(bootstrap, dict.fromkeys(names, {}), partitions=4)
    return names


def throughput(events: int = 200_000) -> tuple[float, int]:
    """(events/s, records) for a bounded run over ``events`` pre-produced records."""
    bootstrap = load_connections().kafka_bootstrap_servers
    prefix = f"b{uuid.uuid4().hex[:6]}."
    names = _topics(bootstrap, prefix)
    try:
        records, _ = generate(
            SimConfig.ending_at(datetime.now(UTC).replace(microsecond=0), events=events, seed=3)
        )
        produce(bootstrap, f"{prefix}events.raw", records)
        home = Path(f"/tmp/clickpulse-bench-{prefix}")  # noqa: S108 - scratch checkpoints
        subprocess.run(
            [sys.executable, "-m", "jobs.ingest", "--bounded", "--starting-offsets", "earliest"],
            env=_env(prefix, home, CLICKPULSE_FLINK_CHECKPOINT_INTERVAL_MS="10000"),
            cwd=REPO, check=True, capture_output=True, timeout=1800,
        )  # fmt: skip
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000
        )
        stamps = []
        for topic in (f"{prefix}events.enriched", f"{prefix}events.dlq"):
            consumer.assign([TopicPartition(topic, p) for p in range(4)])
            consumer.seek_to_beginning()
            stamps += [m.timestamp for m in consumer]
        consumer.close()
        span_s = (max(stamps) - min(stamps)) / 1000.0
        # duplicates produce no output record but were processed too
        return len(records) / max(span_s, 1e-3), len(records)
    finally:
        kafka_io.delete_topics(bootstrap, names)


def latency(rate: int = 2000, seconds: int = 40, checkpoint_ms: int = 1000) -> tuple[float, float, int]:
    """(p50 ms, p99 ms, samples) produce -> readable (read_committed) at a steady ``rate``."""
    bootstrap = load_connections().kafka_bootstrap_servers
    prefix = f"b{uuid.uuid4().hex[:6]}."
    names = _topics(bootstrap, prefix)
    home = Path(f"/tmp/clickpulse-bench-{prefix}")  # noqa: S108
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.ingest", "--starting-offsets", "latest"],
        env=_env(prefix, home, CLICKPULSE_FLINK_CHECKPOINT_INTERVAL_MS=str(checkpoint_ms)),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, isolation_level="read_committed", auto_offset_reset="latest",
            fetch_max_wait_ms=20,
        )  # fmt: skip
        consumer.assign([TopicPartition(f"{prefix}events.enriched", p) for p in range(4)])
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                for batch in consumer.poll(timeout_ms=100).values():
                    now = time.time()
                    for m in batch:
                        got.setdefault(orjson.loads(m.value)["message_id"], now)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(25)  # job start-up
        records, truth = generate(
            SimConfig.ending_at(datetime.now(UTC), events=rate * seconds, seed=4, duplicate_fraction=0.0,
                                malformed_fraction=0.0, late_fraction=0.0)
        )  # fmt: skip
        ids = {r.position: r.message_id for r in truth.valid}
        producer = kafka_io.producer(bootstrap, linger_ms=0)
        t0 = time.time()
        for i, rec in enumerate(records):
            delay = t0 + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            producer.send(f"{prefix}events.raw", key=rec.key, value=rec.value)
            if i in ids:
                sent[ids[i]] = time.time()
        producer.flush()
        time.sleep(max(5, 3 * checkpoint_ms / 1000))
        stop.set()
        reader.join(5)
        consumer.close()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        kafka_io.delete_topics(bootstrap, names)
    lat = sorted((got[m] - t) * 1000 for m, t in sent.items() if m in got)
    q = statistics.quantiles(lat, n=100)
    return q[49], q[98], len(lat)


def stage_only(events: int = 100_000) -> float:
    """events/s of the Python stage alone (validate + identity + enrich + JSON), no Flink, no Kafka."""
    from udfs.ingest import IngestOptions, IngestStage, MemoryIdentityStore, MemoryProfileStore

    records, _ = generate(SimConfig(events=events, seed=3))
    stage = IngestStage(IngestOptions(), MemoryIdentityStore(), MemoryProfileStore())
    stage.process_batch([r.value for r in records[:2000]], [r.timestamp_ms for r in records[:2000]],
                        [0] * 2000, list(range(2000)))  # fmt: skip  # warm caches
    t0 = time.perf_counter()
    for i in range(0, len(records), 2000):
        b = records[i : i + 2000]
        stage.process_batch(
            [r.value for r in b], [r.timestamp_ms for r in b], [0] * len(b), list(range(i, i + len(b)))
        )
    return len(records) / (time.perf_counter() - t0)


def main() -> None:
    """Print the ingest rows."""
    print(
        f"| ingest stage alone, pure Python in one process (no Flink/Kafka) | {stage_only():,.0f} events/s | the Python ceiling per core |"
    )
    eps, n = throughput()
    print(
        f"| ingest job, sustained (parallelism 1, bounded run) | {eps:,.0f} events/s | {n:,} simulated records |"
    )
    p50, p99, n = latency()
    print(
        f"| ingest job, produce → readable (read_committed), 2k events/s, checkpoint 1 s | "
        f"p50 {p50:,.0f} ms, p99 {p99:,.0f} ms | {n:,} events |"
    )


if __name__ == "__main__":
    main()
