"""Loader benchmarks: rows/s into ClickHouse, and produce -> queryable latency at a steady input rate.

``python -m bench.bench_loader`` prints markdown rows (``| benchmark | result | notes |``); ``run(results)``
fills a dict. Uses the stack of the environment / ``.clickpulse/stack.env``; creates its own topics and
database and removes them afterwards.

* throughput: N enriched events (simulator -> ingest stage, then copied with fresh message_ids) are in
  Kafka before the loader starts; rows/s is measured between the first and the last row becoming visible
  in ``events`` (so the consumer-group join is not counted), with the default batch settings.
* latency: events are produced at a fixed rate while the loader runs; for each row, ``inserted_at`` (the
  server clock at insert, same machine) minus the time it was handed to the producer.
* ``--mv-cost``: what each materialized view on ``events`` costs per inserted row. The same converted
  rows are inserted straight into ``events`` (no Kafka, no loader) with no view attached, then with each
  view alone, then with all of them; a view's cost is its insert time minus the no-view time, per row
  (best of ``--repeat`` inserts each, so other work on the box inflates it least).
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import threading
import time
import uuid
from typing import Any

import orjson

from connectors import kafka as kafka_io
from connectors.clickhouse import client_from_url
from connectors.loader import EVENTS, Loader, LoaderConfig, Msg, convert
from connectors.migrate import migrate
from connectors.settings import load_connections
from devstack.simulator import SimConfig, generate
from udfs.ingest import OK, IngestOptions, IngestStage, MemoryIdentityStore

log = logging.getLogger("bench.loader")


def _templates(n: int = 5000) -> list[dict[str, Any]]:
    raw, _ = generate(SimConfig(events=n, seed=5))
    stage = IngestStage(IngestOptions(), MemoryIdentityStore())
    out = stage.process_batch(
        [r.value for r in raw], [r.timestamp_ms for r in raw], [0] * len(raw), list(range(len(raw)))
    )
    return [orjson.loads(p) for kind, p in zip(out.kinds, out.payloads, strict=True) if kind == OK]


def _copies(templates: list[dict[str, Any]], n: int) -> list[tuple[str, bytes, bytes]]:
    out = []
    for i in range(n):
        rec = dict(templates[i % len(templates)])
        rec["message_id"] = str(uuid.uuid4())
        out.append((rec["message_id"], rec["user_key"].encode(), orjson.dumps(rec)))
    return out


class _Env:
    def __init__(self) -> None:
        self.conn = load_connections()
        self.url = self.conn.clickhouse_url.get_secret_value()
        self.db = f"bench_{uuid.uuid4().hex[:8]}"
        tag = uuid.uuid4().hex[:8]
        self.topics = [f"bench.{tag}.events.enriched", f"bench.{tag}.sessions", f"bench.{tag}.events.dlq"]
        kafka_io.ensure_topics(self.conn.kafka_bootstrap_servers, {t: {} for t in self.topics}, partitions=4)
        migrate(self.url, self.db)
        self.client = client_from_url(self.url)

    def config(self, **kw: Any) -> LoaderConfig:
        return LoaderConfig(
            bootstrap_servers=self.conn.kafka_bootstrap_servers,
            clickhouse_url=self.url,
            database=self.db,
            events_topic=self.topics[0],
            sessions_topic=self.topics[1],
            dlq_topic=self.topics[2],
            group_id=f"bench-{uuid.uuid4().hex[:8]}",
            **kw,
        )

    def count(self) -> int:
        return int(str(self.client.command(f"SELECT count() FROM {self.db}.events")))

    def close(self) -> None:
        self.client.command(f"DROP DATABASE IF EXISTS {self.db}")
        self.client.close()
        kafka_io.delete_topics(self.conn.kafka_bootstrap_servers, self.topics)


def _start(cfg: LoaderConfig) -> tuple[Loader, threading.Thread]:
    loader = Loader(cfg)
    th = threading.Thread(target=loader.run, name="loader", daemon=True)
    th.start()
    return loader, th


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def throughput(events: int = 100_000, **config: Any) -> tuple[float, int, float]:
    """Rows/s of the loader into ``events`` (all rollups maintained), and the loader's CPU µs per row
    (this process while the loader ran; ClickHouse's work is not in it); ``config``: LoaderConfig overrides.
    """
    env = _Env()
    try:
        records = _copies(_templates(), events)
        p = kafka_io.producer(env.conn.kafka_bootstrap_servers)
        for _mid, key, value in records:
            p.send(env.topics[0], key=key, value=value)
        p.flush(120)
        p.close()
        cpu0 = _cpu_s()
        loader, th = _start(env.config(**config))
        first_t = first_n = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            n = env.count()
            now = time.monotonic()
            if first_t is None and n > 0:
                first_t, first_n = now, n
            if n >= events:
                break
            time.sleep(0.05)
        cpu = _cpu_s() - cpu0
        loader.stop()
        th.join(60)
        if first_t is None or first_n is None or now <= first_t:
            raise RuntimeError("loader made no progress")
        return (events - first_n) / (now - first_t), events, cpu / events * 1e6
    finally:
        env.close()


def latency(rate: int = 1000, seconds: int = 20) -> tuple[float, float, int]:
    """p50/p99 (ms) from handing an event to the producer until its row is in ``events``."""
    env = _Env()
    try:
        records = _copies(_templates(), rate * seconds)
        loader, th = _start(env.config())
        time.sleep(5)  # let the group form before the clock starts
        produced_at: dict[str, float] = {}
        p = kafka_io.producer(env.conn.kafka_bootstrap_servers)
        t0 = time.time()
        for i, (mid, key, value) in enumerate(records):
            due = t0 + i / rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            produced_at[mid] = time.time()
            p.send(env.topics[0], key=key, value=value)
        p.flush(60)
        p.close()
        deadline = time.monotonic() + 120
        while env.count() < len(records) and time.monotonic() < deadline:
            time.sleep(0.2)
        loader.stop()
        th.join(60)
        rows = env.client.query(
            f"SELECT message_id, toUnixTimestamp64Milli(inserted_at) FROM {env.db}.events"
        ).result_rows
        lat = sorted(int(ms) - produced_at[mid] * 1000 for mid, ms in rows if mid in produced_at)
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return p50, p99, len(lat)
    finally:
        env.close()


def mv_cost(rows: int = 50_000, repeat: int = 3) -> list[tuple[str, float]]:
    """``(view, µs per inserted row)`` for every materialized view reading ``events``, first ``(none)``
    (the insert alone, absolute) and last ``(all)`` (every view at once, above the insert alone)."""
    env = _Env()
    try:
        msgs = [Msg("t", 0, i, key, value) for i, (_m, key, value) in enumerate(_copies(_templates(), rows))]
        table = convert(EVENTS, msgs).table
        views = env.client.query(
            "SELECT name, create_table_query FROM system.tables WHERE database = {db:String} "
            "AND engine = 'MaterializedView' AND has(dependencies_table, 'events') ORDER BY name",
            parameters={"db": env.db},
        ).result_rows
        if not views:  # older servers do not fill dependencies_table for the views' source
            views = env.client.query(
                "SELECT name, create_table_query FROM system.tables WHERE database = {db:String} "
                "AND engine = 'MaterializedView' AND create_table_query LIKE {src:String} ORDER BY name",
                parameters={"db": env.db, "src": f"%FROM {env.db}.events%"},
            ).result_rows
        for name, _ddl in views:
            env.client.command(f"DROP VIEW {env.db}.{name}")

        def best() -> float:
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                env.client.insert_arrow("events", table, database=env.db, settings={"insert_deduplicate": 0})
                times.append(time.perf_counter() - t0)
            return min(times) / rows * 1e6

        base = best()
        out = [("(none)", base)]
        for name, ddl in views:
            env.client.command(ddl)
            out.append((str(name), best() - base))
            env.client.command(f"DROP VIEW {env.db}.{name}")
        for _name, ddl in views:
            env.client.command(ddl)
        out.append(("(all)", best() - base))
        return out
    finally:
        env.close()


def run(results: dict[str, Any], events: int = 100_000, latency_too: bool = True) -> None:
    """Run the measurements; put them in ``results`` and print the markdown rows."""
    rps, n, cpu_us = throughput(events)
    results.update(loader_rows_per_s=rps, loader_cpu_us_per_row=cpu_us)
    cfg = LoaderConfig(bootstrap_servers="", clickhouse_url="")
    print(
        f"| loader, Kafka → ClickHouse events + 7 MV rollups (embedded endpoint, batches ≤ "
        f"{cfg.batch_max_rows:,} rows or {cfg.batch_max_seconds * 1000:.0f} ms, the defaults) "
        f"| {rps:,.0f} rows/s | {n:,} enriched events already in Kafka, 4 partitions; loader CPU "
        f"{cpu_us:.1f} µs/row |"
    )
    if not latency_too:
        return
    rate, seconds = 1000, 20
    p50, p99, m = latency(rate, seconds)
    results.update(loader_latency_p50_ms=p50, loader_latency_p99_ms=p99)
    print(
        f"| loader, produce → queryable in ClickHouse, {rate:,} events/s | p50 {p50:,.0f} ms, p99 {p99:,.0f} ms "
        f"| {m:,} events over {seconds} s, batches ≤ 1 s |"
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.bench_loader [--events N] [--no-latency] [--mv-cost [--rows N --repeat K]]``."""
    ap = argparse.ArgumentParser(prog="python -m bench.bench_loader", description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000, help="records for the throughput run")
    ap.add_argument("--no-latency", action="store_true", help="skip the produce → queryable latency run")
    ap.add_argument("--mv-cost", action="store_true", help="only measure each materialized view's cost")
    ap.add_argument("--rows", type=int, default=50_000, help="rows per insert for --mv-cost")
    ap.add_argument("--repeat", type=int, default=3, help="inserts per configuration for --mv-cost (best)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.mv_cost:
        for name, us in mv_cost(args.rows, args.repeat):
            what = "insert into events alone" if name == "(none)" else f"materialized view {name}"
            note = "absolute" if name == "(none)" else "added to the insert alone"
            print(f"| {what}, µs per inserted row | {us:.2f} µs | {args.rows:,} rows per insert, best of "
                  f"{args.repeat}; {note} |")  # fmt: skip
        return
    run({}, args.events, latency_too=not args.no_latency)


if __name__ == "__main__":
    main()
