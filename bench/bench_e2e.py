"""End-to-end benchmark: every job at once on this box, raw events -> ClickHouse and -> webhooks.

``python -m bench bench_e2e`` (or ``python -m bench.bench_e2e`` against the stack in the environment /
``.clickpulse/stack.env``). The jobs run as in ``clickpulse demo`` (:class:`devstack.demo.Pipeline`:
ingest, sessionize, triggers, dispatch, load, each its own process, Flink jobs at parallelism 1) on
their own topic prefix and database, with the demo rules plus one rule firing on every ``Order
Completed`` (more samples for the webhook latency), delivered to a receiver in this process.
``--pipeline`` (what ``bench.bench_pipeline`` runs) measures the production shape instead: the
``pipeline`` job (ingest, sessions and triggers in one Flink graph, ``--no-dispatch``), ``dispatch`` and
``load``.

1. **Latency**: simulated traffic at a steady rate well below capacity; for every event, wall-clock
   times on this machine: handed to the producer; readable in ``events.enriched`` (a ``read_committed``
   consumer in this process: ingest's exactly-once output becomes visible at its checkpoints);
   ``inserted_at`` of its ClickHouse row (event -> queryable); for actions fired by an event (deal
   promo, order webhook), ``fired_at`` (the triggers operator's clock) and the receiver's receipt
   (event -> webhook). The median of each hop says where the time goes.
2. **Throughput**: then a burst of simulated records produced as fast as possible while everything
   runs; sustained events/s = raw records / time until ClickHouse has every event, and how long
   sessionize and triggers (or the pipeline job) needed to read the whole burst. CPU seconds per job
   (its process group: driver, JVM, Python workers) and per event, over the burst and over the steady
   phase, show who uses the two cores (``bench``: this process, i.e. producer, tail and receiver).
   ``--burst 0`` skips this phase.

``--latency-log FILE`` also writes every measured action's times (event handed to the producer,
``fired_at``, received) and the Flink jobs' checkpoint history (trigger and acknowledgement times, from
their REST API) as JSON lines, and prints the webhook latency by the event's phase within the checkpoint
interval: whether the slow actions are those whose event met a checkpoint.

Prints markdown rows (``| benchmark | result | notes |``).
"""

from __future__ import annotations

import argparse
import bisect
import logging
import os
import resource
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import yaml
from kafka import KafkaConsumer, TopicPartition

from connectors import kafka as kafka_io
from connectors.clickhouse import client_from_url
from connectors.settings import CONTRACT_TOPICS, load_connections
from devstack.demo import (
    ALL_JOBS,
    DEMO_RULES,
    PIPELINE_JOB,
    Pipeline,
    PipelineConfig,
    caught_up,
    data_end_offsets,
    job_environment,
    produce,
    quantile,
    rules_for_port,
)
from devstack.receiver import WebhookReceiver
from devstack.simulator import SimConfig, generate
from udfs.timeutil import parse_timestamp_ms

log = logging.getLogger("bench.e2e")

#: The processes of ``--pipeline``: the one Flink job, the dispatch loop on its own, the loader.
PIPELINE_JOBS = (PIPELINE_JOB, "dispatch", "load")


def group_cpu_by_pid(pgid: int) -> dict[int, float]:
    """utime + stime in seconds of every live process in process group ``pgid``, by pid (Linux ``/proc``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ...
            found[int(pid_dir.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def _cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in process group ``pgid``."""
    return sum(group_cpu_by_pid(pgid).values())


def _cpu(pipeline: Pipeline, jobs: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds so far of each job's process group, and of this process (``bench``)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **{j: _cpu_seconds(pipeline.jobs[j].proc.pid) for j in jobs},
        "bench": own.ru_utime + own.ru_stime,
    }


def _cpu_note(cpu: dict[str, float], events: int) -> str:
    """``job 12 s (120 µs/event), …``, busiest first."""
    return ", ".join(
        f"{j} {cpu[j]:.0f} s ({cpu[j] / max(1, events) * 1e6:,.0f} µs/event)"
        for j in sorted(cpu, key=lambda j: -cpu[j])
    )


class Tail(threading.Thread):
    """Records when each message id becomes readable (``read_committed``) in a topic."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(name=f"tail-{topic}", daemon=True)
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
        )
        parts = [TopicPartition(topic, p) for p in self._consumer.partitions_for_topic(topic) or ()]
        self._consumer.assign(parts)
        self._consumer.seek_to_beginning(*parts)

    def run(self) -> None:
        while not self.stop.is_set():
            for batch in self._consumer.poll(timeout_ms=100).values():
                now = time.time()
                for m in batch:
                    mid = orjson.loads(m.value).get("message_id")
                    if mid:
                        self.seen.setdefault(mid, now)
        self._consumer.close()


def _count(client: object, database: str) -> int:
    """Rows in ``<database>.events`` (0 before the loader created the table)."""
    try:
        return int(str(client.command(f"SELECT count() FROM {database}.events")))  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not migrated yet
        return 0


def _p(values: list[float], q: float) -> str:
    v = quantile(values, q)
    return "–" if v is None else (f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms")


def _over(values: list[float], limit_ms: float) -> str:
    """How many of ``values`` exceed ``limit_ms``, with their share: steadier than a p99 over a few
    thousand samples, which one slow episode of a few seconds decides."""
    n = sum(v > limit_ms for v in values)
    return f"{n:,} ({100 * n / len(values):.1f} %)" if values else "–"


def add_job_env_option(p: argparse.ArgumentParser) -> None:
    """``--job-env NAME=VALUE`` (repeatable): settings for the benchmarked jobs, for A/B runs."""
    p.add_argument(
        "--job-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the jobs (e.g. CLICKPULSE_TRIGGERS_TIMER_SERVICE=rocksdb), for A/B runs; repeatable",
    )


def job_env_of(args: argparse.Namespace) -> dict[str, str]:
    """The ``--job-env`` settings as a mapping."""
    return dict(item.split("=", 1) for item in args.job_env)


#: Checkpoints (the newest) whose per-task statistics ``--latency-log`` writes.
CHECKPOINT_DETAILS = 30


def checkpoint_history(pipeline: Pipeline, job: str) -> list[dict[str, object]]:
    """A Flink job's completed checkpoints from its REST API (``[]`` for a job without one):
    ``trigger_timestamp`` and ``latest_ack_timestamp`` (epoch ms), ``end_to_end_duration``; the newest
    :data:`CHECKPOINT_DETAILS` also with each task's (first subtask's) alignment, synchronous and
    asynchronous part, start delay and acknowledgement time (``tasks``, by task name)."""
    rest = pipeline.rest_url(job) if job not in ("dispatch", "load") else None
    if rest is None or pipeline.flink_state(job) is None:
        return []
    jid = pipeline.jobs[job].job_id
    try:
        history = httpx.get(f"{rest}/jobs/{jid}/checkpoints", timeout=10).json().get("history", [])
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("%s: no checkpoint history (%s)", job, exc)
        return []
    keep = ("id", "status", "trigger_timestamp", "latest_ack_timestamp", "end_to_end_duration")
    done = [{k: c.get(k) for k in keep} | {"job": job} for c in history if c.get("status") == "COMPLETED"]
    try:  # where the last checkpoints' time went, per task: alignment, synchronous and asynchronous part
        names = {v["id"]: v["name"] for v in httpx.get(f"{rest}/jobs/{jid}", timeout=10).json()["vertices"]}
        for c in done[:CHECKPOINT_DETAILS]:
            base = f"{rest}/jobs/{jid}/checkpoints/details/{c['id']}/subtasks"
            c["tasks"] = {
                names[vid][:120]: {
                    k: st.get(k)
                    for st in httpx.get(f"{base}/{vid}", timeout=10).json()["subtasks"][:1]
                    for k in (
                        "ack_timestamp",
                        "end_to_end_duration",
                        "start_delay",
                        "checkpoint",
                        "alignment",
                    )
                }
                for vid in names
            }
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        log.warning("%s: no checkpoint details (%s)", job, exc)
    return done


def write_latency_log(
    path: Path, timings: list[tuple[float, float, float]], checkpoints: dict[str, list[dict[str, object]]]
) -> None:
    """One JSON line per action (``sent``, ``fired``, ``received``: epoch s) and per checkpoint."""
    with path.open("wb") as f:
        for sent, fired, received in timings:
            f.write(orjson.dumps({"sent": sent, "fired": fired, "received": received}) + b"\n")
        for cs in checkpoints.values():
            for c in cs:
                f.write(orjson.dumps({"checkpoint": c}) + b"\n")
    log.info(
        "latency log: %d actions, %d checkpoints in %s",
        len(timings),
        sum(map(len, checkpoints.values())),
        path,
    )


def phase_table(timings: list[tuple[float, float, float]], checkpoints: list[dict[str, object]]) -> str:
    """Event → webhook (and event → ``fired_at``) latency by where the event was sent within the
    checkpoint cycle: tenths of the time from the last checkpoint's trigger to the next one's. Checkpoints
    that stall the path show as tenths whose p99 stands out."""
    triggers = sorted(float(str(c["trigger_timestamp"])) / 1000 for c in checkpoints)
    hook: list[list[float]] = [[] for _ in range(10)]
    fire: list[list[float]] = [[] for _ in range(10)]
    for sent, fired, received in timings:
        i = bisect.bisect_right(triggers, sent)
        if i == 0 or i == len(triggers):
            continue
        prev, nxt = triggers[i - 1], triggers[i]
        k = min(9, int(10 * (sent - prev) / (nxt - prev)))
        hook[k].append((received - sent) * 1000)
        fire[k].append((fired - sent) * 1000)
    lines = [
        "| event sent at (part of the checkpoint cycle) | actions | webhook p50 / p99 / max | fired_at p50 / p99 |",
        "|---|---|---|---|",
    ]
    for k, (h, f) in enumerate(zip(hook, fire, strict=True)):
        top = f"{max(h):.0f} ms" if h else "–"
        lines.append(
            f"| {k / 10:.1f}–{(k + 1) / 10:.1f} | {len(h)} | {_p(h, 0.5)} / {_p(h, 0.99)} / {top} "
            f"| {_p(f, 0.5)} / {_p(f, 0.99)} |"
        )
    return "\n".join(lines)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM ends the run like Ctrl-C does: through the ``finally`` blocks that stop the jobs, drop the
    database and delete the topics (the default action would leave the jobs running)."""
    log.warning("signal %d: stopping the jobs and cleaning up", signum)
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run both phases and print the rows."""
    p = argparse.ArgumentParser(prog="bench.bench_e2e", description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=300.0, help="steady rate of the latency phase (records/s)")
    p.add_argument("--seconds", type=int, default=60, help="length of the measured latency phase")
    p.add_argument("--warmup", type=int, default=20, help="seconds at the steady rate before measuring")
    p.add_argument("--burst", type=int, default=100_000, help="records of the throughput phase (0: skip it)")
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="run the pipeline job (--no-dispatch), dispatch and load instead of the five separate jobs",
    )
    p.add_argument(
        "--read-uncommitted",
        action="store_true",
        help="the triggers job reads events.enriched read_uncommitted (CLICKPULSE_TRIGGERS_READ_UNCOMMITTED)",
    )
    p.add_argument(
        "--latency-log",
        type=Path,
        default=None,
        help="write each action's times and the checkpoint history here (JSON lines), print latency by phase",
    )
    add_job_env_option(p)
    args = p.parse_args(argv)
    job_env = job_env_of(args)
    if args.latency_log is not None:  # keep every checkpoint of the run in the REST history (default 10)
        extra = "web.checkpoints.history=100000"
        job_env["CLICKPULSE_FLINK_OPTIONS"] = ";".join(
            o for o in (job_env.get("CLICKPULSE_FLINK_OPTIONS", ""), extra) if o
        )
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    conn = load_connections()
    bootstrap = conn.kafka_bootstrap_servers
    tag = uuid.uuid4().hex[:8]
    prefix, database = f"bench{tag}.", f"bench_e2e_{tag}"
    jobs = PIPELINE_JOBS if args.pipeline else ALL_JOBS
    # who reads the burst: the keyed jobs read events.enriched; the pipeline job reads events.raw
    readers = (
        {PIPELINE_JOB: "events.raw"}
        if args.pipeline
        else {"sessionize": "events.enriched", "triggers": "events.enriched"}
    )
    topics = {f"{prefix}{t}": cfg for t, cfg in CONTRACT_TOPICS.items()}
    kafka_io.ensure_topics(bootstrap, topics, partitions=4)
    client = client_from_url(conn.clickhouse_url.get_secret_value())
    work = Path(tempfile.mkdtemp(prefix="clickpulse-bench-e2e-"))
    secret = secrets.token_hex(16)
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    warm_n = int(args.rate * args.warmup)
    steady_n = warm_n + int(args.rate * args.seconds)
    # one simulation: the steady part first, the burst after it (same users, later in simulated time)
    records, truth = generate(SimConfig.ending_at(end, events=steady_n + args.burst, seed=31))
    steady, burst = records[:steady_n], records[steady_n:]
    valid_steady = [e for e in truth.valid if e.position < steady_n]
    measured = [e for e in valid_steady if e.position >= warm_n]
    try:
        with WebhookReceiver(secret) as receiver:
            rules_file = rules_for_port(DEMO_RULES, receiver.port, work / "rules.yaml")
            doc = yaml.safe_load(rules_file.read_text())
            doc["rules"].append(
                {"id": "order_placed", "when": {"event": "Order Completed"}, "action": {"webhook": {
                    "url": receiver.url("/hooks/order")}}}
            )  # fmt: skip
            rules_file.write_text(yaml.safe_dump(doc))
            env = job_environment(
                conn, prefix=prefix, home=work / "home", secret=secret, checkpoint_interval_ms=1000
            )
            if args.read_uncommitted:
                env["CLICKPULSE_TRIGGERS_READ_UNCOMMITTED"] = "true"
            env.update(job_env)
            pipeline = Pipeline(PipelineConfig(env, work, rules_file, database, f"bench-e2e-{tag}"))
            try:
                t0 = time.monotonic()
                pipeline.start_all(jobs)
                pipeline.wait_running(jobs, timeout_s=600)
                log.info("every job running after %.0fs", time.monotonic() - t0)
                pipeline.wait_event_time()

                # -- latency phase ---------------------------------------------------------------------
                tail = Tail(bootstrap, f"{prefix}events.enriched")
                tail.start()
                s0, cpu_s0 = time.monotonic(), _cpu(pipeline, jobs)
                produced = produce(bootstrap, f"{prefix}events.raw", steady, rate=args.rate)
                cpu_steady = {j: v - cpu_s0[j] for j, v in _cpu(pipeline, jobs).items()}
                steady_s = time.monotonic() - s0
                want = len(valid_steady)
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    pipeline.check_alive()
                    if _count(client, database) >= want:
                        break
                    time.sleep(1)
                time.sleep(5)  # the last webhooks
                sent = {e.message_id: produced.sent_at[e.position] for e in measured}
                rows = client.query(
                    f"SELECT message_id, toUnixTimestamp64Milli(inserted_at) FROM {database}.events"
                ).result_rows
                queryable = [ms - sent[m] * 1000 for m, ms in rows if m in sent]
                visible = [(tail.seen[m] - sent[m]) * 1000 for m in sent if m in tail.seen]
                webhook, to_fire, fire_to_hook = [], [], []
                timings: list[tuple[float, float, float]] = []  # event sent, fired_at, received (epoch s)
                for r in receiver.unique().values():
                    a = r.action
                    if a.get("rule_id") not in ("deal_promo", "order_placed"):
                        continue
                    times = [sent.get(str(e.get("message_id")), 0.0) for e in a.get("events") or []]
                    if not times or min(times) <= 0:
                        continue
                    t_event = max(times)
                    fired = parse_timestamp_ms(a["fired_at"]) / 1000
                    webhook.append((r.at - t_event) * 1000)
                    to_fire.append((fired - t_event) * 1000)
                    fire_to_hook.append((r.at - fired) * 1000)
                    timings.append((t_event, fired, r.at))
                tail.stop.set()
                if args.latency_log is not None:
                    checkpoints = {j: checkpoint_history(pipeline, j) for j in jobs}
                    write_latency_log(args.latency_log, timings, checkpoints)

                # -- throughput phase ------------------------------------------------------------------
                done_at: dict[str, float] = {}
                if args.burst > 0:
                    cpu0 = _cpu(pipeline, jobs)
                    total_valid = truth.unique_valid
                    b0 = time.monotonic()
                    burst_produced = produce(bootstrap, f"{prefix}events.raw", burst)
                    # the readers' targets: events.raw's end is known once the burst is produced; that of
                    # events.enriched (ingest's output) once ClickHouse has every event. A reader counts
                    # as done when its group committed the target offsets, i.e. at its next checkpoint.
                    ends: dict[str, dict[int, int]] = {}
                    if "events.raw" in readers.values():
                        ends["events.raw"] = data_end_offsets(bootstrap, f"{prefix}events.raw")
                    deadline = time.monotonic() + 1800
                    while len(done_at) < 1 + len(readers) and time.monotonic() < deadline:
                        pipeline.check_alive()
                        now = time.monotonic()
                        if "load" not in done_at and _count(client, database) >= total_valid:
                            done_at["load"] = now
                            ends["events.enriched"] = data_end_offsets(bootstrap, f"{prefix}events.enriched")
                        for job, topic in readers.items():
                            if (
                                job not in done_at
                                and topic in ends
                                and caught_up(
                                    bootstrap, pipeline.group_id(job), f"{prefix}{topic}", ends[topic]
                                )
                            ):
                                done_at[job] = now
                        time.sleep(0.5)
                    cpu1 = _cpu(pipeline, jobs)
                    window = max(done_at.values(), default=time.monotonic()) - b0
            finally:
                pipeline.stop_all()
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
        kafka_io.delete_topics(bootstrap, list(topics))

    load_avg = os.getloadavg()[0]
    if args.pipeline:
        what, running = (
            "pipeline job, dispatch, load (the pipeline: ingest, sessions, triggers in one graph",
            "pipeline running",
        )
        writer, to_fire_what = "the pipeline job", "ingest + triggers in one graph, no commit wait"
    else:
        what, running = "every job at once (ingest, sessionize, triggers, dispatch, load", "every job running"
        writer = "ingest"
        to_fire_what = "ingest + triggers" if args.read_uncommitted else "ingest checkpoint + triggers"
    if args.burst > 0:
        n = len(burst)
        rate = n / (done_at["load"] - b0) if "load" in done_at else 0.0
        read = ", ".join(f"{j} read it at {n / (done_at[j] - b0):,.0f}/s" for j in readers if j in done_at)
        cpu = {j: cpu1[j] - cpu0[j] for j in cpu1}
        print(
            f"| end to end, {what}; Flink jobs at parallelism 1), raw → ClickHouse sustained | {rate:,.0f} "
            f"events/s | burst of {n:,} raw records (produced in {burst_produced.seconds:.0f} s) while "
            f"everything runs; {read or 'readers not caught up'}; CPU-seconds over the {window:.0f} s: "
            f"{_cpu_note(cpu, n)} (2 cores = {2 * window:.0f}); load average {load_avg:.1f} |"
        )
    print(
        f"| end to end, event → queryable in ClickHouse, {args.rate:,.0f} raw events/s, {running} "
        f"| p50 {_p(queryable, 0.5)}, p99 {_p(queryable, 0.99)} | {len(queryable):,} events after a "
        f"{args.warmup} s warm-up; of which "
        f"produce → readable in events.enriched ({writer}, exactly-once: visible at its 1 s checkpoints) "
        f"p50 {_p(visible, 0.5)}, p99 {_p(visible, 0.99)}; CPU over the {steady_s:.0f} s of steady traffic: "
        f"{_cpu_note(cpu_steady, len(steady))} |"
    )
    print(
        f"| end to end, event → webhook received, {args.rate:,.0f} raw events/s, {running}"
        f"{', triggers reading read_uncommitted' if args.read_uncommitted else ''} | "
        f"p50 {_p(webhook, 0.5)}, p99 {_p(webhook, 0.99)} | {len(webhook):,} actions fired by an event "
        f"(deal promo, order webhook), {_over(webhook, 150.0)} over 150 ms; "
        f"event → fired_at p50 {_p(to_fire, 0.5)}, p99 {_p(to_fire, 0.99)} "
        f"({to_fire_what}), fired_at → received p50 {_p(fire_to_hook, 0.5)}, p99 {_p(fire_to_hook, 0.99)} "
        f"(actions topic + dispatch + HTTP) |"
    )
    if args.latency_log is not None:
        print(phase_table(timings, [c for cs in checkpoints.values() for c in cs]))
    if visible and queryable:
        log.info(
            "medians: visible %.0f ms, queryable %.0f ms",
            statistics.median(visible),
            statistics.median(queryable),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
