"""Collector benchmark: events/s in batches of 100, and ack latency at 1,000 requests/s, real Kafka.

Starts the collector (``python -m connectors.collector``; with ``--server starlette`` the same protocol code
and Kafka sink on Starlette + uvicorn, ``bench/collector_starlette.py``) against the broker of the
environment / ``.clickpulse/stack.env`` on a topic prefix of its own, and drives it from this process with
an aiohttp client:

* throughput: ``--concurrency`` clients POST ``/v1/batch`` with 100 track events each for ``--seconds``;
  events/s = events answered 200 (every one acknowledged by Kafka, ``acks=all``) / wall time;
* latency: open loop, ``--rate`` single-event ``POST /v1/track`` per second for ``--seconds``; the latency
  of each is request sent → 200 received, which includes Kafka's acknowledgement.

Also reported: the server process's CPU per event (``/proc/<pid>/stat``), and a check that the topic holds
at least as many records as were acknowledged. Prints markdown rows for ``bench/RESULTS.md``.

    python -m bench.bench_collector [--server aiohttp|starlette|both] [--seconds 15] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import orjson

from connectors import kafka as kafka_io
from connectors.settings import child_environment, load_connections
from devstack.stack import free_port

KEY = "bench-" + uuid.uuid4().hex
AUTH = {
    "Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode(),
    "Content-Type": "application/json",
}
REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    topic: str


def start(server: str, bootstrap: str, log: Path) -> Server:
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    kafka_io.ensure_topics(bootstrap, {f"{prefix}events.raw": {}}, partitions=4)
    port = free_port()
    env = child_environment(load_connections())
    env.update(CLICKPULSE_TOPIC_PREFIX=prefix, CLICKPULSE_WRITE_KEY=KEY, CLICKPULSE_STATE_DIR=str(log.parent))
    module = "connectors.collector" if server == "aiohttp" else "bench.collector_starlette"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(port)], env=env, cwd=REPO, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/ping", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{server} collector did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return Server(proc, url, f"{prefix}events.raw")


def stop(s: Server, bootstrap: str) -> None:
    os.killpg(s.proc.pid, signal.SIGTERM)
    s.proc.wait(timeout=30)
    kafka_io.delete_topics(bootstrap, [s.topic])


def track(i: int) -> dict[str, object]:
    return {
        "type": "track",
        "messageId": uuid.uuid4().hex,
        "anonymousId": f"anon-{i % 5000}",
        "event": "Product Viewed",
        "timestamp": "2026-12-06T05:00:00.000Z",
        "properties": {"deal_id": "LAS-DEC", "price": 129.0, "n": i},
        "context": {"userAgent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0", "locale": "en-US",
                    "page": {"url": "https://shop.example/p/42?utm_source=google", "path": "/p/42"}},
    }  # fmt: skip


async def throughput(url: str, seconds: float, concurrency: int, batch: int = 100) -> tuple[int, int, float]:
    """(events acknowledged, requests failed, wall seconds)."""
    ok = failed = 0
    bodies = [orjson.dumps({"batch": [track(i * batch + j) for j in range(batch)]}) for i in range(50)]
    end = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal ok, failed
        while time.monotonic() < end:
            async with session.post(url + "/v1/batch", data=bodies[n % len(bodies)], headers=AUTH) as r:
                await r.read()
                if r.status == 200:
                    ok += batch
                else:
                    failed += 1
            n += 1

    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session, i) for i in range(concurrency)))
    return ok, failed, time.monotonic() - t0


async def latency(url: str, seconds: float, rate: float) -> tuple[list[float], int, float]:
    """(latencies in ms of the 200s, requests failed, achieved requests/s); open loop at ``rate``."""
    lat: list[float] = []
    failed = 0
    total = int(seconds * rate)
    bodies = [orjson.dumps({k: v for k, v in track(i).items() if k != "type"}) for i in range(200)]

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal failed
        t0 = time.perf_counter()
        try:
            async with session.post(url + "/v1/track", data=bodies[i % len(bodies)], headers=AUTH) as r:
                await r.read()
                if r.status == 200:
                    lat.append((time.perf_counter() - t0) * 1000)
                else:
                    failed += 1
        except aiohttp.ClientError:
            failed += 1

    tasks = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as session:
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, i)))
        sent_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return lat, failed, total / sent_s


def pct(values: list[float], p: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]
        if len(values) > 1
        else float("nan")
    )


def topic_records(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
        return sum(c.end_offsets(tps).values())
    finally:
        c.close()


def run(server: str, bootstrap: str, seconds: float, rate: float, concurrency: int, tmp: Path) -> list[str]:
    s = start(server, bootstrap, tmp / f"collector-{server}.log")
    rows = []
    try:
        asyncio.run(throughput(s.url, 3, concurrency))  # warm-up: connections, producer metadata
        load0 = os.getloadavg()[0]
        c0 = cpu_s(s.proc.pid)
        events, failed, wall = asyncio.run(throughput(s.url, seconds, concurrency))
        cpu = cpu_s(s.proc.pid) - c0
        rows.append(
            f"| collector ({server}), events/s in batches of 100 (POST /v1/batch, {concurrency} clients, "
            f"acks=all before 200) | {events / wall:,.0f} events/s | {events:,} events in {wall:.1f} s, "
            f"{failed} requests failed; server CPU {cpu:.1f} s ({cpu / max(events, 1) * 1e6:.0f} µs/event); "
            f"load average {load0:.1f}; target ≥ 20,000 |"
        )
        c0 = cpu_s(s.proc.pid)
        lat, failed, achieved = asyncio.run(latency(s.url, seconds, rate))
        cpu = cpu_s(s.proc.pid) - c0
        rows.append(
            f"| collector ({server}), ack latency at {rate:,.0f} requests/s (POST /v1/track, 1 event each, "
            f"open loop) | p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms | {len(lat):,} requests "
            f"(sent at {achieved:,.0f}/s), {failed} failed, max {max(lat, default=float('nan')):.0f} ms; "
            f"server CPU {cpu:.1f} s ({cpu / max(len(lat), 1) * 1e6:.0f} µs/request); target p99 ≤ 50 ms |"
        )
        acked = events + len(lat) + 0
        held = topic_records(bootstrap, s.topic)
        assert held >= acked, f"{server}: {acked} acknowledged, only {held} in {s.topic}"
    finally:
        stop(s, bootstrap)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", choices=["aiohttp", "starlette", "both"], default="both")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    bootstrap = load_connections().kafka_bootstrap_servers
    tmp = Path(".clickpulse/bench-collector")
    tmp.mkdir(parents=True, exist_ok=True)
    servers = ["aiohttp", "starlette"] if args.server == "both" else [args.server]
    for server in servers:
        for row in run(server, bootstrap, args.seconds, args.rate, args.concurrency, tmp):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
