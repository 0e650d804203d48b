"""``clickpulse demo`` (what ``make demo`` runs): the pipeline on the embedded stack, end to end.

1. ``stack up`` (Kafka, Redis, ClickHouse endpoint);
2. a fresh set of contract topics under the prefix ``demo.`` and a fresh database ``clickpulse_demo``;
3. a seeded simulated clickstream into ``demo.events.raw`` (duplicates, malformed, late events, a deal
   viewed four times, bots, campaigns);
4. the jobs of this build, each as a bounded run on the local mini-cluster: ingest, sessionize (when
   present), then the loader into ClickHouse (which applies the migrations first);
5. a summary checked against the simulator's ground truth.

``--keep-running`` leaves the stack up so ``clickpulse query`` can explore ``clickpulse_demo``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson
from kafka import KafkaConsumer, TopicPartition
from rich.console import Console
from rich.table import Table

from connectors import kafka as kafka_io
from connectors.clickhouse import client_from_url
from connectors.settings import CONTRACT_TOPICS, load_connections
from connectors.simulate import SimulateOptions, run_simulation
from connectors.stack import Stack, StackError, StackSettings

PREFIX = "demo."
DATABASE = "clickpulse_demo"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DemoOptions:
    """Options of ``clickpulse demo``."""

    events: int = 100_000
    seed: int = 7
    keep_running: bool = False


def _read_values(bootstrap: str, topic: str) -> list[bytes]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=3000,
    )
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()])
    values = [m.value for m in consumer]
    consumer.close()
    return values


def _run_job(
    console: Console, title: str, module: str, args: list[str], env: dict[str, str], log: Path
) -> None:
    t0 = time.monotonic()
    with console.status(f"[cyan]{title}…"), open(log, "ab") as out:
        res = subprocess.run(  # noqa: S603 - fixed argv
            [sys.executable, "-m", module, *args],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if res.returncode != 0:
        raise StackError(f"{module} failed (exit {res.returncode}); see {log}")
    console.print(f"[green]•[/] {title} ({time.monotonic() - t0:.0f}s)")


def run_demo(opts: DemoOptions, console: Console) -> int:
    """Run the demo; returns the process exit code."""
    stack = Stack(StackSettings())
    try:
        console.rule("[bold]clickpulse demo")
        stack.up(progress=lambda m: console.print(f"[cyan]•[/] {m}"))
        conn = load_connections(stack.root)
        bootstrap = conn.kafka_bootstrap_servers
        ch_url = conn.clickhouse_url.get_secret_value()

        topics = {f"{PREFIX}{t}": cfg for t, cfg in CONTRACT_TOPICS.items()}
        kafka_io.delete_topics(bootstrap, topics)
        time.sleep(1.0)  # topic deletion is asynchronous
        kafka_io.ensure_topics(bootstrap, topics, partitions=4)
        client = client_from_url(ch_url)
        client.command(f"DROP DATABASE IF EXISTS {DATABASE}")
        console.print(f"[green]•[/] fresh topics {PREFIX}* and database {DATABASE}")

        summary = run_simulation(
            bootstrap,
            SimulateOptions(events=opts.events, seed=opts.seed, topic=f"{PREFIX}events.raw"),
            console,
        )
        truth = summary.truth
        console.print(f"[green]•[/] produced {summary.records:,} records in {summary.seconds:.1f}s")

        logs = stack.logs
        env = dict(os.environ)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            REDIS_URL=conn.redis_url.get_secret_value(),
            CLICKHOUSE_URL=ch_url,
            CLICKPULSE_TOPIC_PREFIX=PREFIX,
            CLICKPULSE_REDIS_PREFIX=f"demo:{time.time_ns()}:",
            CLICKPULSE_HOME=str(stack.root / "demo"),
        )
        common = ["--bounded", "--starting-offsets", "earliest", "--restore", "none"]
        _run_job(
            console,
            "ingest: validate, dedup, identity, enrich",
            "jobs.ingest",
            [*common, "--group-id", f"demo-ingest-{time.time_ns()}"],
            env,
            logs / "demo-ingest.log",
        )
        has_sessions = importlib.util.find_spec("jobs.sessionize") is not None
        if has_sessions:
            _run_job(
                console,
                "sessionize: event-time sessions",
                "jobs.sessionize",
                [*common, "--group-id", f"demo-sessionize-{time.time_ns()}"],
                env,
                logs / "demo-sessionize.log",
            )
        _run_job(
            console,
            "load: ClickHouse (migrations, Arrow inserts)",
            "jobs.load",
            [
                "--bounded",
                "--migrate",
                "--database",
                DATABASE,
                "--starting-offsets",
                "earliest",
                "--group-id",
                f"demo-load-{time.time_ns()}",
            ],
            env,
            logs / "demo-load.log",
        )

        dlq = Counter(orjson.loads(v)["error_code"] for v in _read_values(bootstrap, f"{PREFIX}events.dlq"))
        q = lambda sql: client.query(sql).result_rows  # noqa: E731
        events = q(f"SELECT count() FROM {DATABASE}.events")[0][0]
        sessions = q(f"SELECT count() FROM {DATABASE}.sessions FINAL WHERE NOT retracted")[0][0]
        duplicates = summary.records - events - sum(dlq.values())

        table = Table(title="clickpulse demo", show_header=True)
        table.add_column("what")
        table.add_column("pipeline", justify="right")
        table.add_column("truth", justify="right")
        table.add_row("raw records in", f"{summary.records:,}", f"{truth.records:,}")
        table.add_row("enriched events (ClickHouse)", f"{events:,}", f"{truth.unique_valid:,}")
        table.add_row("duplicates dropped", f"{duplicates:,}", f"{truth.duplicate_count:,}")
        for code, n in sorted(truth.invalid_counts.items()):
            table.add_row(f"DLQ {code}", f"{dlq.get(code, 0):,}", f"{n:,}")
        late = len(_read_values(bootstrap, f"{PREFIX}events.late"))
        table.add_row(
            "sessions (truth: as if nothing were late)", f"{sessions:,}", f"{truth.session_count:,}"
        )
        table.add_row("events.late (delivered hours late)", f"{late:,}", f"{len(truth.late):,}")
        console.print(table)

        pages = q(
            f"SELECT page_path, count() AS views FROM {DATABASE}.events WHERE type = 'page' "
            "GROUP BY page_path ORDER BY views DESC LIMIT 5"
        )
        campaigns = q(
            f"SELECT utm_campaign, count() AS events FROM {DATABASE}.events WHERE utm_campaign != '' "
            "GROUP BY utm_campaign ORDER BY events DESC LIMIT 5"
        )
        dau = q(f"SELECT day, users FROM {DATABASE}.daily_active_users ORDER BY day")
        small = Table("top pages", "views", "top campaigns", "events", "day", "DAU")
        for i in range(max(len(pages), len(campaigns), len(dau))):
            row = [
                *(pages[i] if i < len(pages) else ("", "")),
                *(campaigns[i] if i < len(campaigns) else ("", "")),
                *(dau[i] if i < len(dau) else ("", "")),
            ]
            small.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row))
        console.print(small)

        ok = events == truth.unique_valid and all(dlq.get(c, 0) == n for c, n in truth.invalid_counts.items())
        console.print(
            "[green]demo ok: every number matches the simulator's truth[/]"
            if ok
            else "[red]demo: numbers differ from the truth (see the table)[/]"
        )
        if opts.keep_running:
            console.print(
                f'explore: clickpulse query "SELECT event, count() FROM {DATABASE}.events GROUP BY event"'
            )
        return 0 if ok else 1
    except StackError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    finally:
        if not opts.keep_running:
            stack.down(progress=lambda m: console.print(f"[cyan]•[/] {m}"))
