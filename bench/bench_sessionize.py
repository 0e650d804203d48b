"""Throughput of the sessionize job on this box: ``python -m bench.bench_sessionize``.

Needs a running stack (``clickpulse stack up``, or ``KAFKA_BOOTSTRAP_SERVERS`` set). It simulates
realistic traffic, enriches it in-process (the ingest job's record logic with in-memory identity
stores), produces it to a fresh set of prefixed topics, runs ``python -m jobs.sessionize --bounded``
as a subprocess, once per sessions engine (``--engine jvm|python|both``, default both), and reads the
job's periodic counter lines from its Flink log to measure the steady-state rate (JVM start-up and the
final timer flush are left out) and the JVM's CPU time per event. It prints markdown rows
(``| benchmark | result | notes |``, see ``bench/README.md``): the job per engine, and both reducers alone
on the same events (``tests.session_replay``: JSON parse, state codec, step and timers, no Flink). The load average is printed too: the box is shared, so the numbers move with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import orjson

from connectors import kafka as kafka_io
from connectors.settings import CONTRACT_TOPICS, load_connections
from tests.session_replay import Op, replay_java, replay_python
from tests.support import produce_rows, simulated_enriched
from udfs import sessions

log = logging.getLogger("bench.sessionize")

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*sessionize\[(\d+)\]: events=(\d+)")


def reducer_rate(rows: list[tuple[str, bytes]]) -> float:
    """Events/s of parse + state codec + :func:`udfs.sessions.step` in this process (no Flink)."""
    cfg = sessions.SessionConfig()
    states: dict[str, str] = {}
    start = time.perf_counter()
    for key, value in rows:
        ev = sessions.Event.from_record(orjson.loads(value))
        res = sessions.step(sessions.load_state(states.get(key)), ev, -(2**63), cfg)
        states[key] = sessions.dump_state(res.state).decode()
    return len(rows) / (time.perf_counter() - start)


def history(rows: list[tuple[str, bytes]], cfg: sessions.SessionConfig, every: int = 100) -> list[Op]:
    """The rows in order with a watermark (newest event time minus the bound) every ``every`` events."""
    ops: list[Op] = []
    newest = -(2**63)
    for i, (key, value) in enumerate(rows):
        ops.append(("e", key, value.decode()))
        newest = max(newest, orjson.loads(value)["event_time_ms"])
        if i % every == every - 1:
            ops.append(("w", newest - cfg.out_of_orderness_ms))
    ops.append(("w", 2**63 - 1))
    return ops


def replay_us_per_event(rows: list[tuple[str, bytes]]) -> tuple[float, float]:
    """``(python, java)`` µs per event of the reducers replaying ``rows`` (Java: the 5th pass, JIT warm)."""
    cfg = sessions.SessionConfig()
    ops = history(rows, cfg)
    py = replay_python(ops, cfg).busy_s
    java = replay_java(ops, cfg, passes=5).busy_s
    return py / len(rows) * 1e6, java / len(rows) * 1e6


def steady_rate(log_file: Path, total: int) -> tuple[float, float, float, float]:
    """``(events/s, seconds, t0, t1)`` between the first counter line and the one reaching ``total``."""
    per_subtask: dict[str, list[tuple[float, int]]] = {}
    for line in log_file.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            per_subtask.setdefault(m.group(2), []).append((ts, int(m.group(3))))
    if not per_subtask:
        raise RuntimeError(f"no counter lines in {log_file}")
    # sum the subtasks' cumulative counts on a common timeline
    times = sorted({t for series in per_subtask.values() for t, _ in series})

    def count_at(series: list[tuple[float, int]], t: float) -> int:
        return max((n for ts, n in series if ts <= t), default=0)

    timeline = [(t, sum(count_at(s, t) for s in per_subtask.values())) for t in times]
    first_t, first_n = timeline[0]
    done = next(((t, n) for t, n in timeline if n >= total), timeline[-1])
    seconds = done[0] - first_t
    rate = (done[1] - first_n) / seconds if seconds > 0 else float("nan")
    return rate, seconds, first_t, done[0]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads), or ``None`` once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_job(
    env: dict[str, str], parallelism: int, timeout_s: float
) -> tuple[float, list[tuple[float, float]]]:
    """Run the bounded job; returns its wall time and ``(wall clock, JVM CPU seconds)`` samples.

    The JVM is the job process's child (PyFlink's gateway runs the mini-cluster); in THREAD mode the
    Python functions run inside it, so its CPU time is the whole pipeline except the broker.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.sessionize",
            "--bounded",
            "--starting-offsets",
            "earliest",
            "--parallelism",
            str(parallelism),
        ],  # fmt: skip
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    samples: list[tuple[float, float]] = []
    jvm: int | None = None
    try:
        while proc.poll() is None:
            if time.monotonic() - start > timeout_s:
                raise TimeoutError("sessionize did not finish")
            if jvm is None:
                jvm = next(iter(_children(proc.pid)), None)
            cpu = _cpu_seconds(jvm) if jvm is not None else None
            if cpu is not None:
                samples.append((time.time(), cpu))
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"sessionize failed:\n{err[-3000:]}")
    return time.monotonic() - start, samples


def cpu_between(samples: list[tuple[float, float]], t0: float, t1: float) -> float:
    """JVM CPU seconds spent between wall-clock times ``t0`` and ``t1`` (nearest samples)."""

    def at(t: float) -> float:
        return min(samples, key=lambda s: abs(s[0] - t))[1]

    return at(t1) - at(t0)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print markdown rows."""
    p = argparse.ArgumentParser(prog="bench.bench_sessionize", description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=60_000, help="simulated raw records (default 60000)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--parallelism", type=int, default=1)
    p.add_argument("--mode", choices=["thread", "process"], default="thread", help="python.execution-mode")
    p.add_argument("--state-backend", choices=["rocksdb", "hashmap"], default="rocksdb")
    p.add_argument("--state-cache", type=int, default=20_000, help="CLICKPULSE_SESSIONIZE_STATE_CACHE_KEYS")
    p.add_argument("--engine", choices=["jvm", "python", "both"], default="both", help="sessions operator")
    p.add_argument("--timeout-s", type=float, default=900.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    conns = load_connections()
    bootstrap = conns.kafka_bootstrap_servers
    if not kafka_io.is_healthy(bootstrap):
        log.error("no Kafka at %s: run `clickpulse stack up` first", bootstrap)
        return 2
    rows = simulated_enriched(args.events, args.seed, duplicate_fraction=0.0, malformed_fraction=0.0)
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    topics = {f"{prefix}{t}": cfg for t, cfg in CONTRACT_TOPICS.items()}
    kafka_io.ensure_topics(bootstrap, topics, partitions=4)
    engines = ["python", "jvm"] if args.engine == "both" else [args.engine]
    try:
        produce_rows(bootstrap, f"{prefix}events.enriched", rows)
        for engine in engines:
            with tempfile.TemporaryDirectory(prefix="bench-sessionize-") as tmp:
                env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKPULSE_")}
                env.update(
                    {
                        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                        "CLICKPULSE_TOPIC_PREFIX": prefix,
                        "CLICKPULSE_JOB_GROUP_ID": f"bench-sessionize-{engine}-{prefix}",
                        "CLICKPULSE_STATE_DIR": str(Path(tmp) / "home"),
                        "CLICKPULSE_JOB_LOG_INTERVAL_MS": "1000",
                        "CLICKPULSE_SESSIONIZE_ENGINE": engine,
                        "CLICKPULSE_FLINK_PYTHON_EXECUTION_MODE": args.mode,
                        "CLICKPULSE_SESSIONIZE_STATE_BACKEND": args.state_backend,
                        "CLICKPULSE_SESSIONIZE_STATE_CACHE_KEYS": str(args.state_cache),
                        "FLINK_LOG_DIR": str(Path(tmp) / "log"),
                    }
                )
                wall, samples = run_job(env, args.parallelism, args.timeout_s)
                (log_file,) = Path(tmp, "log").glob("flink-*.log")
                rate, seconds, t0, t1 = steady_rate(log_file, len(rows))
                cpu = cpu_between(samples, t0, t1)
                processed = rate * seconds
            load = os.getloadavg()[0]
            how = f"{args.mode} mode, " if engine == "python" else ""
            print(
                f"| sessionize job, engine {engine}, sustained ({how}{args.state_backend} state, "
                f"parallelism {args.parallelism}, bounded run) "
                f"| {rate:,.0f} events/s ({processed / cpu:,.0f} per JVM CPU-second, "
                f"{cpu / processed * 1e6:,.0f} µs CPU/event) "
                f"| {len(rows):,} enriched events"
                + (f", state cache {args.state_cache}" if engine == "python" else "")
                + f"; steady state {seconds:.0f} s of a {wall:.0f} s run (job's counter log); JVM used "
                f"{cpu / seconds:.2f} cores (source, sinks and Kafka clients included); load avg {load:.1f} |"
            )
        load = os.getloadavg()[0]
        pure = reducer_rate(rows)
        py_us, java_us = replay_us_per_event(rows)
    finally:
        kafka_io.delete_topics(bootstrap, list(topics))
    print(
        f"| session reducer alone (JSON parse + state codec + step, no Flink) | {pure:,.0f} events/s "
        f"| same events, one process; load avg {load:.1f} |"
    )
    print(
        f"| sessions operator logic replayed, python vs jvm (parse + state codec + step + timers, no Flink) "
        f"| python {py_us:.1f} µs CPU/event, jvm {java_us:.1f} µs CPU/event ({py_us / java_us:.1f}x) "
        f"| same events with a watermark every 100 (tests.session_replay); thread CPU time of the replay "
        f"loop; jvm: 5th replay in one JVM "
        f"(JIT warm), history decoded before timing; python: one pass; load avg {load:.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
