"""``make bench``: start a stack, run every benchmark module, write ``bench/RESULTS.md``.

Each module prints markdown table rows (``| benchmark | result | notes |``). Modules that are missing
in this build are skipped. Results keep a history: the newest run is prepended.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from devstack.stack import Stack, StackSettings

BENCHES = (
    "bench_stack",
    "bench_ingest",
    "bench_bundle_sampler",
    "bench_loader",
    "bench_sessionize",
    "bench_triggers",
    "bench_webhook",
    "bench_pipeline",
    "bench_backlog",
    "bench_collector",
    "bench_live",
)
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """One line describing this machine."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    return f"{os.cpu_count()} cores ({cpu}), {mem_kb / 1024 / 1024:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks named in ``argv`` (default all) and update RESULTS.md."""
    console = Console(stderr=True)
    wanted = argv if argv else list(BENCHES)
    stack = Stack(StackSettings(home=Path(".clickpulse/bench")))
    state = stack.up(progress=lambda m: console.print(f"[cyan]•[/] {m}"))
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=state["kafka"].url,
        REDIS_URL=state["redis"].url,
        CLICKHOUSE_URL=state["clickhouse"].url,
    )
    # the bench stack's read-only ClickHouse user, for the dashboard bench_live runs (not the one of a
    # stack.env elsewhere, whose password this endpoint does not know)
    for line in stack.env_file.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.startswith("CLICKPULSE_CLICKHOUSE_READONLY_"):
            env[name] = value
    rows: list[str] = []
    try:
        for name in wanted:
            if not (Path(__file__).parent / f"{name}.py").exists():
                console.print(f"[yellow]skip[/] {name} (not in this build)")
                continue
            console.print(f"[cyan]running[/] {name} …")
            res = subprocess.run(
                [sys.executable, "-m", f"bench.{name}"], env=env, capture_output=True, text=True, timeout=3600,
                check=False,
            )  # fmt: skip
            got = [line for line in res.stdout.splitlines() if line.startswith("|")]
            if res.returncode != 0:
                got.append(
                    f"| {name} | failed (exit {res.returncode}) | {res.stderr.strip().splitlines()[-1:]} |"
                )
            rows += got
            for line in got:
                console.print(line)
    finally:
        stack.down()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = "\n".join(
        [
            f"## {stamp}",
            "",
            f"Machine: {machine()}.",
            "",
            "| benchmark | result | notes |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )
    old = RESULTS.read_text().split("\n", 2)[2] if RESULTS.exists() else ""
    RESULTS.write_text(f"# Benchmark results\n\n{block}\n{old}")
    console.print(f"[green]wrote[/] {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
