"""Helpers shared by the tests and the benchmarks (plain functions; the pytest fixtures live in
``tests/conftest.py`` and use these).

* waiting: :func:`until` polls a condition with a deadline — tests wait for something to happen (or for
  a marker that proves everything before it was processed), never for a fixed time;
* Kafka: :func:`read_topic` reads a whole topic, :func:`send_markers` puts a marker record on every
  partition (:func:`raw_marker` for ``events.raw``);
* records: :func:`enriched_event` (what the ingest job writes), :func:`simulated_enriched` (a simulation
  through the ingest stage, in process);
* jobs: :func:`start_job` / :func:`run_job` run ``python -m jobs.<name>`` from the repository root;
* rules: :data:`DEAL_PROMO_WHEN`, the airline case, and :func:`rule_doc`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from connectors import kafka as kafka_io
from devstack.demo import read_topic
from devstack.simulator import SimConfig, SimRecord, Truth, generate
from udfs.ingest import IngestOptions, IngestStage, MemoryIdentityStore, MemoryProfileStore
from udfs.timeutil import format_ms

__all__ = [
    "DEAL_PROMO_WHEN",
    "REPO",
    "TimedOut",
    "blackhole_port",
    "check_ingest_against_truth",
    "checkpoint_after",
    "enriched_event",
    "read_topic",
    "rule_doc",
    "run_job",
    "is_marker",
    "offsets_committed_to_end",
    "produce_rows",
    "raw_marker",
    "send_markers",
    "simulate_now",
    "simulated_enriched",
    "start_job",
    "until",
]

REPO = Path(__file__).resolve().parents[1]

#: The airline case: the same deal viewed 4 times within 30 minutes.
DEAL_PROMO_WHEN: dict[str, Any] = {
    "event": "Product Viewed",
    "group_by": ["properties.deal_id"],
    "count_at_least": 4,
    "within": "30m",
}


class TimedOut(AssertionError):
    """:func:`until` gave up (an ``AssertionError``, so pytest reports it as a failed check)."""


def until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy (returned) or ``timeout_s`` passes (fail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimedOut(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(every_s)


def send_markers(
    bootstrap: str, topic: str, make: Callable[[int], tuple[str, dict[str, Any]]], partitions: int = 4
) -> list[dict[str, Any]]:
    """Put one record ``make(partition) -> (key, value)`` on each of ``partitions`` partitions of
    ``topic`` and return the values: a consumer that has processed all of them has processed everything
    produced to ``topic`` before them (Kafka keeps order per partition)."""
    producer = kafka_io.producer(bootstrap)
    values = []
    for part in range(partitions):
        key, value = make(part)
        producer.send(topic, key=key.encode(), value=orjson.dumps(value), partition=part)
        values.append(value)
    producer.flush()
    producer.close()
    return values


def produce_rows(bootstrap: str, topic: str, rows: Iterable[tuple[str, bytes]]) -> None:
    """Produce ``(key, value)`` rows to ``topic`` (partitioned by key) and wait until all are acked."""
    producer = kafka_io.producer(bootstrap)
    for key, value in rows:
        producer.send(topic, key=key.encode(), value=value)
    producer.flush()
    producer.close()


def raw_marker(partition: int) -> tuple[str, dict[str, Any]]:
    """A valid raw event (``events.raw``) named ``Marker``, message id ``marker-…``, timestamped now."""
    now = format_ms(int(time.time() * 1000))
    anonymous_id = f"marker-{partition}"
    value = {"message_id": f"marker-{partition}-{uuid.uuid4().hex[:8]}", "type": "track", "event": "Marker",
             "anonymous_id": anonymous_id, "timestamp": now, "sent_at": now}  # fmt: skip
    return anonymous_id, value


def is_marker(record: dict[str, Any]) -> bool:
    """Whether a record is (derived from) a :func:`raw_marker`."""
    return str(record.get("message_id", "")).startswith("marker-")


def offsets_committed_to_end(bootstrap: str, topic: str, group_id: str) -> bool:
    """Whether consumer group ``group_id`` has committed offsets at the end of every partition of
    ``topic`` (a Flink Kafka source commits them when a checkpoint completes)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(parts)
        return bool(parts) and all((consumer.committed(tp) or 0) >= ends[tp] for tp in parts)
    finally:
        consumer.close()


def checkpoint_after(checkpoints: Path, since: float) -> bool:
    """Whether a checkpoint (``*/chk-*/_metadata`` under ``checkpoints``) completed after wall time
    ``since``."""
    return any(m.stat().st_mtime > since for m in checkpoints.glob("*/chk-*/_metadata"))


def simulate_now(events: int, seed: int) -> tuple[list[SimRecord], Truth]:
    """A simulation of ``events`` raw records ending at the current minute (timestamps the jobs accept)."""
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    return generate(SimConfig.ending_at(end, events=events, seed=seed))


def check_ingest_against_truth(enriched: list[Any], dlq: list[Any], truth: Truth) -> list[dict[str, Any]]:
    """``events.enriched`` and ``events.dlq`` records (markers left out) against the simulation: each
    unique valid event exactly once, each bad record in the DLQ with its reason, nothing else."""
    records = [r for r in (orjson.loads(m.value) for m in enriched) if not is_marker(r)]
    ids = Counter(r["message_id"] for r in records)
    assert len(records) == truth.unique_valid, "each unique valid event exactly once"
    assert set(ids) == set(truth.unique_message_ids) and max(ids.values()) == 1
    reasons = Counter(orjson.loads(m.value)["error_code"] for m in dlq)
    assert reasons == Counter({k: v for k, v in truth.invalid_counts.items() if v})
    # in == enriched + duplicates + dlq, exactly
    assert truth.records == len(records) + truth.duplicate_count + len(dlq)
    return records


def enriched_event(user: str, name: str, ts_ms: int, **props: Any) -> dict[str, Any]:
    """An enriched event as the ingest job writes it (the fields rules and the jobs read, and more)."""
    return {
        "message_id": uuid.uuid4().hex,
        "type": "track",
        "event": name,
        "anonymous_id": f"a-{user}",
        "user_id": None,
        "user_key": user,
        "timestamp": format_ms(ts_ms),
        "event_time_ms": ts_ms,
        "received_at": format_ms(ts_ms),
        "page_url": "https://shop.example/p/42",
        "page_host": "shop.example",
        "properties": props,
        "traits": {},
        "country": "US",
        "is_bot": False,
    }


def simulated_enriched(events: int, seed: int, **config: Any) -> list[tuple[str, bytes]]:
    """``(user_key, enriched JSON)`` of a simulation (``SimConfig(events, seed, **config)``; ending now
    unless ``start`` is given) run through the ingest stage in this process, valid events only."""
    if "start" in config:
        cfg = SimConfig(events=events, seed=seed, **config)
    else:
        end = datetime.now(UTC).replace(second=0, microsecond=0)
        cfg = SimConfig.ending_at(end, events=events, seed=seed, **config)
    records, _ = generate(cfg)
    stage = IngestStage(IngestOptions(), MemoryIdentityStore(), MemoryProfileStore())
    out = stage.process_batch(
        [r.value for r in records],
        [r.timestamp_ms for r in records],
        [0] * len(records),
        list(range(len(records))),
        [r.key for r in records],
    )
    return [(k, p) for kind, k, p in zip(out.kinds, out.user_keys, out.payloads, strict=True) if kind == "ok"]


def start_job(job: str, env: dict[str, str], log_path: Path | None, *args: str) -> subprocess.Popen[bytes]:
    """``python -m jobs.<job> args`` in its own process group (kill it with ``os.killpg``), output to
    ``log_path`` (or nowhere)."""
    out = log_path.open("wb") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [sys.executable, "-m", f"jobs.{job}", *args],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if not isinstance(out, int):
            out.close()


def run_job(
    job: str, env: dict[str, str], *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``python -m jobs.<job> args`` to completion, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", f"jobs.{job}", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def blackhole_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections (kernel backlog) but never answers: a dead receiver."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


def rule_doc(rule_id: str, when: dict[str, Any], url: str, **extra: Any) -> dict[str, Any]:
    """One rule as in a rules file: ``{id, when, action: {webhook: {url}}, **extra}``."""
    return {"id": rule_id, "when": when, "action": {"webhook": {"url": url}}, **extra}
