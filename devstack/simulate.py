"""``clickpulse simulate``: produce the simulator's records into Kafka, optionally rate-limited."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from connectors import kafka as kafka_io
from connectors.progress import progress_bar
from devstack.simulator import SimConfig, SimRecord, Truth, generate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulateOptions:
    """What ``clickpulse simulate`` was asked for."""

    events: int = 10_000
    rate: float = 0.0
    seed: int = 42
    start: str | None = None
    truth_path: str | None = None
    topic: str = "events.raw"
    duplicate_fraction: float = 0.03
    malformed_fraction: float = 0.02
    late_fraction: float = 0.01


@dataclass(frozen=True)
class SimulateSummary:
    """What was produced."""

    records: int
    unique_valid: int
    duplicates: int
    invalid: int
    seconds: float
    truth: Truth


def sim_config(opts: SimulateOptions, *, now: datetime | None = None) -> SimConfig:
    """The simulator config for ``opts``; without ``start`` the simulated run ends about now.

    Kafka (4.x) rejects record timestamps more than an hour in the future, so the default start is
    ``now - span`` rounded down to the minute.
    """
    base = SimConfig(
        events=opts.events,
        seed=opts.seed,
        duplicate_fraction=opts.duplicate_fraction,
        malformed_fraction=opts.malformed_fraction,
        late_fraction=opts.late_fraction,
    )
    if opts.start:
        start = datetime.fromisoformat(opts.start)
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
    else:
        now = now or datetime.now(UTC)
        start = (now - base.span - timedelta(minutes=1)).replace(second=0, microsecond=0)
    return SimConfig(**{**base.__dict__, "start": start})


@dataclass
class Produced:
    """When each record was handed to the producer (wall clock, by position) and the elapsed time."""

    sent_at: list[float]
    seconds: float


def produce(
    bootstrap: str,
    topic: str,
    records: Sequence[SimRecord],
    *,
    rate: float = 0.0,
    progress: Callable[[int], None] | None = None,
    pause: Callable[[int], bool] | None = None,
) -> Produced:
    """Send ``records`` in order, at most ``rate`` per second (0: no fixed limit).

    ``pause(i)`` (optional, checked every 100 records) makes the producer wait while it returns true,
    ``i`` being the number of records handed to the producer so far (the demo's
    :class:`devstack.demo.IngestBacklog`). Record timestamps are the simulated receive times.
    """
    producer = kafka_io.producer(bootstrap, linger_ms=5)
    sent_at = [0.0] * len(records)
    t0 = time.monotonic()
    try:
        for i, rec in enumerate(records):
            if i % 100 == 0:
                if pause is not None and pause(i):
                    producer.flush()
                    while pause(i):
                        time.sleep(0.02)
                if progress is not None and i % 1000 == 0:
                    progress(i)
            if rate > 0 and i % 16 == 0:
                ahead = i / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            sent_at[i] = time.time()
            producer.send(topic, key=rec.key, value=rec.value, timestamp_ms=rec.timestamp_ms)
        producer.flush()
    finally:
        producer.close()
    if progress is not None:
        progress(len(records))
    return Produced(sent_at, time.monotonic() - t0)


def run_simulation(bootstrap: str, opts: SimulateOptions, console: Console | None = None) -> SimulateSummary:
    """Generate, write the truth file if asked, produce; return counts. With ``console``, a progress bar
    (:func:`connectors.progress.progress_bar`: only on a terminal)."""
    cfg = sim_config(opts)
    records, truth = generate(cfg)
    if opts.truth_path:
        Path(opts.truth_path).write_bytes(truth.to_json())
    t0 = time.monotonic()
    if console is not None:
        with progress_bar(console, "producing", total=len(records)) as bar:
            produce(bootstrap, opts.topic, records, rate=opts.rate,
                    progress=lambda i: bar.update(completed=i))  # fmt: skip
    else:
        produce(bootstrap, opts.topic, records, rate=opts.rate)
    seconds = time.monotonic() - t0
    return SimulateSummary(
        records=len(records),
        unique_valid=truth.unique_valid,
        duplicates=truth.duplicate_count,
        invalid=sum(truth.invalid_counts.values()),
        seconds=seconds,
        truth=truth,
    )
