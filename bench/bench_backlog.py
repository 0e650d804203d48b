"""The pipeline job alone over a backlog: raw events/s and CPU µs per raw event, start-up subtracted.

``python -m bench.bench_backlog [--small 20000] [--large 100000] [--job-env NAME=VALUE …]`` against the
stack in the environment / ``.clickpulse/stack.env``. Each size: simulated records produced to fresh
topics first, then ``jobs.pipeline --bounded --no-dispatch`` reads them from the earliest offset; the
wall time and the CPU time of the job's whole process tree (driver, JVM, Python workers; sampled from
``/proc`` by process group) are taken. The difference between the two sizes removes start-up and the
final drain, which a single bounded run would charge to its events, and part of the JIT's warm-up: the
compilers still run a minute into a run (~500 compilations/s, bench/RESULTS.md 2026-12-07), so the
larger run carries more of it, and the small run's ±10 s noise is magnified. Nothing else runs, so this is what the job itself costs (``bench_pipeline``'s burst shares the box with the
loader, dispatch and the bench's own producer).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.bench_e2e import add_job_env_option, group_cpu_by_pid, job_env_of
from connectors import kafka as kafka_io
from connectors.settings import CONTRACT_TOPICS, load_connections
from devstack.demo import DEMO_RULES, job_environment, produce
from devstack.simulator import SimConfig, generate

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    """One bounded run: records read, wall seconds, CPU seconds of the job's process tree."""

    events: int
    wall_s: float
    cpu_s: float


def bounded_run(events: int, job_env: dict[str, str]) -> Run:
    """Produce ``events`` simulated records to fresh topics, run the pipeline over them, clean up."""
    conn = load_connections()
    bootstrap = conn.kafka_bootstrap_servers
    prefix = f"backlog{uuid.uuid4().hex[:8]}."
    names = [f"{prefix}{t}" for t in CONTRACT_TOPICS]
    kafka_io.ensure_topics(bootstrap, {f"{prefix}{t}": c for t, c in CONTRACT_TOPICS.items()}, partitions=4)
    try:
        records, _ = generate(SimConfig.ending_at(datetime.now(UTC), events=events, seed=31))
        produce(bootstrap, f"{prefix}events.raw", records)
        with tempfile.TemporaryDirectory(prefix="clickpulse-backlog-") as work:
            env = job_environment(
                conn, prefix=prefix, home=Path(work) / "home", secret="b" * 32, checkpoint_interval_ms=1000
            )
            env.update(job_env)
            cmd = [
                sys.executable, "-m", "jobs.pipeline", "--bounded", "--starting-offsets", "earliest",
                "--no-dispatch", "--restore", "none", "--rules", str(DEMO_RULES),
            ]  # fmt: skip
            t0 = time.monotonic()
            proc = subprocess.Popen(  # noqa: S603
                cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                start_new_session=True,
            )  # fmt: skip
            seen: dict[int, float] = {}

            def sample() -> None:
                while proc.poll() is None:
                    seen.update(group_cpu_by_pid(proc.pid))  # exited processes keep their last value
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            _, err = proc.communicate()
            sampler.join()
            wall = time.monotonic() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"pipeline exited {proc.returncode}: {err[-2000:]}")
        return Run(events=len(records), wall_s=wall, cpu_s=sum(seen.values()))
    finally:
        kafka_io.delete_topics(bootstrap, names)


def main(argv: list[str] | None = None) -> int:
    """Run both sizes and print the row."""
    p = argparse.ArgumentParser(prog="bench.bench_backlog", description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=20_000, help="records of the smaller run")
    p.add_argument("--large", type=int, default=100_000, help="records of the larger run")
    add_job_env_option(p)
    args = p.parse_args(argv)
    job_env = job_env_of(args)
    small, large = bounded_run(args.small, job_env), bounded_run(args.large, job_env)
    n = large.events - small.events
    wall, cpu = large.wall_s - small.wall_s, large.cpu_s - small.cpu_s
    settings = ", ".join(f"{k}={v}" for k, v in job_env.items()) or "defaults"
    print(
        f"| pipeline job alone over a backlog, raw events/s and CPU per raw event ({settings}) | "
        f"{n / wall:,.0f} events/s, {cpu / n * 1e6:,.0f} CPU µs/event | the {large.events:,}-record run "
        f"minus the {small.events:,}-record run (wall {large.wall_s:.1f} − {small.wall_s:.1f} s, CPU "
        f"{large.cpu_s:.1f} − {small.cpu_s:.1f} s: start-up and drain cancel, the JIT only in part); process tree of "
        "the job (driver, JVM, Python worker); nothing else running; parallelism 1 |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
