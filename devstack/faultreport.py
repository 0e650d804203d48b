"""README's "Faults and bad inputs tried" table, from a real run of the fault tests.

``make chaos`` runs ``pytest -m fault`` (every fault-injection and hostile-input test, the chaos scenario
``tests/integration/test_chaos.py`` included), then ``python -m devstack.faultreport --write``. Two files
under ``.clickpulse/faults/`` (gitignored) carry the run over:

* ``run.json``: every ``fault`` test of the run with its outcome and duration, written at the end of a
  pytest session whose ``-m`` expression names ``fault`` (the hook is in ``tests/conftest.py``);
* ``chaos.json``: the chaos scenario's numbers (records lost and duplicated, sessions, actions delivered
  and wrongly signed, the restarts), written by the test before it asserts them.

The table has one row per fault family (:data:`FAMILIES`; a fault test in a module no family names gets
a row of its own, named after the module) with what the tests try and how many passed, and the chaos
totals under it. ``--write`` replaces the table between the markers in README.md; without it the table is
printed.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
FAULTS_DIR = REPO_ROOT / ".clickpulse" / "faults"
RUN_FILE = "run.json"
CHAOS_FILE = "chaos.json"
START = "<!-- faults-table:start -->"
END = "<!-- faults-table:end -->"


@dataclass(frozen=True)
class Family:
    """A row of the table: the test modules (file stems) it covers and what they try."""

    name: str
    modules: tuple[str, ...]
    tried: str


FAMILIES: tuple[Family, ...] = (
    Family(
        "ClickHouse endpoint limits",
        ("test_clickhouse_endpoint",),
        "1 GiB decompression bombs in every encoding (gzip, deflate, bz2, xz, zstd, lz4), a 1 GB "
        "`Content-Length` (with and without `Expect: 100-continue`), ambiguous framing "
        "(`Transfer-Encoding` with `Content-Length`, repeated, listed or negative `Content-Length`), slow "
        "and idle clients (slowloris), connections over the maximum, queries past the time/result maxima, "
        "writes/`file()`/`url()`/`SET` over GET, foreign "
        "`Host`/`Origin`, inserts the table refuses",
    ),
    Family(
        "local stack",
        ("test_stack",),
        "a service process killed (`stack status` reports it dead, `stack up` restarts it); Redis restarted "
        "on its port with its data (`Stack.restart`)",
    ),
    Family(
        "webhook signing and verification",
        ("test_webhook_signing", "test_receiver", "test_secret_env"),
        "`secret_env` naming settings, credentials, `_ENV` variables or non-strings (file, topic, default); "
        "hostile verification input (wrong types, huge or malformed headers, stale/future timestamps, "
        "several signatures); a receiver fed bad signatures",
    ),
    Family(
        "dispatch destinations",
        ("test_dispatch_destinations", "test_webhook"),
        "actions naming unknown rules or carrying their own url/secret/headers; an action id unfit for a "
        "header; the lane keeps delivering; a receiver dripping one byte a second (total deadline), a 1 GB "
        "response body (cut off)",
    ),
    Family(
        "dispatch backpressure",
        ("test_triggers_job",),
        "a slow destination with 15,000 pending actions (every one delivered, none dead-lettered); a fast "
        "destination beside a slow destination's backlog of 3,000 keeps its latency",
    ),
    Family(
        "Redis",
        ("test_redis_faults", "test_ingest_store_faults"),
        "Redis killed and restarted under ingest; poison values (wrong type, invalid UTF-8, missing or "
        "non-numeric fields, huge hashes), refused writes, a full pending-link buffer",
    ),
    Family(
        "loader",
        ("test_loader",),
        "rows ClickHouse refuses (constraints, values a column cannot hold), a crash while bisecting, "
        "a topic deleted and recreated, marks from before topic ids",
    ),
    Family(
        "event time",
        ("test_sessionize_job",),
        "a burst of future-dated events (must not move the watermark)",
    ),
    Family(
        "chaos: services restarted under load",
        ("test_chaos",),
        "",  # filled from chaos.json
    ),
)


# ------------------------------------------------------------------------------------------ recording


def _write(name: str, data: Mapping[str, Any], directory: Path | None) -> Path:
    out = (directory or FAULTS_DIR) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return out


def write_chaos_summary(summary: Mapping[str, Any], directory: Path | None = None) -> Path:
    """Write the chaos scenario's numbers (``chaos.json``)."""
    return _write(CHAOS_FILE, summary, directory)


def write_run(tests: Mapping[str, Mapping[str, Any]], markexpr: str, directory: Path | None = None) -> Path:
    """Write the outcome of every fault test of a pytest session (``run.json``)."""
    data = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "markexpr": markexpr, "tests": tests}
    return _write(RUN_FILE, data, directory)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------ the table


def _module(nodeid: str) -> str:
    return Path(nodeid.split("::", 1)[0]).stem


def _chaos_tried(chaos: Mapping[str, Any] | None) -> str:
    if not chaos:
        return "the pipeline, dispatch and load jobs under load while Kafka, Redis and ClickHouse restart"
    restarts = ", ".join(f"{r['service']} ({r['seconds']:g} s)" for r in chaos.get("restarts", []))
    return (
        f"{chaos['raw_records']:,} simulated raw records at {chaos['rate_achieved']:,}/s (incl. "
        f"{chaos['duplicates_in_input']:,} duplicates, {chaos['malformed_in_input']:,} malformed) through "
        f"the {', '.join(f'`{j}`' for j in chaos['jobs'])} jobs; restarted one after another: {restarts}; "
        f"outcome: {chaos['unique_valid']:,} events, {chaos['sessions']:,} sessions, "
        f"{chaos['actions_fired']:,} actions ({chaos['webhook_requests']:,} requests)"
    )


def render(run: Mapping[str, Any] | None, chaos: Mapping[str, Any] | None) -> str:
    """The table (markdown) for a run (``run.json``) and the chaos numbers (``chaos.json``)."""
    tests: Mapping[str, Mapping[str, Any]] = (run or {}).get("tests", {})
    by_module: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for nodeid, outcome in tests.items():
        by_module[_module(nodeid)].append(outcome)
    families = list(FAMILIES)
    known = {m for f in families for m in f.modules}
    families += [Family(m, (m,), "(no description in `devstack/faultreport.py` yet)")
                 for m in sorted(by_module) if m not in known]  # fmt: skip
    date = (run or {}).get("date") or (chaos or {}).get("date") or "never"
    lines = [
        f"Last run: {date} (`make chaos`: `pytest -m fault`, then `python -m devstack.faultreport --write`).",
        "",
        "| fault family | inputs tried, faults injected | tests passed / run | seconds |",
        "|---|---|---|---|",
    ]
    for fam in families:
        outcomes = [o for m in fam.modules for o in by_module.get(m, [])]
        tried = _chaos_tried(chaos) if fam.modules == ("test_chaos",) else fam.tried
        if outcomes:
            passed = sum(1 for o in outcomes if o.get("outcome") == "passed")
            failed = [o for o in outcomes if o.get("outcome") in ("failed", "error")]
            result = f"{passed} / {len(outcomes)}" + (f" (**{len(failed)} failed**)" if failed else "")
            seconds = f"{sum(float(o.get('duration_s', 0)) for o in outcomes):,.0f}"
        else:
            result, seconds = "not in this run", ""
        lines.append(f"| {fam.name} | {tried} | {result} | {seconds} |")
    lines.append("")
    if chaos:
        lines.append(
            f"Chaos totals ({chaos['date']}): records lost **{chaos['records_lost']}**, duplicated "
            f"**{chaos['records_duplicated']}** (ClickHouse `events`, one row per unique message id); "
            f"sessions lost **{chaos['sessions_lost']}**, extra **{chaos['sessions_extra']}**, versions "
            f"published twice **{chaos['session_versions_published_twice']}**; actions lost "
            f"**{chaos['actions_lost']}**, "
            f"dead-lettered **{chaos['actions_dead_lettered']}**, wrongly signed "
            f"**{chaos['webhooks_wrongly_signed']}**. Events resolved to another user than the truth's "
            f"(identity lookups failing open while Redis was down): {chaos['identity_differs_from_truth']}; "
            f"on-time events turned late: {chaos['late_unexpected']} (sent to `events.late`, counted, "
            "loaded; not in a session)."
        )
    else:
        lines.append("Chaos totals: no chaos run recorded.")
    return "\n".join(lines)


def replace_section(text: str, table: str) -> str:
    """``text`` with everything between :data:`START` and :data:`END` replaced by ``table``."""
    if START not in text or END not in text:
        raise ValueError(f"README has no {START} … {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table, or write it into README.md with ``--write``."""
    p = argparse.ArgumentParser(prog="devstack.faultreport", description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="replace the table in README.md")
    p.add_argument("--dir", type=Path, default=FAULTS_DIR, help="where run.json and chaos.json are")
    p.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md", help=argparse.SUPPRESS)
    args = p.parse_args(list(argv) if argv is not None else None)
    run, chaos = _read(args.dir / RUN_FILE), _read(args.dir / CHAOS_FILE)
    if run is None and chaos is None:
        print(f"no fault run recorded in {args.dir}: run `make chaos` first", file=sys.stderr)
        return 1
    table = render(run, chaos)
    if args.write:
        args.readme.write_text(
            replace_section(args.readme.read_text(encoding="utf-8"), table), encoding="utf-8"
        )
        print(f"updated {args.readme.name}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
