"""``clickpulse demo`` (what ``make demo`` runs).

Brings the embedded stack up, produces a seeded simulated clickstream into ``events.raw`` and shows
the records arriving through the real broker, then prints a short summary checked against the
simulator's ground truth. ``--keep-running`` leaves the stack up for ``clickpulse query``.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass

from kafka import KafkaConsumer
from rich.console import Console
from rich.table import Table

from connectors.settings import load_connections
from connectors.simulate import SimulateOptions, run_simulation
from connectors.stack import Stack, StackError, StackSettings


@dataclass(frozen=True)
class DemoOptions:
    """Options of ``clickpulse demo``."""

    events: int = 20_000
    seed: int = 7
    keep_running: bool = False


def _count_arrivals(
    bootstrap: str, topic: str, expected: int, console: Console, timeout_s: float = 120.0
) -> Counter:
    """Read ``topic`` from its end-before-produce position until ``expected`` records arrived."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"clickpulse-demo-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=2000,
    )
    seen: Counter = Counter()
    deadline = time.monotonic() + timeout_s
    with console.status("[cyan]reading events.raw back through the broker…") as status:
        while sum(seen.values()) < expected and time.monotonic() < deadline:
            for msg in consumer:
                seen[msg.partition] += 1
                if sum(seen.values()) % 5000 == 0:
                    status.update(f"[cyan]read {sum(seen.values()):,} / {expected:,}")
                if sum(seen.values()) >= expected:
                    break
    consumer.close()
    return seen


def run_demo(opts: DemoOptions, console: Console) -> int:
    """Run the demo; returns the process exit code."""
    stack = Stack(StackSettings())
    try:
        console.rule("[bold]clickpulse demo")
        stack.up(progress=lambda m: console.print(f"[cyan]•[/] {m}"))
        conn = load_connections(stack.root)
        topic = f"{conn.topic('events.raw')}"
        demo_topic = f"{topic}.demo-{uuid.uuid4().hex[:6]}"
        from connectors import kafka as kafka_io

        kafka_io.ensure_topics(conn.kafka_bootstrap_servers, {demo_topic: {}}, partitions=4)
        summary = run_simulation(
            conn.kafka_bootstrap_servers,
            SimulateOptions(events=opts.events, seed=opts.seed, topic=demo_topic),
            console=console,
        )
        console.print(
            f"[green]•[/] produced {summary.records:,} records in {summary.seconds:.1f}s "
            f"({summary.records / max(summary.seconds, 1e-9):,.0f}/s)"
        )
        arrived = _count_arrivals(conn.kafka_bootstrap_servers, demo_topic, summary.records, console)
        truth = summary.truth
        table = Table(title="events.raw (demo topic)", show_header=True)
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_row("records produced", f"{summary.records:,}")
        table.add_row("records read back", f"{sum(arrived.values()):,}")
        table.add_row("  per partition", ", ".join(f"p{p}={n:,}" for p, n in sorted(arrived.items())))
        table.add_row("unique valid events (truth)", f"{truth.unique_valid:,}")
        table.add_row("redelivered duplicates (truth)", f"{truth.duplicate_count:,}")
        for code, n in sorted(truth.invalid_counts.items()):
            table.add_row(f"malformed: {code} (truth)", f"{n:,}")
        table.add_row("late events (truth)", f"{len(truth.late):,}")
        table.add_row("users / sessions (truth)", f"{truth.users['user_keys']:,} / {truth.session_count:,}")
        console.print(table)
        kafka_io.delete_topics(conn.kafka_bootstrap_servers, [demo_topic])
        ok = sum(arrived.values()) == summary.records
        console.print("[green]demo ok[/]" if ok else "[red]demo incomplete: not every record arrived[/]")
        return 0 if ok else 1
    except StackError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    finally:
        if not opts.keep_running:
            stack.down(progress=lambda m: console.print(f"[cyan]•[/] {m}"))
