"""The ``clickpulse`` command line: stack, topics, migrate, run, simulate, query, status, demo.

Every command reads its settings here, in ``main()``, from the command line and the environment
(falling back to ``.clickpulse/stack.env``); nothing reads the environment at import time.

Errors the operator can fix (bad input, a service not there) end a command with one ``error: ...`` line
on stderr and a non-zero status, never a traceback (``-v`` adds it, for debugging): commands raise
:class:`CliError`, and :func:`main` turns it, and the service clients' connection errors, into that line.
Ctrl-C ends any command with status 130 after it stopped what it started. Results go to stdout (one JSON
document with ``--json``); logs and progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from connectors.progress import Bar, progress_bar
from connectors.runtime import EXIT_INTERRUPTED, CliError, interrupted

log = logging.getLogger("clickpulse")
console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=True)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[handler],
    )
    for noisy in ("kafka", "urllib3", "httpx", "clickhouse_connect"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python 3 warns whenever a task of its I/O loop runs over 100 ms: on a busy 2-core box that is
    # every few seconds of a demo and says nothing about delivery (job logs keep it)
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    if not verbose:
        # the service clients log their connection failures (with tracebacks) before the error reaches
        # main(), which reports it as one line; a filter on the handler, as clickhouse-connect sets
        # urllib3's level itself when it is imported
        handler.addFilter(_quiet_clients)


def _quiet_clients(record: logging.LogRecord) -> bool:
    return record.name.split(".", 1)[0] not in ("kafka", "clickhouse_connect", "urllib3")


# --------------------------------------------------------------------------- stack / topics


def _say(bar: Bar) -> Callable[[str], None]:
    """A progress callback printing each step as a line and beside ``bar``."""

    def say(message: str) -> None:
        console.print(f"[cyan]•[/] {escape(message)}")
        bar.message(message)

    return say


def cmd_stack(args: argparse.Namespace) -> int:
    """``clickpulse stack up|down|status``."""
    from connectors.settings import process_environment
    from devstack.stack import Stack, StackSettings, display_url

    env = process_environment()
    stack = Stack(StackSettings.from_env(env), environ=env)
    if args.action == "up":
        with progress_bar(console, "starting the stack") as bar:
            state = stack.up(progress=_say(bar))
        console.print(f"[green]stack is up[/]; wrote {stack.env_file}")
        for name, svc in state.items():
            console.print(f"  {name:<11} {display_url(svc.url)}{'  (external)' if svc.external else ''}")
        return 0
    if args.action == "down":
        with progress_bar(console, "stopping the stack") as bar:
            stopped = stack.down(progress=_say(bar))
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


def cmd_topics(args: argparse.Namespace) -> int:
    """``clickpulse topics``: create missing contract topics on the configured Kafka."""
    from connectors import kafka as kafka_io
    from connectors.settings import CONTRACT_TOPICS, load_connections

    conn = load_connections()
    require_kafka(conn.kafka_bootstrap_servers)
    with progress_bar(console, "topics", total=len(CONTRACT_TOPICS)) as bar:
        created = kafka_io.ensure_topics(
            conn.kafka_bootstrap_servers,
            {conn.topic(t): cfg for t, cfg in CONTRACT_TOPICS.items()},
            partitions=args.partitions,
            progress=lambda name: bar.update(advance=1, description=name),
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
    require_kafka(conn.kafka_bootstrap_servers)
    summary = run_simulation(conn.kafka_bootstrap_servers, opts, console=console)
    console.print(
        f"[green]produced[/] {summary.records} records to {opts.topic} in {summary.seconds:.1f}s "
        f"({summary.records / max(summary.seconds, 1e-9):,.0f}/s): {summary.unique_valid} unique valid, "
        f"{summary.duplicates} duplicates, {summary.invalid} malformed"
    )
    return 0


# --------------------------------------------------------------------------- query


def cmd_query(args: argparse.Namespace) -> int:
    """``clickpulse query "<SQL>"``: run SQL or a saved query (``--param`` values), print the result."""
    from connectors.clickhouse import client_from_url
    from connectors.query import (
        QueryParamError,
        parse_param_args,
        render_result,
        resolve_query,
        result_document,
    )
    from connectors.settings import load_connections

    conn = load_connections()
    try:
        query, saved = resolve_query(args.sql)
        params = query.bind(parse_param_args(args.param or []))
    except QueryParamError as e:
        raise CliError(str(e), exit_code=2) from e
    # saved queries name their tables without a database: they run in the configured one
    database = args.database or (conn.clickhouse_database if saved else None)
    client = client_from_url(conn.clickhouse_url.get_secret_value(), database=database)
    try:
        result = client.query(query.sql, parameters=params or None)
    finally:
        client.close()
    if args.json:
        _print_json(result_document(result.column_names, result.result_rows))
    else:
        sys.stdout.write(render_result(result.column_names, result.result_rows, args.format))
    return 0


def _print_json(doc: Any) -> None:
    """``doc`` as the one JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """``clickpulse demo``: stack up, simulated traffic, a summary of what arrived."""
    from devstack.demo import DemoOptions, run_demo

    opts = DemoOptions(events=args.events, seed=args.seed, rate=args.rate, exit=args.exit, jobs=args.jobs)
    return run_demo(opts, console)


# --------------------------------------------------------------------------- dashboard


def cmd_dashboard(args: argparse.Namespace) -> int:
    """``clickpulse dashboard``: serve the live dashboard until Ctrl-C."""
    from connectors.dashboard.server import run

    return run({"host": args.host, "port": args.port})


# --------------------------------------------------------------------------- migrate


def cmd_migrate(args: argparse.Namespace) -> int:
    """``clickpulse migrate``: apply pending ``sql/`` migrations once, in order."""
    from pathlib import Path

    from connectors.migrate import SQL_DIR, migrate, pending
    from connectors.settings import load_connections

    conn = load_connections()
    url = conn.clickhouse_url.get_secret_value()
    database = args.database or conn.clickhouse_database
    sql_dir = Path(args.sql_dir) if args.sql_dir else SQL_DIR
    if not sql_dir.is_dir():
        raise CliError(f"no migrations directory {sql_dir}", exit_code=2)
    if args.dry_run:
        todo = pending(url, database, sql_dir=sql_dir)
        console.print(f"pending: {', '.join(todo) if todo else 'nothing'}")
        return 0
    with progress_bar(console, "migrating", total=1) as bar:

        def step(name: str, done: int, total: int) -> None:
            bar.update(completed=done, total=total, description=name or "migrated")

        applied = migrate(url, database, sql_dir=sql_dir, progress=step)
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
        raise CliError(f"job {args.job!r} is not part of this build", exit_code=2) from e
    if not args.verbose:
        # py4j logs a Ctrl-C that lands in a call to the JVM with its traceback (on the root logger, which
        # the job's own logging set-up keeps); main() reports it as one line
        for name in ("", "py4j", "py4j.java_gateway", "py4j.clientserver"):
            logging.getLogger(name).addFilter(_not_interrupt)
    code = int(module.main(args.job_args))
    if interrupted():  # the job stopped itself on Ctrl-C (its own signal handler): report it as one
        raise KeyboardInterrupt
    return code


def _not_interrupt(record: logging.LogRecord) -> bool:
    return not (
        record.exc_info
        and record.exc_info[0] is not None
        and issubclass(record.exc_info[0], KeyboardInterrupt)
    )


# --------------------------------------------------------------------------- status


def _unavailable(reason: object) -> dict[str, Any]:
    return {"available": False, "reason": " ".join(str(reason).split()) or type(reason).__name__}


def _services_part() -> dict[str, Any]:
    """Health of Kafka, Redis and ClickHouse: the local stack's status where it is installed, else a probe
    of each configured service."""
    if local_stack_installed():
        from connectors.settings import process_environment
        from devstack.stack import Stack, StackSettings

        env = process_environment()
        rows = Stack(StackSettings.from_env(env), environ=env).status()
        return {"available": True, "services": rows}
    from connectors import kafka as kafka_io
    from connectors.clickhouse import redact_url, wait_healthy
    from connectors.settings import load_connections

    conn = load_connections()
    ch_url = conn.clickhouse_url.get_secret_value()
    try:
        wait_healthy(ch_url, 2.0)
        ch_ok = True
    except (TimeoutError, ValueError):
        ch_ok = False
    try:
        import redis

        redis_ok = bool(
            redis.Redis.from_url(
                conn.redis_url.get_secret_value(), socket_timeout=2, socket_connect_timeout=2
            ).ping()
        )
    except (redis.RedisError, ValueError):
        redis_ok = False
    rows = [
        {"service": "kafka", "source": "configured", "url": conn.kafka_bootstrap_servers,
         "healthy": kafka_io.is_healthy(conn.kafka_bootstrap_servers, timeout_s=2.0)},
        {"service": "redis", "source": "configured", "url": redact_url(conn.redis_url.get_secret_value()),
         "healthy": redis_ok},
        {"service": "clickhouse", "source": "configured", "url": redact_url(ch_url), "healthy": ch_ok},
    ]  # fmt: skip
    return {"available": True, "services": rows}


def status_document() -> dict[str, Any]:
    """Everything ``clickpulse status`` reports, as one JSON-ready document; a part that cannot be read
    is ``{"available": false, "reason": ...}``."""
    from connectors import kafka as kafka_io
    from connectors import status as status_io
    from connectors.flink import FlinkSettings
    from connectors.settings import CONTRACT_TOPICS, Connections, environment

    env = environment()
    conn = Connections.from_env(env)
    doc: dict[str, Any] = {"version": package_version(), "topic_prefix": conn.topic_prefix}
    try:
        doc["services"] = _services_part()
    except Exception as e:  # noqa: BLE001 - one part failing must not hide the others
        doc["services"] = _unavailable(e)

    rest_url = FlinkSettings.from_env(env).rest_url
    if not rest_url:
        doc["flink"] = _unavailable(
            "CLICKPULSE_FLINK_REST_URL is not set (a `clickpulse run` job's mini-cluster logs its own REST "
            "URL at start)"
        )
    else:
        try:
            doc["flink"] = {"available": True, "rest_url": rest_url, "jobs": status_io.flink_jobs(rest_url)}
        except Exception as e:  # noqa: BLE001 - whatever the REST API does, this part says so in one line
            doc["flink"] = _unavailable(f"Flink REST API at {rest_url}: {e!r}")

    bootstrap = conn.kafka_bootstrap_servers
    security = conn.kafka_security_options()
    if not kafka_io.reachable(bootstrap, timeout_s=3.0):
        reason = _unavailable(f"Kafka at {bootstrap} is not reachable")
        doc["consumer_lag"] = doc["dlq"] = reason
        return doc
    topics = [conn.topic(t) for t in CONTRACT_TOPICS]
    try:
        doc["consumer_lag"] = {
            "available": True,
            "groups": status_io.consumer_lag(bootstrap, topics, **security),
        }
    except Exception as e:  # noqa: BLE001 - one part failing must not hide the others
        doc["consumer_lag"] = _unavailable(e)
    try:
        sizes = status_io.topic_sizes(
            bootstrap, [conn.topic("events.dlq"), conn.topic("actions.dlq")], **security
        )
        doc["dlq"] = {"available": True, "topics": sizes}
    except Exception as e:  # noqa: BLE001 - one part failing must not hide the others
        doc["dlq"] = _unavailable(e)
    return doc


def _print_status(doc: dict[str, Any]) -> None:
    out = Console(soft_wrap=True)
    if not out.is_terminal:  # piped: wide enough that no table cell wraps
        out = Console(soft_wrap=True, width=240)

    def unavailable(part: dict[str, Any]) -> bool:
        if part.get("available"):
            return False
        out.print(f"  [yellow]unavailable:[/] {escape(str(part.get('reason')))}")
        return True

    out.print(
        f"[bold]clickpulse {doc['version']}[/]"
        + (f"  (topic prefix {doc['topic_prefix']!r})" if doc["topic_prefix"] else "")
    )
    out.print("[bold]services[/]")
    if not unavailable(doc["services"]):
        table = Table("service", "source", "state", "url", "healthy", box=None, padding=(0, 2, 0, 2))
        for r in doc["services"]["services"]:
            table.add_row(str(r["service"]), str(r["source"]), str(r.get("state", "")), escape(str(r["url"])),
                          "[green]yes[/]" if r["healthy"] else "[red]no[/]")  # fmt: skip
        out.print(table)
    out.print("[bold]flink jobs[/]")
    if not unavailable(doc["flink"]):
        jobs = doc["flink"]["jobs"]
        if not jobs:
            out.print(f"  no running job at {doc['flink']['rest_url']}")
        table = Table("job", "id", "started", "last checkpoint", box=None, padding=(0, 2, 0, 2))
        for j in jobs:
            cp = j["checkpoint"]
            if cp is None:
                cp_text = "none yet"
            elif "unavailable" in cp:
                cp_text = f"unavailable: {cp['unavailable']}"
            else:
                cp_text = (
                    f"#{cp['id']} at {cp['completed_at']} ({cp['duration_ms']} ms, {cp['size_bytes']} bytes)"
                )
            table.add_row(escape(str(j["name"])), str(j["id"]), str(j["started_at"]), escape(cp_text))
        if jobs:
            out.print(table)
    out.print("[bold]consumer lag[/] (committed offsets vs end offsets, contract topics)")
    if not unavailable(doc["consumer_lag"]):
        groups = doc["consumer_lag"]["groups"]
        if not groups:
            out.print("  no consumer group has committed offsets on the contract topics")
        table = Table("group", "topic", "committed", "end", "lag", box=None, padding=(0, 2, 0, 2))
        for group, g in groups.items():
            for topic, t in g["topics"].items():
                table.add_row(
                    escape(group), escape(topic), f"{t['committed']:,}", f"{t['end']:,}", f"{t['lag']:,}"
                )
        if groups:
            out.print(table)
    out.print("[bold]dead letters[/] (records held)")
    if not unavailable(doc["dlq"]):
        for topic, n in doc["dlq"]["topics"].items():
            out.print(f"  {escape(topic):<24} {'no such topic' if n is None else f'{n:,}'}")


def cmd_status(args: argparse.Namespace) -> int:
    """``clickpulse status``: services, running Flink jobs and their last checkpoint, consumer lag, DLQs."""
    doc = status_document()
    if args.json:
        _print_json(doc)
    else:
        _print_status(doc)
    services = doc["services"]
    return 0 if services.get("available") and all(r["healthy"] for r in services["services"]) else 1


def package_version() -> str:
    """The installed package's version; ``unknown`` when it is not installed (run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clickpulse")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


# --------------------------------------------------------------------------- collector


def cmd_collector(args: argparse.Namespace) -> int:
    """``clickpulse collector``: the Segment-compatible HTTP collector in the foreground."""
    from connectors.collector.main import run

    return run(args)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to generate the CLI reference)."""
    p = argparse.ArgumentParser(prog="clickpulse", description="Real-time clickstream analytics on PyFlink.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks with errors")
    p.add_argument("--version", action="version", version=f"clickpulse {package_version()}")
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
    m.add_argument("--sql-dir", default=None, help="migrations directory (default: the package's sql/)")
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
    q.add_argument(
        "--database",
        default=None,
        help="default database (default: CLICKPULSE_CLICKHOUSE_DATABASE for saved queries, else server's)",
    )
    q.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="value of a query parameter {NAME:Type} (repeatable; saved queries list theirs and their "
        "defaults in their header)",
    )
    q.add_argument(
        "--json", action="store_true", help="one JSON document {columns, rows, row_count} on stdout"
    )
    q.set_defaults(func=cmd_query)

    st = sub.add_parser(
        "status",
        help="services, running Flink jobs and their last checkpoint, consumer lag, dead-letter counts",
    )
    st.add_argument("--json", action="store_true", help="one JSON document on stdout")
    st.set_defaults(func=cmd_status)

    from connectors.dashboard.settings import add_dashboard_args

    db = sub.add_parser("dashboard", help="serve the live dashboard (read-only ClickHouse user) until Ctrl-C")
    add_dashboard_args(db)
    db.set_defaults(func=cmd_dashboard)

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
        default=1000.0,
        help="at most this many records per second (default 1000, the rate the latency targets are set "
        "at; 0: as fast as the ingest job keeps up)",
    )
    d.add_argument(
        "--exit",
        action="store_true",
        help="end after the summary and stop the stack the demo started (default: serve the dashboard on "
        "clickpulse_demo, stack and topics up, until Ctrl-C)",
    )
    d.add_argument(
        "--jobs",
        choices=("pipeline", "separate"),
        default="pipeline",
        help="pipeline: the pipeline job (ingest, sessions and triggers in one Flink graph) with dispatch "
        "and load (default); separate: the single jobs ingest, sessionize, triggers, dispatch, load",
    )
    d.add_argument("--keep-running", action="store_true", help=argparse.SUPPRESS)  # the default now
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


_START_HINT = "start the local stack (`clickpulse stack up`) or set "


def require_kafka(bootstrap: str) -> None:
    """Fail fast with one line when nothing answers at ``bootstrap`` (the clients wait 30 s to say so)."""
    from connectors import kafka as kafka_io

    if not kafka_io.reachable(bootstrap, timeout_s=3.0):
        raise CliError(f"Kafka at {bootstrap} is not reachable: {_START_HINT}KAFKA_BOOTSTRAP_SERVERS")


def as_cli_error(exc: BaseException) -> CliError | None:
    """``exc`` as the one-line error the operator sees, or ``None`` for an unexpected error (a bug: it
    keeps its traceback). Service clients' errors become "<service> at <where>: <reason>" lines."""
    if isinstance(exc, CliError):
        return exc
    from connectors.migrate import MigrationError
    from udfs.rules.definition import RuleError

    if isinstance(exc, MigrationError | RuleError):
        return CliError(str(exc))
    if type(exc).__name__ in ("StackError", "DemoError", "FlinkClusterError"):  # devstack's, if installed
        return CliError(str(exc), exit_code=2)
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):  # the messages only: the input may be a secret
        problems = "; ".join(f"{_variable(e['loc'])}: {e['msg']}" for e in exc.errors())
        return CliError(f"invalid setting: {problems}", exit_code=2)
    from kafka.errors import KafkaError, KafkaTimeoutError

    if isinstance(exc, KafkaTimeoutError) and "bootstrap" in str(exc):
        return CliError(f"Kafka is not reachable ({exc}): {_START_HINT}KAFKA_BOOTSTRAP_SERVERS")
    if isinstance(exc, KafkaError):
        return CliError(f"Kafka: {exc}")
    from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

    if isinstance(exc, OperationalError) and "Failed to establish a new connection" in str(exc):
        return CliError(f"ClickHouse is not reachable (connection refused): {_START_HINT}CLICKHOUSE_URL")
    if isinstance(exc, ClickHouseError):
        return CliError(f"ClickHouse: {exc}")
    if isinstance(exc, ConnectionError | TimeoutError):
        return CliError(f"connection failed: {exc}")
    return None


def _variable(loc: tuple[int | str, ...]) -> str:
    """The variable of the settings field a validation error is about (its name when none declares it)."""
    from connectors.settings import Settings

    name = str(loc[0]) if loc else "?"
    pending: list[type[Settings]] = [Settings]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        info = cls.model_fields.get(name)
        if info is not None and info.alias:
            return info.alias
    return ".".join(map(str, loc))


def error_line(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr (the message's line breaks become spaces)."""
    one_line = " ".join(message.split())
    console.print(f"[red]error:[/] {escape(one_line)}", soft_wrap=True, highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clickpulse`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.command in LOCAL_COMMANDS and not local_stack_installed():
        error_line(
            f"`clickpulse {args.command}` needs the local stack, which is not installed here "
            "(from a checkout: pip install -e '.[local]')"
        )
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        # the command's own clean-up (finally blocks, Stack.up's) has run by now
        if args.verbose:
            log.exception("interrupted")
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        err = as_cli_error(exc)
        if err is None:
            raise
        if args.verbose:
            log.exception("%s", type(exc).__name__)
        error_line(str(err))
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
