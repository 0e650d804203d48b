"""The ``clickpulse`` command line: stack, topics, simulate, query, demo.

Every command reads its settings here, in ``main()``, from the command line and the environment
(falling back to ``.clickpulse/stack.env``); nothing reads the environment at import time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

log = logging.getLogger("clickpulse")
console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
    )
    for noisy in ("kafka", "urllib3", "httpx", "clickhouse_connect"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python 3 warns whenever a task of its I/O loop runs over 100 ms: on a busy 2-core box that is
    # every few seconds of a demo and says nothing about delivery (job logs keep it)
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- stack / topics


def cmd_stack(args: argparse.Namespace) -> int:
    """``clickpulse stack up|down|status``."""
    from connectors.settings import process_environment
    from devstack.stack import Stack, StackError, StackSettings, display_url

    env = process_environment()
    stack = Stack(StackSettings.from_env(env), environ=env)
    try:
        if args.action == "up":
            state = stack.up(progress=lambda m: console.print(f"[cyan]•[/] {m}"))
            console.print(f"[green]stack is up[/]; wrote {stack.env_file}")
            for name, svc in state.items():
                console.print(f"  {name:<11} {display_url(svc.url)}{'  (external)' if svc.external else ''}")
            return 0
        if args.action == "down":
            stopped = stack.down(progress=lambda m: console.print(f"[cyan]•[/] {m}"))
            console.print(
                f"[green]stopped[/] {', '.join(stopped) if stopped else 'nothing (nothing was running)'}"
            )
            return 0
        rows = stack.status()
        table = Table("service", "source", "state", "url", "pid", "healthy")
        for r in rows:
            table.add_row(
                str(r["service"]),
                str(r["source"]),
                "[red]dead[/] (run `clickpulse stack up`)" if r["state"] == "dead" else str(r["state"]),
                str(r["url"]),
                str(r["pid"] or ""),
                "[green]yes[/]" if r["healthy"] else "[red]no[/]",
            )
        Console().print(table)
        return 0 if all(r["healthy"] for r in rows) else 1
    except StackError as e:
        console.print(f"[red]error:[/] {e}")
        return 2


def cmd_topics(args: argparse.Namespace) -> int:
    """``clickpulse topics``: create missing contract topics on the configured Kafka."""
    from connectors import kafka as kafka_io
    from connectors.settings import CONTRACT_TOPICS, load_connections

    conn = load_connections()
    created = kafka_io.ensure_topics(
        conn.kafka_bootstrap_servers,
        {conn.topic(t): cfg for t, cfg in CONTRACT_TOPICS.items()},
        partitions=args.partitions,
        **conn.kafka_security_options(),
    )
    console.print(f"created: {', '.join(created) if created else 'nothing (all topics exist)'}")
    return 0


# --------------------------------------------------------------------------- simulate


def cmd_simulate(args: argparse.Namespace) -> int:
    """``clickpulse simulate``: seeded clickstream into ``events.raw``."""
    from connectors.settings import load_connections
    from devstack.simulate import SimulateOptions, run_simulation

    conn = load_connections()
    opts = SimulateOptions(
        events=args.events,
        rate=args.rate,
        seed=args.seed,
        start=args.start,
        truth_path=args.truth,
        topic=args.topic or conn.topic("events.raw"),
        duplicate_fraction=args.duplicates,
        malformed_fraction=args.malformed,
        late_fraction=args.late,
    )
    summary = run_simulation(conn.kafka_bootstrap_servers, opts, console=console)
    console.print(
        f"[green]produced[/] {summary.records} records to {opts.topic} in {summary.seconds:.1f}s "
        f"({summary.records / max(summary.seconds, 1e-9):,.0f}/s): {summary.unique_valid} unique valid, "
        f"{summary.duplicates} duplicates, {summary.invalid} malformed"
    )
    return 0


# --------------------------------------------------------------------------- query


def cmd_query(args: argparse.Namespace) -> int:
    """``clickpulse query "<SQL>"``: run SQL (or a saved query file) and print the result."""
    from connectors.clickhouse import client_from_url
    from connectors.query import render_result, resolve_sql
    from connectors.settings import load_connections

    conn = load_connections()
    sql = resolve_sql(args.sql)
    client = client_from_url(conn.clickhouse_url.get_secret_value(), database=args.database)
    try:
        result = client.query(sql)
    except Exception as e:  # clickhouse-connect raises DatabaseError / OperationalError
        console.print(f"[red]error:[/] {e}")
        return 1
    sys.stdout.write(render_result(result.column_names, result.result_rows, args.format))
    return 0


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """``clickpulse demo``: stack up, simulated traffic, a summary of what arrived."""
    from devstack.demo import DemoOptions, run_demo

    opts = DemoOptions(events=args.events, seed=args.seed, rate=args.rate, keep_running=args.keep_running)
    return run_demo(opts, console)


# --------------------------------------------------------------------------- migrate


def cmd_migrate(args: argparse.Namespace) -> int:
    """``clickpulse migrate``: apply pending ``sql/`` migrations once, in order."""
    from connectors.migrate import MigrationError, migrate, pending
    from connectors.settings import load_connections

    conn = load_connections()
    url = conn.clickhouse_url.get_secret_value()
    database = args.database or conn.clickhouse_database
    try:
        if args.dry_run:
            todo = pending(url, database)
            console.print(f"pending: {', '.join(todo) if todo else 'nothing'}")
            return 0
        applied = migrate(url, database)
    except MigrationError as e:
        console.print(f"[red]error:[/] {e}")
        return 1
    console.print(f"[green]applied[/] {', '.join(applied)}" if applied else f"{database} is up to date")
    return 0


# --------------------------------------------------------------------------- run

JOBS = ("pipeline", "ingest", "sessionize", "load", "triggers", "dispatch")


def cmd_run(args: argparse.Namespace) -> int:
    """``clickpulse run <job> [job options]``: run one job in the foreground (local mini-cluster)."""
    import importlib

    try:
        module = importlib.import_module(f"jobs.{args.job}")
    except ModuleNotFoundError as e:
        if e.name != f"jobs.{args.job}":
            raise
        console.print(f"[red]error:[/] job {args.job!r} is not part of this build")
        return 2
    return int(module.main(args.job_args))


# --------------------------------------------------------------------------- collector


def cmd_collector(args: argparse.Namespace) -> int:
    """``clickpulse collector``: the Segment-compatible HTTP collector in the foreground."""
    from connectors.collector.main import run

    return run(args)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to generate the CLI reference)."""
    p = argparse.ArgumentParser(prog="clickpulse", description="Real-time clickstream analytics on PyFlink.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("stack", help="start, stop or check the local Kafka/Redis/ClickHouse stack")
    s.add_argument("action", choices=["up", "down", "status"])
    s.set_defaults(func=cmd_stack)

    t = sub.add_parser("topics", help="create missing contract topics on the configured Kafka")
    t.add_argument("--partitions", type=int, default=4, help="partitions per new topic (default 4)")
    t.set_defaults(func=cmd_topics)

    sim = sub.add_parser("simulate", help="produce a realistic, seeded clickstream into events.raw")
    sim.add_argument("--events", type=int, default=10_000, help="records to produce (default 10000)")
    sim.add_argument("--rate", type=float, default=0.0, help="records per second, 0 = as fast as possible")
    sim.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    sim.add_argument(
        "--start",
        default=None,
        help="simulated clock start, ISO-8601 UTC (default: so that the run ends about now)",
    )
    sim.add_argument("--truth", default=None, help="write the ground truth JSON to this file")
    sim.add_argument("--topic", default=None, help="target topic (default: events.raw with prefix)")
    sim.add_argument("--duplicates", type=float, default=0.03, help="fraction redelivered (default 0.03)")
    sim.add_argument("--malformed", type=float, default=0.02, help="fraction malformed (default 0.02)")
    sim.add_argument("--late", type=float, default=0.01, help="fraction delivered hours late (default 0.01)")
    sim.set_defaults(func=cmd_simulate)

    m = sub.add_parser("migrate", help="apply pending ClickHouse migrations (sql/NNNN_*.sql) once, in order")
    m.add_argument(
        "--database",
        default=None,
        help="target database (default CLICKPULSE_CLICKHOUSE_DATABASE, clickpulse)",
    )
    m.add_argument("--dry-run", action="store_true", help="only list what would be applied")
    m.set_defaults(func=cmd_migrate)

    r = sub.add_parser(
        "run",
        help="run a job: pipeline, ingest, sessionize, load, triggers, dispatch (`clickpulse run JOB -h`)",
    )
    r.add_argument("job", choices=JOBS, help="the job to run")
    r.add_argument(
        "job_args",
        nargs=argparse.REMAINDER,
        help="job options, e.g. --group-id ID --starting-offsets earliest|latest|committed [--rules FILE]",
    )
    r.set_defaults(func=cmd_run)

    q = sub.add_parser("query", help="run SQL or a saved query (sql/queries/NAME) against ClickHouse")
    q.add_argument("sql", help="SQL text, a path to a .sql file, or the name of a saved query")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    q.add_argument("--database", default=None, help="default database (default: the server's)")
    q.set_defaults(func=cmd_query)

    d = sub.add_parser(
        "demo",
        help="what `make demo` runs: every job at once on the local stack, simulated traffic, webhooks to a "
        "local receiver, a summary checked against the simulator's truth",
    )
    d.add_argument("--events", type=int, default=200_000, help="simulated records (default 200000)")
    d.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    d.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="at most this many records per second (default 0: as fast as the ingest job keeps up)",
    )
    d.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the stack, the demo topics and the database clickpulse_demo up for `clickpulse query`",
    )
    d.set_defaults(func=cmd_demo)

    from connectors.collector.settings import add_collector_args

    c = sub.add_parser("collector", help="the Segment-compatible HTTP collector (/v1/track ... /v1/batch)")
    add_collector_args(c)
    c.set_defaults(func=cmd_collector)
    return p


#: Commands served by the local stack package (``devstack``, the ``local`` extra), not by the product.
LOCAL_COMMANDS = frozenset({"stack", "simulate", "demo"})


def local_stack_installed() -> bool:
    """True when the local stack package and its dependencies (the ``local`` extra) are importable."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("devstack", "chdb"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clickpulse`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.command in LOCAL_COMMANDS and not local_stack_installed():
        console.print(
            f"[red]error:[/] `clickpulse {args.command}` needs the local stack, which is not installed here "
            "(from a checkout: pip install -e '.[local]')",
            soft_wrap=True,
        )
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
