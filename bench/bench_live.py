"""Live dashboard benchmark: event sent to the collector → shown by the dashboard's live feed (issue 15).

Runs the real path against the stack of the environment / ``.clickpulse/stack.env`` (``python -m bench
bench_live`` starts one): the collector (``python -m connectors.collector``), the ``pipeline`` job (or
``--jobs ingest``), the loader and the dashboard (``python -m connectors.dashboard``), each its own process
on its own topic prefix and ClickHouse database, with their **default settings** (checkpoint interval,
loader batch age; ``--checkpoint-interval-ms`` / ``--batch-max-age-ms`` override them to compare).

This process posts single track events (``POST /v1/track``) at a steady ``--rate`` for ``--seconds``
and polls the dashboard's JSON API as the browser's live view does (``GET /api/live/feed_events``), every
``--poll-ms``. An event's latency is request sent → first poll whose rows hold its ``message_id`` (both
on this process's monotonic clock). The browser refreshes every ``CLICKPULSE_DASHBOARD_REFRESH_MS``
(default 1 s), which adds up to that much to what a person sees; polling faster measures the pipeline,
not the refresh timer. Also reported: the collector's ack latency and the part of the latency after the
collector received the event (its ``received_at`` → seen). Target: p99 ≤ 3 s. Prints markdown rows.

    python -m bench.bench_live [--rate 10] [--seconds 120] [--jobs pipeline|ingest] [--poll-ms 100]

The feed shows the newest 30 events, as on the page: the rate has to stay low enough that one commit of
the pipeline (a checkpoint's worth of events, loaded together) holds fewer than 30, or the older events
of a commit are never shown and are reported as not seen (at the default 1 s checkpoints, about 25
events/s; at 5 s, 5 events/s). The rate does not change the latency much: the waits are timers
(checkpoint, batch age), not queues, as long as the jobs keep up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import random
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson

from connectors import kafka as kafka_io
from connectors.clickhouse import client_from_url
from connectors.settings import CONTRACT_TOPICS, child_environment, environment, load_connections
from devstack.demo import Pipeline, PipelineConfig, quantile
from devstack.service import Service, serve

log = logging.getLogger("bench.live")

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "docs" / "rules.demo.yaml"
KEY = "bench-live-" + uuid.uuid4().hex
AUTH = {
    "Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode(),
    "Content-Type": "application/json",
}
#: Settings of the read-only ClickHouse user that the dashboard reads with (passed on when configured).
READONLY_VARS = ("CLICKPULSE_CLICKHOUSE_READONLY_USER", "CLICKPULSE_CLICKHOUSE_READONLY_PASSWORD")


def track(mid: str, i: int) -> bytes:
    """One track call with message id ``mid`` (as a browser's tracking script sends it)."""
    return orjson.dumps(
        {
            "messageId": mid,
            "anonymousId": f"live-{i % 200}",
            "event": "Product Viewed",
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "properties": {"deal_id": "LAS-DEC", "n": i},
            "context": {
                "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0.0.0 Safari/537.36",
                "page": {"url": f"https://shop.example/p/{i % 20}", "path": f"/p/{i % 20}"},
            },
        }
    )


@dataclass
class Run:
    """What one measurement saw: per message id, when it was sent, acknowledged, received and seen."""

    sent: dict[str, float] = field(default_factory=dict)  #: monotonic, request sent
    acked: dict[str, float] = field(default_factory=dict)  #: monotonic, 200 received
    seen: dict[str, float] = field(default_factory=dict)  #: monotonic, first poll showing it
    seen_after_received_ms: dict[str, float] = field(default_factory=dict)  #: wall clock: seen - received_at
    failed: int = 0
    poll_ms: list[float] = field(default_factory=list)  #: duration of each feed request
    polls: int = 0
    poll_errors: int = 0


async def poll_feed(
    session: aiohttp.ClientSession, url: str, run: Run, every_s: float, stop: asyncio.Event
) -> None:
    """GET the live feed every ``every_s`` until ``stop``; note when each message id first shows up."""
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            async with session.get(url + "/api/live/feed_events") as r:
                body = await r.json() if r.status == 200 else None
        except (TimeoutError, aiohttp.ClientError):
            body = None
        now, wall_ms = time.monotonic(), time.time() * 1000
        run.polls += 1
        run.poll_ms.append((now - t0) * 1000)
        if body is None:
            run.poll_errors += 1
        else:
            for row in body["rows"]:
                mid = row["message_id"]
                if mid in run.sent and mid not in run.seen:
                    run.seen[mid] = now
                    received = datetime.fromisoformat(row["received_at"].replace("Z", "+00:00"))
                    run.seen_after_received_ms[mid] = wall_ms - received.timestamp() * 1000
        await asyncio.sleep(max(0.0, every_s - (time.monotonic() - t0)))


async def send_steady(
    session: aiohttp.ClientSession, url: str, run: Run, rate: float, seconds: float, first: int
) -> None:
    """POST ``rate`` single track events per second for ``seconds`` (open loop)."""

    async def one(mid: str, body: bytes) -> None:
        run.sent[mid] = time.monotonic()
        try:
            async with session.post(url + "/v1/track", data=body, headers=AUTH) as r:
                await r.read()
                if r.status == 200:
                    run.acked[mid] = time.monotonic()
                    return
        except (TimeoutError, aiohttp.ClientError):
            pass
        run.failed += 1

    tasks = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        mid = f"live-{uuid.uuid4().hex}"
        tasks.append(asyncio.create_task(one(mid, track(mid, first + i))))
    await asyncio.gather(*tasks)


async def measure(
    collector: str, dashboard: str, rate: float, seconds: float, poll_s: float, warmup_s: float
) -> Run:
    """Warm up until events show in the feed, then measure a steady phase."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        warm = Run()
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_feed(session, dashboard, warm, poll_s, stop))
        deadline = time.monotonic() + 600
        i = 0
        while not warm.seen:  # jobs still starting: one event a second until the first one shows
            if time.monotonic() > deadline:
                raise SystemExit("no event reached the live feed within 600 s")
            await send_steady(session, collector, warm, 1, 1, i)
            i += 1
        log.info("first event in the live feed; warming up %.0f s at %.0f/s", warmup_s, rate)
        await send_steady(session, collector, warm, rate, warmup_s, i)
        stop.set()
        await poller

        run = Run()
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_feed(session, dashboard, run, poll_s, stop))
        await send_steady(session, collector, run, rate, seconds, 1_000_000)
        deadline = time.monotonic() + 30
        while len(run.seen) < len(run.acked) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stop.set()
        await poller
    return run


def _s(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms / 1000:.2f} s"


def browser_view(lat: list[float], period_ms: float, seed: int = 15) -> list[float]:
    """What a browser would show: the live view refreshes every ``period_ms`` (its timer plus the time
    its requests take) at a phase unrelated to the event, so an event visible in the API after ``l`` ms
    is on the page ``l + U(0, period)`` ms after it was sent (simulated with a fixed seed)."""
    rng = random.Random(seed)
    return [v + rng.uniform(0.0, period_ms) for v in lat]


def rows(run: Run, *, label: str, rate: float, poll_ms: int, refresh_ms: int, load: float) -> list[str]:
    """The markdown rows of ``run``."""
    lat = [(run.seen[m] - run.sent[m]) * 1000 for m in run.seen]
    period = refresh_ms + (quantile(run.poll_ms, 0.5) or 0.0)
    shown = browser_view(lat, period)
    ack = [(run.acked[m] - run.sent[m]) * 1000 for m in run.acked]
    after = list(run.seen_after_received_ms.values())
    missing = len(run.acked) - len(run.seen)
    p99 = quantile(lat, 0.99)
    return [
        f"| live: collector → dashboard live feed API, {rate:,.0f} events/s ({label}) "
        f"| p50 {_s(quantile(lat, 0.5))}, p99 {_s(p99)} "
        f"| {len(lat):,} of {len(run.sent):,} events seen ({missing} acknowledged but not seen within 30 s, "
        f"{run.failed} not acknowledged), max {_s(max(lat, default=None))}; sent → 200 p50 "
        f"{quantile(ack, 0.5) or 0:.0f} ms, p99 {quantile(ack, 0.99) or 0:.0f} ms; collector's received_at → "
        f"seen p50 {_s(quantile(after, 0.5))}, p99 {_s(quantile(after, 0.99))}; feed polled every {poll_ms} ms "
        f"({run.polls:,} polls, {run.poll_errors} failed), the browser's refresh ({refresh_ms} ms) adds up "
        f"to that much; load average {load:.1f}; target p99 ≤ 3 s |",
        f"| live: collector → on the page of a browser refreshing every {refresh_ms} ms ({label}; "
        f"simulated from the row above) | p50 {_s(quantile(shown, 0.5))}, p99 {_s(quantile(shown, 0.99))} "
        f"| the API latencies above plus a uniform wait for the page's next refresh (every {period:.0f} ms: "
        f"its timer plus the median request time); target p99 ≤ 3 s |",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print markdown rows."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=10.0, help="events per second (default 10)")
    p.add_argument("--seconds", type=float, default=120.0, help="length of the measured phase (default 120)")
    p.add_argument(
        "--warmup", type=float, default=15.0, help="steady traffic before measuring (default 15 s)"
    )
    p.add_argument("--poll-ms", type=int, default=100, help="how often the feed is polled (default 100)")
    p.add_argument("--jobs", choices=["pipeline", "ingest"], default="pipeline",
                   help="the Flink job between collector and loader (default pipeline)")  # fmt: skip
    p.add_argument("--checkpoint-interval-ms", type=int, default=None, help="override the default")
    p.add_argument("--batch-max-age-ms", type=int, default=None, help="override the loader's default")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    settings_env = environment()
    conn = load_connections()
    tag = uuid.uuid4().hex[:8]
    prefix = f"benchlive{tag}."
    database = f"bench_live_{tag}"
    work = REPO / ".clickpulse" / "bench-live" / tag
    (work / "logs").mkdir(parents=True, exist_ok=True)
    topics = {f"{prefix}{t}": cfg for t, cfg in CONTRACT_TOPICS.items()}
    kafka_io.ensure_topics(conn.kafka_bootstrap_servers, topics, partitions=4)

    env = child_environment(conn)
    env.update(
        CLICKPULSE_TOPIC_PREFIX=prefix,
        CLICKPULSE_REDIS_KEY_PREFIX=f"benchlive:{tag}:",
        CLICKPULSE_STATE_DIR=str(work / "home"),
        CLICKPULSE_CLICKHOUSE_DATABASE=database,
        CLICKPULSE_WRITE_KEY=KEY,
        CLICKPULSE_WEBHOOK_SECRET=secrets.token_hex(16),
    )
    env.update({k: settings_env[k] for k in READONLY_VARS if settings_env.get(k)})
    defaults = "defaults"
    if args.checkpoint_interval_ms is not None:
        env["CLICKPULSE_FLINK_CHECKPOINT_INTERVAL_MS"] = str(args.checkpoint_interval_ms)
    if args.batch_max_age_ms is not None:
        env["CLICKPULSE_LOAD_BATCH_MAX_AGE_MS"] = str(args.batch_max_age_ms)
    from connectors.dashboard.settings import DashboardSettings
    from connectors.flink import FlinkSettings
    from jobs.load import LoadSettings

    checkpoint_ms = FlinkSettings.from_env(env).checkpoint_interval_ms
    batch_ms = LoadSettings.from_env(env).batch_max_age_ms
    refresh_ms = DashboardSettings.from_env(env).refresh_ms
    if args.checkpoint_interval_ms is not None or args.batch_max_age_ms is not None:
        defaults = "overridden"
    label = f"{args.jobs} + load, checkpoints every {checkpoint_ms} ms, loader batch age {batch_ms} ms ({defaults})"

    pipeline = Pipeline(
        PipelineConfig(
            env=env, workdir=work, rules_file=RULES, database=database, group_prefix=f"benchlive-{tag}"
        )
    )
    services: list[Service] = []
    try:
        pipeline.start_all((args.jobs, "load"))
        services.append(serve("connectors.collector", env, work / "logs" / "collector.log", "/ping"))
        services.append(serve("connectors.dashboard", env, work / "logs" / "dashboard.log", "/healthz"))
        pipeline.wait_running((args.jobs, "load"), 300)
        load0 = os.getloadavg()[0]
        run = asyncio.run(
            measure(
                services[0].url, services[1].url, args.rate, args.seconds, args.poll_ms / 1000, args.warmup
            )
        )
        pipeline.check_alive()
        load = max(load0, os.getloadavg()[0])
        for row in rows(
            run, label=label, rate=args.rate, poll_ms=args.poll_ms, refresh_ms=refresh_ms, load=load
        ):
            print(row, flush=True)
    finally:
        for svc in services:
            svc.stop()
        pipeline.stop_all()
        kafka_io.delete_topics(conn.kafka_bootstrap_servers, list(topics))
        client = client_from_url(conn.clickhouse_url.get_secret_value())
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
