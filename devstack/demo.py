"""``clickpulse demo`` (what ``make demo`` runs): the whole pipeline, live, checked against the truth.

1. ``stack up`` (Kafka, Redis, ClickHouse endpoint); a fresh set of contract topics under the prefix
   ``demo.``, a fresh database ``clickpulse_demo`` (the loader applies the migrations);
2. the local webhook receiver (:mod:`devstack.receiver`) and ``docs/rules.demo.yaml`` pointed at it;
3. every job at once, each in its own process (a local Flink mini-cluster per Flink job): ingest,
   sessionize, triggers (``--no-dispatch``), dispatch and load; the demo waits until all are running;
4. the simulator's records (default 200,000: duplicates, malformed and late events, deal hunters,
   bots, campaigns) produced into ``demo.events.raw`` while everything runs, at most 1,000 records/s
   (``--rate``; the rate the latency targets are set at) and paced so that the ingest job never has more
   than a few hundred records to catch up (:class:`IngestBacklog`: a backlog would
   come out of ingest as long runs of one partition, i.e. hours of event-time disorder), once the
   triggers job's event time runs (:meth:`Pipeline.wait_event_time`);
5. once ClickHouse has every event, each Flink job is stopped with a final savepoint and ``drain`` as
   soon as it has read its whole input (end of input = end of event time: every open session is
   published, every pending sequence rule decided); the loader and the dispatcher finish what is left
   and stop;
6. a summary checked against the simulator's truth (:func:`collect_results`), with the measured
   latencies; the truth (``truth.json``), every webhook received (``webhooks.jsonl``) and each measured
   webhook's send, fire and receive times (``webhook_latency.jsonl``) are written to ``.clickpulse/demo/``,
   next to the jobs' logs.

7. the dashboard (:mod:`connectors.dashboard`, started in step 1 on the demo's database, so the live
   panels follow the run) keeps serving: the demo prints its URL and waits for Ctrl-C, then stops the
   dashboard and the stack it started. ``--exit`` ends right after the summary instead (scripts, tests).

The final summary goes to stdout, progress to stderr.

:class:`Pipeline` (start, wait until running, kill -9, restart from the last checkpoint, drain) and the
waiting helpers are shared with ``tests/integration/test_e2e.py`` and ``bench/bench_e2e.py``.

What the latencies measure (wall clock, one machine):

* **event → queryable**: from handing the raw record to the Kafka producer to ``inserted_at`` of its
  row in ``events`` (the ClickHouse server's clock when the insert ran; inserts are synchronous, so
  the row is readable from then on). Every unique event counts.
* **event → webhook**: from handing the event that made a rule fire (the 4th view of a deal; the
  returning visit) to the producer, to the receiver reading the request. Sequence rules
  (``cart_abandoned``) fire when event time passes a deadline, not on an event: not counted.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from connectors import kafka as kafka_io
from connectors.clickhouse import client_from_url
from connectors.settings import (
    CONTRACT_TOPICS,
    Connections,
    child_environment,
    load_connections,
    process_environment,
    read_env_file,
)
from devstack.receiver import Receipt, WebhookReceiver, describe_action
from devstack.simulate import Produced, SimulateOptions, produce, sim_config
from devstack.simulator import (
    SimRecord,
    TriggerArrival,
    TriggerExpectation,
    Truth,
    expected_sessions,
    expected_trigger_decisions,
    generate,
)
from devstack.stack import Stack, StackError, StackSettings
from udfs.rules import Rules, SequenceWhen, load_rules_file
from udfs.timeutil import parse_iso8601_ms

log = logging.getLogger(__name__)

PREFIX = "demo."
DATABASE = "clickpulse_demo"
REPO = Path(__file__).resolve().parent.parent
DEMO_RULES = REPO / "docs" / "rules.demo.yaml"
#: The port the demo rules file names; the demo uses another free port when this one is taken.
RULES_PORT = 8099
FLINK_JOBS = ("ingest", "sessionize", "triggers")
#: The single Flink job that runs ingest, sessions and triggers in one graph (``jobs.pipeline``); the
#: chaos test runs it with ``dispatch`` and ``load`` (:class:`Pipeline` starts any of these).
PIPELINE_JOB = "pipeline"
_FLINK = (*FLINK_JOBS, PIPELINE_JOB)
ALL_JOBS = ("ingest", "sessionize", "triggers", "dispatch", "load")
#: What ``clickpulse demo --jobs`` runs: the pipeline job (the default: ingest, sessions and triggers in
#: one Flink graph, so no Kafka commit stands between an event and its action) or the single jobs.
JOB_SETS: dict[str, tuple[str, ...]] = {
    "pipeline": (PIPELINE_JOB, "dispatch", "load"),
    "separate": ALL_JOBS,
}
_REST_RE = re.compile(r"REST API[^\n]*? at (http://[\w.\-\[\]:]+)")


class DemoError(RuntimeError):
    """The pipeline did not get where it should (a job died, a timeout)."""


@dataclass(frozen=True)
class DemoOptions:
    """Options of ``clickpulse demo``."""

    events: int = 200_000
    seed: int = 7
    #: Records per second at most (0: as fast as ingest keeps up). The latencies the demo prints are specified
    #: at 1,000 events/s; at full speed this box is saturated and webhooks queue behind the fires.
    rate: float = 1000.0
    exit: bool = False
    """End after the summary (and stop the stack the demo started) instead of serving the dashboard until
    Ctrl-C."""
    checkpoint_interval_ms: int = 1000
    #: Most raw records ingest may have left to read before the producer waits (0: no limit).
    backlog: int = 500
    #: Which jobs run: a key of :data:`JOB_SETS`.
    jobs: str = "pipeline"


# ================================================================================================
# processes


@dataclass
class JobProcess:
    """One running job: its process (own process group) and log."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float
    rest_url: str | None = None
    job_id: str | None = None
    running_at: float | None = None  #: monotonic time it was first seen running


@dataclass
class PipelineConfig:
    """Where and how the jobs run.

    ``env`` is the complete environment of every job process (connections, topic prefix, home, secret).
    Checkpoints go to ``<CLICKPULSE_STATE_DIR>/flink/<job>/checkpoints``, logs and savepoints under
    ``workdir``.
    """

    env: dict[str, str]
    workdir: Path
    rules_file: Path
    database: str
    group_prefix: str
    parallelism: int = 1


class Pipeline:
    """The job suite as processes: start, wait until running, kill -9, restart, drain, stop.

    Flink jobs run unbounded from the earliest offsets (``--restore none`` on the first start, ``auto`` on a
    restart, i.e. from the latest retained checkpoint), the triggers job with ``--no-dispatch`` and the
    dispatch loop as its own process, the loader with ``--migrate``. Every process gets its own process
    group so that a stop or a kill reaches the driver, its JVM and any Python workers.
    """

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.jobs: dict[str, JobProcess] = {}
        self.restarts: Counter[str] = Counter()
        (config.workdir / "logs").mkdir(parents=True, exist_ok=True)

    # -- commands ----------------------------------------------------------------------------------

    def group_id(self, job: str) -> str:
        """The consumer group (and transactional-id base) of ``job``."""
        return f"{self.config.group_prefix}-{job}"

    def argv(self, job: str, restore: str = "none") -> list[str]:
        """The command line of ``job``."""
        c = self.config
        args = ["--group-id", self.group_id(job), "--starting-offsets", "earliest"]
        if job in _FLINK:
            args += ["--restore", restore, "--parallelism", str(c.parallelism)]
        if job in ("triggers", PIPELINE_JOB):
            args += ["--rules", str(c.rules_file), "--no-dispatch"]
        elif job == "dispatch":
            args += ["--rules", str(c.rules_file)]
        elif job == "load":
            args += ["--migrate", "--database", c.database]
        return [sys.executable, "-m", f"jobs.{job}", *args]

    def start(self, job: str, *, restore: str = "none") -> JobProcess:
        """Start ``job`` (it must not be running)."""
        if job in self.jobs and self.jobs[job].proc.poll() is None:
            raise DemoError(f"{job} is already running")
        n = self.restarts[job]
        log_path = self.config.workdir / "logs" / (f"{job}.log" if n == 0 else f"{job}.{n}.log")
        env = {**self.config.env, "FLINK_LOG_DIR": str(self.config.workdir / "flink-log" / f"{job}.{n}")}
        with log_path.open("wb") as out:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv
                self.argv(job, restore),
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        jp = JobProcess(job, proc, log_path, time.monotonic())
        self.jobs[job] = jp
        log.info("started %s (pid %d), log %s", job, proc.pid, log_path)
        return jp

    def start_all(self, jobs: Iterable[str] = ALL_JOBS) -> None:
        """Start several jobs at once."""
        for job in jobs:
            self.start(job)

    def restart(self, job: str) -> JobProcess:
        """Start ``job`` again, restoring its latest checkpoint (Flink jobs)."""
        self.restarts[job] += 1
        return self.start(job, restore="auto")

    def alive(self, job: str) -> bool:
        """True while ``job``'s process runs."""
        jp = self.jobs.get(job)
        return jp is not None and jp.proc.poll() is None

    def log_tail(self, job: str, n: int = 4000) -> str:
        """The end of ``job``'s log."""
        jp = self.jobs.get(job)
        if jp is None or not jp.log_path.exists():
            return "(no log)"
        return jp.log_path.read_text(errors="replace")[-n:]

    def check_alive(self, jobs: Iterable[str] | None = None) -> None:
        """Raise :class:`DemoError` (with the log tail) if any of ``jobs`` (default: all started) exited."""
        for job in jobs if jobs is not None else list(self.jobs):
            jp = self.jobs.get(job)
            if jp is not None and jp.proc.poll() is not None:
                raise DemoError(
                    f"{job} exited with {jp.proc.returncode}; log {jp.log_path}:\n{self.log_tail(job)}"
                )

    # -- Flink REST --------------------------------------------------------------------------------

    def rest_url(self, job: str) -> str | None:
        """The job's mini-cluster REST URL (``None`` until it listens).

        From the job's log line when it writes one (ingest, triggers), else found among the loopback
        ports the job's process group listens on (Linux ``/proc``): the one answering Flink's
        ``/overview``.
        """
        jp = self.jobs[job]
        if jp.rest_url is None and jp.log_path.exists():
            m = _REST_RE.search(jp.log_path.read_text(errors="replace"))
            if m:
                jp.rest_url = m.group(1).rstrip("/")
        if jp.rest_url is None and jp.proc.poll() is None:
            for port in sorted(listening_ports(jp.proc.pid)):
                url = f"http://127.0.0.1:{port}"
                try:
                    if "flink-version" in httpx.get(f"{url}/overview", timeout=1.0).json():
                        jp.rest_url = url
                        break
                except (httpx.HTTPError, ValueError):
                    continue
        return jp.rest_url

    def flink_state(self, job: str) -> str | None:
        """``RUNNING`` once the Flink job and every one of its tasks run; else its state or ``None``."""
        rest = self.rest_url(job)
        if rest is None:
            return None
        try:
            jobs = httpx.get(f"{rest}/jobs/overview", timeout=5).json().get("jobs", [])
            if not jobs:
                return None
            jid = jobs[-1]["jid"]
            detail = httpx.get(f"{rest}/jobs/{jid}", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None
        self.jobs[job].job_id = jid
        state = str(detail.get("state"))
        if state == "RUNNING" and any(v.get("status") != "RUNNING" for v in detail.get("vertices", [])):
            return "DEPLOYING"
        return state

    def wait_running(
        self, jobs: Iterable[str], timeout_s: float, tick: Callable[[], None] | None = None
    ) -> None:
        """Block until every Flink job in ``jobs`` is RUNNING (others: until their process is up)."""
        pending = set(jobs)
        deadline = time.monotonic() + timeout_s
        while pending:
            self.check_alive(pending)
            for job in sorted(pending):
                if job not in _FLINK or self.flink_state(job) == "RUNNING":
                    jp = self.jobs[job]
                    jp.running_at = time.monotonic()
                    log.info("%s running after %.0fs", job, jp.running_at - jp.started)
                    pending.discard(job)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"not running after {timeout_s:.0f}s: {', '.join(sorted(pending))}")
            if tick is not None:
                tick()
            time.sleep(1.0)

    def wait_event_time(self, tick: Callable[[], None] | None = None) -> None:
        """Block until the triggers (or pipeline) job's event time can advance: its rules source holds
        the watermark back until it is idle, ``CLICKPULSE_TRIGGERS_IDLE_TIMEOUT_MS`` after the job started
        running. Traffic produced before then would meet a watermark stuck at the epoch (no window
        clean-up, no sequence deadline) for a while, unlike live traffic."""
        jp = self.jobs.get("triggers") or self.jobs.get(PIPELINE_JOB)
        if jp is None or jp.running_at is None:
            return
        idle_s = int(self.config.env.get("CLICKPULSE_TRIGGERS_IDLE_TIMEOUT_MS", "2000")) / 1000.0
        until = jp.running_at + idle_s + 3.0
        while time.monotonic() < until:
            self.check_alive()
            if tick is not None:
                tick()
            time.sleep(min(1.0, max(0.0, until - time.monotonic())))

    # -- stopping ----------------------------------------------------------------------------------

    def kill(self, job: str) -> None:
        """``kill -9`` of the job's whole process group (a crash, not a stop)."""
        jp = self.jobs[job]
        if jp.proc.poll() is None:
            os.killpg(jp.proc.pid, signal.SIGKILL)
            jp.proc.wait(30)
        log.info("killed %s (-9)", job)

    def terminate(self, job: str, timeout_s: float = 60.0) -> None:
        """SIGTERM to the job's process group; SIGKILL if it is still there after ``timeout_s``."""
        jp = self.jobs.get(job)
        if jp is None or jp.proc.poll() is not None:
            return
        try:
            os.killpg(jp.proc.pid, signal.SIGTERM)
            jp.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs: SIGKILL", job, timeout_s)
            os.killpg(jp.proc.pid, signal.SIGKILL)
            jp.proc.wait(30)
        except ProcessLookupError:
            pass

    def drain(self, job: str, timeout_s: float = 180.0) -> None:
        """Stop a Flink job with a final savepoint and ``drain`` (end of event time), wait for its exit.

        Draining sends ``MAX_WATERMARK`` through the job before the last savepoint: every event-time
        timer fires (sessions are published, pending sequence rules decided) and the exactly-once sinks
        commit their last transaction. Falls back to SIGTERM when the REST call fails.
        """
        jp = self.jobs[job]
        if jp.proc.poll() is not None:
            return
        rest = self.rest_url(job)
        if jp.job_id is None:
            self.flink_state(job)
        target = (self.config.workdir / "savepoints" / job).resolve()
        target.mkdir(parents=True, exist_ok=True)
        try:
            if rest is None or jp.job_id is None:
                raise DemoError("no REST endpoint")
            resp = httpx.post(
                f"{rest}/jobs/{jp.job_id}/stop",
                json={"drain": True, "targetDirectory": target.as_uri()},
                timeout=10,
            )
            resp.raise_for_status()
            request_id = resp.json()["request-id"]
        except (httpx.HTTPError, DemoError, KeyError, ValueError) as exc:
            log.warning("%s: stop with drain failed (%s): SIGTERM", job, exc)
            self.terminate(job)
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if jp.proc.poll() is not None:
                break
            try:
                status = httpx.get(f"{rest}/jobs/{jp.job_id}/savepoints/{request_id}", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                status = {}
            op = status.get("operation") or {}
            if op.get("failure-cause"):
                log.warning("%s: drain failed: %s", job, str(op["failure-cause"])[:500])
                break
            time.sleep(0.5)
        try:
            jp.proc.wait(max(5.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s still running after the drain: SIGTERM", job)
        self.terminate(job)

    def stop_all(self) -> None:
        """SIGTERM (then SIGKILL) every job still running."""
        for job in list(self.jobs):
            self.terminate(job)


def listening_ports(pgid: int) -> set[int]:
    """TCP ports that processes of group ``pgid`` other than its leader listen on, except those the leader
    is connected to (Linux ``/proc``; elsewhere empty): the JVM's ports minus PyFlink's Py4J gateway (and
    without the driver's own Py4J callback server), neither of which speaks HTTP."""
    proc = Path("/proc")
    if not proc.is_dir():
        return set()
    group: set[str] = set()
    leader: set[str] = set()
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if os.getpgid(int(pid_dir.name)) != pgid:
                continue
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    (leader if int(pid_dir.name) == pgid else group).add(target[8:-1])
        except OSError:
            continue
    listening: set[int] = set()
    connected: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) <= 9:
                continue
            if cols[3] == "0A" and cols[9] in group:
                listening.add(int(cols[1].rsplit(":", 1)[1], 16))
            elif cols[3] == "01" and cols[9] in leader:
                connected.add(int(cols[2].rsplit(":", 1)[1], 16))
    return listening - connected


# ================================================================================================
# Kafka helpers


def read_topic(bootstrap: str, topic: str, *, quiet_s: float = 3.0) -> list[Any]:
    """Every committed record of ``topic`` (``read_committed``), until nothing new for ``quiet_s``."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=int(quiet_s * 1000),
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()])
        return list(consumer)
    finally:
        consumer.close()


def data_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Per partition, 1 + the offset of the last committed data record (0 when there is none).

    This is what a consumer that read everything has reached at least: end offsets also count the
    transaction markers of exactly-once producers, which no consumer ever "reads".
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        consumer_timeout_ms=2000,
    )
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        begins = consumer.beginning_offsets(parts)
        out: dict[int, int] = {}
        for tp in parts:
            back = 64
            while True:
                start = max(begins[tp], ends[tp] - back)
                consumer.assign([tp])
                consumer.seek(tp, start)
                last = -1
                give_up = time.monotonic() + 60
                while consumer.position(tp) < ends[tp] and time.monotonic() < give_up:
                    for rec in consumer.poll(timeout_ms=500).get(tp, []):
                        last = max(last, rec.offset)
                if last >= 0 or start == begins[tp]:
                    out[tp.partition] = last + 1
                    break
                back *= 16
        return out
    finally:
        consumer.close()


def group_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    """Committed offsets of consumer group ``group``."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="clickpulse-demo-admin")
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
        return {(tp.topic, tp.partition): om.offset for tp, om in offsets.items()}
    finally:
        admin.close()


def caught_up(bootstrap: str, group: str, topic: str, targets: Mapping[int, int]) -> bool:
    """True when ``group`` has committed at least ``targets`` (see :func:`data_end_offsets`) on ``topic``."""
    committed = group_offsets(bootstrap, group)
    return all(committed.get((topic, p), 0) >= off for p, off in targets.items() if off > 0)


# ================================================================================================
# producing


class IngestBacklog:
    """``pause`` for :func:`produce`: true while ingest has more than ``limit`` raw records left to read.

    Why: the ingest job reads its four input partitions in fetches of up to a megabyte each, so a backlog
    in ``events.raw`` comes out of it as long runs of one partition after another, i.e. minutes to hours
    of event-time disorder in ``events.enriched`` (sessionize then sends whole runs to ``events.late``).
    Live traffic never builds such a backlog; a simulator producing days of traffic in seconds does.

    Ingest's progress is estimated from what it has written to ``events.enriched`` and ``events.dlq``
    (high watermarks, uncommitted transactions included, so no checkpoint delay), scaled up by the share
    of duplicates (dropped, never written). Checked at most every 50 ms.
    """

    def __init__(self, bootstrap: str, prefix: str, *, duplicate_share: float, limit: int = 500) -> None:
        self.limit = limit
        self.scale = 1.0 / max(1e-9, 1.0 - duplicate_share)
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._tps = [
            TopicPartition(t, p)
            for t in (f"{prefix}events.enriched", f"{prefix}events.dlq")
            for p in sorted(self._consumer.partitions_for_topic(t) or ())
        ]
        self._checked = 0.0
        self._processed = 0

    def processed(self) -> int:
        """Estimated raw records ingest has read."""
        now = time.monotonic()
        if now - self._checked >= 0.05:
            self._checked = now
            self._processed = int(sum(self._consumer.end_offsets(self._tps).values()) * self.scale)
        return self._processed

    def __call__(self, produced: int) -> bool:
        return produced - self.processed() > self.limit

    def close(self) -> None:
        """Release the consumer."""
        self._consumer.close()


# ================================================================================================
# results


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; ``None`` when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def observe_trigger_arrival(
    bootstrap: str,
    prefix: str,
    truth: Truth,
    sent_at: Sequence[float],
    rules: Rules,
    actions: Iterable[Mapping[str, Any]],
) -> TriggerArrival:
    """How the enriched events reached the triggers job in this run (see :class:`TriggerArrival`).

    ``sent_at``: wall-clock second each record was produced, by position (:attr:`Produced.sent_at`);
    ``actions``: the records of the ``actions`` topic.
    Per-user order comes from ``events.enriched`` (keyed by ``user_key``); the job's lag from the actions
    of count and returning rules, which fire on the event that completes them: ``fired_at`` minus when
    the newest of their events was produced.
    """
    first_sent = {e.message_id: sent_at[e.position] for e in truth.valid}
    parts: dict[int, list[str]] = defaultdict(list)
    for m in read_topic(bootstrap, f"{prefix}events.enriched"):
        parts[m.partition].append(orjson.loads(m.value)["message_id"])
    on_event = {r.id for r in rules if not isinstance(r.when, SequenceWhen)}
    lag = 0.0
    for a in actions:
        sent = [first_sent[e["message_id"]] for e in a["events"] if e["message_id"] in first_sent]
        if a["rule_id"] in on_event and sent:
            lag = max(lag, parse_iso8601_ms(a["fired_at"]) / 1000.0 - max(sent))
    return TriggerArrival([parts[p] for p in sorted(parts)], first_sent, lag)


@dataclass
class Check:
    """One line of the summary: what the pipeline shows, what the truth says, whether they agree."""

    what: str
    pipeline: str
    truth: str
    ok: bool | None  # None: informational


@dataclass
class Results:
    """Everything the summary shows, with the checks against the truth."""

    checks: list[Check] = field(default_factory=list)
    top_pages: list[tuple[str, int]] = field(default_factory=list)
    top_campaigns: list[tuple[str, int]] = field(default_factory=list)
    dau: list[tuple[str, int, int]] = field(default_factory=list)  # day, pipeline, truth
    queryable_ms: list[float] = field(default_factory=list)
    webhook_ms: list[float] = field(default_factory=list)
    #: per counted webhook: action id, rule, and when its last event was sent, it fired, it was received
    #: (wall-clock seconds), written to ``webhook_latency.jsonl``
    webhook_times: list[dict[str, Any]] = field(default_factory=list)
    expected_actions: dict[str, str] = field(default_factory=dict)  # action_id -> rule_id
    received_actions: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every check agrees."""
        return all(c.ok is not False for c in self.checks)

    def add(self, what: str, pipeline: object, truth: object, ok: bool | None = None) -> None:
        """Add a check; ``ok`` defaults to ``pipeline == truth``."""
        fmt = lambda v: f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
        self.checks.append(Check(what, fmt(pipeline), fmt(truth), (pipeline == truth) if ok is None else ok))


def _ms(v: float | None) -> str:
    return "–" if v is None else (f"{v / 1000:,.2f} s" if v >= 1000 else f"{v:,.0f} ms")


def collect_results(
    *,
    client: Any,
    database: str,
    bootstrap: str,
    prefix: str,
    truth: Truth,
    records: Sequence[SimRecord],
    produced: Produced,
    receiver: WebhookReceiver,
    rules: Rules,
    expected: TriggerExpectation | None = None,
) -> Results:
    """Read what the pipeline made (ClickHouse, ``events.dlq``, ``events.late``, the receiver) and compare
    it with the simulator's truth. ``expected``: :func:`devstack.simulator.expected_trigger_decisions`
    if known.

    Exact checks: raw in = enriched + duplicates + DLQ (per reason); every ``events.late`` record is an
    event the simulator delivered hours late; the sessions are the truth's rule (30 min gap) over every
    event that was not sent to ``events.late``; rollups (events per day, DAU, revenue); every fired action
    delivered, every signature valid.

    Trigger decisions are compared with the reference evaluator (:mod:`devstack.reference_rules`) over
    each user's events in the order the triggers job read them (``events.enriched``). A replay
    compresses days into minutes, so where the job's watermark stood when a user's event arrived can be
    minutes of simulated time either way; users whose decisions
    change within that bracket (:func:`devstack.simulator.expected_trigger_decisions`) are counted as
    order-sensitive and shown, every other user's actions must be exactly the expected ones.
    """
    res = Results()

    def q(sql: str) -> list[Any]:
        return list(client.query(sql).result_rows)

    db = database
    events = q(f"SELECT count(), uniqExact(message_id) FROM {db}.events")[0]
    dlq = Counter(orjson.loads(m.value)["error_code"] for m in read_topic(bootstrap, f"{prefix}events.dlq"))
    res.add("raw records in", truth.records, truth.records)
    res.add("enriched events (ClickHouse)", int(events[0]), truth.unique_valid)
    duplicates = truth.records - int(events[1]) - sum(dlq.values())
    res.add("duplicates dropped", duplicates, truth.duplicate_count)
    for code, n in sorted(truth.invalid_counts.items()):
        res.add(f"DLQ {code}", dlq.get(code, 0), n)
    extra = set(dlq) - set(truth.invalid_counts)
    if extra:
        res.add("DLQ other reasons", ", ".join(sorted(extra)), "none", ok=False)

    # late events: every events.late record was delivered hours late; the others were merged in
    late_ids = {orjson.loads(m.value)["message_id"] for m in read_topic(bootstrap, f"{prefix}events.late")}
    truth_late = {x.message_id for x in truth.late}
    res.add(
        "late (delivered 1–12 h late): to events.late / merged",
        f"{len(late_ids):,} / {len(truth_late - late_ids):,}",
        f"{len(truth_late):,} late",
        ok=late_ids <= truth_late,
    )
    # sessions: the truth's rule over every event that was not too late
    accepted = ((e.user_key, e.timestamp_ms) for e in truth.valid if e.message_id not in late_ids)
    cfg = truth.config
    want_sessions = expected_sessions(accepted, cfg["session_gap_s"] * 1000, cfg["session_max_s"] * 1000)
    n_want = sum(len(v) for v in want_sessions.values())
    got = q(f"SELECT count(), sum(events) FROM {db}.sessions FINAL WHERE NOT retracted")[0]
    res.add("sessions (gap 30 min, of the events not too late)", int(got[0]), n_want)
    res.add("events in sessions", int(got[1] or 0), truth.unique_valid - len(late_ids))

    # rollups
    per_day = {
        d: int(n)
        for d, n in q(f"SELECT toString(toDate(minute)), sum(events) FROM {db}.events_per_minute GROUP BY 1")
    }
    want_days = truth.aggregates["events_per_day"]
    res.add(
        "events_per_minute rollup, per day",
        f"{sum(per_day.values()):,} in {len(per_day)} days",
        f"{sum(want_days.values()):,} in {len(want_days)} days",
        ok=per_day == want_days,
    )
    dau = {d: int(n) for d, n in q(f"SELECT toString(day), users FROM {db}.daily_active_users")}
    want_dau = truth.aggregates["daily_active_users_humans"]
    res.dau = [(d, int(dau.get(d, 0)), n) for d, n in sorted(want_dau.items())]
    res.add(
        "daily active users (humans), every day",
        sum(dau.values()),
        sum(want_dau.values()),
        ok=dau == want_dau,
    )
    revenue = {
        c: round(float(v), 2)
        for c, v in q(f"SELECT currency, sum(revenue) FROM {db}.revenue_per_day GROUP BY currency")
    }
    want_revenue = truth.aggregates["revenue"]
    res.add(
        "revenue rollup, per currency",
        f"{len(revenue)} currencies",
        f"{len(want_revenue)} currencies",
        ok=revenue == want_revenue,
    )

    res.top_pages = [
        (str(p), int(n))
        for p, n in q(
            f"SELECT page_path, count() AS n FROM {db}.events WHERE type = 'page' "
            "GROUP BY page_path ORDER BY n DESC, page_path LIMIT 5"
        )  # fmt: skip
    ]
    res.top_campaigns = [
        (str(c), int(n))
        for c, n in q(
            f"SELECT utm_campaign, count() AS n FROM {db}.events WHERE utm_campaign != '' "
            "GROUP BY utm_campaign ORDER BY n DESC, utm_campaign LIMIT 5"
        )  # fmt: skip
    ]

    # triggers: what the receiver got vs the reference evaluator over the order the triggers job read
    actions = [orjson.loads(m.value) for m in read_topic(bootstrap, f"{prefix}actions")]
    if expected is None:
        arrival = observe_trigger_arrival(bootstrap, prefix, truth, produced.sent_at, rules, actions)
        expected = expected_trigger_decisions(records, truth, rules, arrival)
    res.expected_actions = {f.action_id: f.rule_id for f in expected.fires}
    unique = receiver.unique()
    res.received_actions = {aid: str(r.action.get("rule_id")) for aid, r in unique.items()}
    sensitive_actions = {
        aid
        for aid, r in unique.items()
        if (r.action.get("rule_id"), r.action.get("user_key")) in expected.sensitive
    }
    actions_topic = {a["action_id"]: a["rule_id"] for a in actions}
    promo_truth = len(truth.aggregates["deal_promo"]["fires"])
    for rule in rules.active():
        want = {a for a, r in res.expected_actions.items() if r == rule.id}
        got_ids = {a for a, r in res.received_actions.items() if r == rule.id}
        fired = {a for a, r in actions_topic.items() if r == rule.id}
        certain = got_ids - sensitive_actions
        n_sensitive = sum(1 for r, _ in expected.sensitive if r == rule.id)
        note = f"{len(want):,} expected"
        if rule.id == "deal_promo":
            note += f" ({promo_truth:,} in event time)"
        if n_sensitive:
            note += f"; {n_sensitive} order-sensitive users: {len(got_ids - certain):,} fired"
        n_missing, n_extra = len(want - certain), len(certain - want)
        if n_missing or n_extra:
            note += f" (−{n_missing} +{n_extra})"
        res.add(
            f"trigger {rule.id}: fired / delivered",
            f"{len(fired):,} / {len(got_ids):,}",
            note,
            ok=fired == got_ids and certain == want,
        )
    summary = receiver.summary()
    res.add(
        "webhooks: bad signatures / redelivered copies",
        f"{summary['bad_signature']} / {summary['redelivered']}",
        "0 / any",
        ok=summary["bad_signature"] == 0,
    )

    # latencies
    sent = {e.message_id: produced.sent_at[e.position] for e in truth.valid}
    rows = q(f"SELECT message_id, toUnixTimestamp64Milli(inserted_at) FROM {db}.events")
    res.queryable_ms = [ms - sent[mid] * 1000.0 for mid, ms in rows if mid in sent]
    event_rules = {r.id for r in rules.active() if not isinstance(r.when, SequenceWhen)}
    for r in unique.values():
        if r.action.get("rule_id") in event_rules:
            times = [sent.get(str(e.get("message_id")), 0.0) for e in r.action.get("events") or []]
            if times and min(times) > 0:
                res.webhook_ms.append((r.at - max(times)) * 1000.0)
                res.webhook_times.append(
                    {
                        "action_id": r.action.get("action_id"),
                        "rule_id": r.action.get("rule_id"),
                        "sent": max(times),
                        "fired": parse_iso8601_ms(str(r.action.get("fired_at"))) / 1000.0,
                        "received": r.at,
                    }
                )
    return res


def render_results(console: Console, res: Results, *, title: str) -> None:
    """Print the summary: checks, top pages/campaigns/DAU, latencies."""
    table = Table(title=title, title_justify="left", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("pipeline", justify="right")
    table.add_column("truth", justify="right")
    table.add_column("", justify="center")
    for c in res.checks:
        mark = "" if c.ok is None else "[green]✓[/]" if c.ok else "[red]✗[/]"
        table.add_row(c.what, c.pipeline, c.truth, mark)
    table.add_section()
    q = res.queryable_ms
    w = res.webhook_ms
    table.add_row(
        "event → queryable in ClickHouse", f"p50 {_ms(quantile(q, 0.5))}", f"p99 {_ms(quantile(q, 0.99))}", ""
    )
    table.add_row(
        f"event → webhook ({len(w):,} fires on an event)",
        f"p50 {_ms(quantile(w, 0.5))}",
        f"p99 {_ms(quantile(w, 0.99))}",
        "",
    )
    small = Table(
        "top pages", "views", "top campaigns", "events", "day (UTC)", "DAU", "truth", header_style="bold"
    )
    for i in range(max(len(res.top_pages), len(res.top_campaigns), len(res.dau))):
        page = res.top_pages[i] if i < len(res.top_pages) else ("", "")
        camp = res.top_campaigns[i] if i < len(res.top_campaigns) else ("", "")
        day = res.dau[i] if i < len(res.dau) else ("", "", "")
        small.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in (*page, *camp, *day)))
    console.print(Group(table, small))


# ================================================================================================
# the demo


def _scalar(client: Any, sql: str) -> int:
    """``int(client.command(sql))``, 0 while the table does not exist yet (the loader migrates first).

    Any other error (ClickHouse unreachable, a failing query) raises: an outage must not read as 0 rows.
    """
    try:
        return int(client.command(sql))
    except Exception as exc:
        if any(code in str(exc) for code in ("UNKNOWN_TABLE", "UNKNOWN_DATABASE")):
            return 0
        raise


def _pick_port(preferred: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def rules_for_port(template: Path, port: int, out: Path) -> Path:
    """Copy the rules file ``template`` to ``out`` with its receiver port (8099) replaced by ``port``."""
    text = template.read_text(encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.replace(f"127.0.0.1:{RULES_PORT}/", f"127.0.0.1:{port}/"), encoding="utf-8")
    return out


def job_environment(
    conn: Connections, *, prefix: str, home: Path, secret: str, checkpoint_interval_ms: int
) -> dict[str, str]:
    """The environment of every job process: this one's, minus clickpulse settings, plus the demo's."""
    env = child_environment(conn)
    env.update(
        CLICKPULSE_TOPIC_PREFIX=prefix,
        CLICKPULSE_REDIS_KEY_PREFIX=f"{prefix.rstrip('.')}:{time.time_ns()}:",
        CLICKPULSE_STATE_DIR=str(home),
        CLICKPULSE_WEBHOOK_SECRET=secret,
        CLICKPULSE_FLINK_CHECKPOINT_INTERVAL_MS=str(checkpoint_interval_ms),
        CLICKPULSE_JOB_LOG_INTERVAL_MS="5000",
        # a busy 2-core box: a Redis round trip may take longer than the 50 ms default (fail-open would
        # then resolve identities without the store, and the numbers would no longer match the truth)
        CLICKPULSE_REDIS_TIMEOUT_MS="2000",
        # Idleness. A partition that still has data must never be declared idle (the watermark would run
        # ahead of it), and an input that went idle drops the MAX_WATERMARK of a later stop with drain (no
        # end-of-time timers: open sessions unpublished, pending sequence rules undecided), so each job is
        # drained soon after its last record (see finish()). The triggers job's setting also decides when
        # its rules source counts as idle, and until then event time stands still: producing starts
        # after that (Pipeline.wait_event_time), and the drain has to come within it.
        CLICKPULSE_SESSIONIZE_IDLE_TIMEOUT_MS="600000",
        CLICKPULSE_TRIGGERS_IDLE_TIMEOUT_MS="30000",
    )
    return env


@dataclass
class Progress:
    """What the live view shows."""

    phase: str = "starting"
    produced: int = 0
    total: int = 0
    events: int = 0
    sessions: int = 0
    webhooks: int = 0
    last_webhooks: list[str] = field(default_factory=list)


def _live_view(p: Progress, pipeline: Pipeline, t0: float) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_row(f"[bold cyan]{p.phase}[/]", f"[dim]{time.monotonic() - t0:,.0f}s[/]")
    t.add_row("raw produced", f"{p.produced:,} / {p.total:,}")
    t.add_row("events in ClickHouse", f"{p.events:,}")
    t.add_row("sessions in ClickHouse", f"{p.sessions:,}")
    t.add_row("webhooks received", f"{p.webhooks:,}")
    jobs = "  ".join(
        f"{j} [green]●[/]" if pipeline.alive(j) else f"{j} [dim]○[/]"
        for j in (*ALL_JOBS, PIPELINE_JOB)
        if j in pipeline.jobs
    )
    t.add_row("jobs", jobs)
    for line in p.last_webhooks[-3:]:
        t.add_row("", f"[dim]{line}[/]")
    return t


class DemoDashboard:
    """The dashboard on the demo's database: a process of its own (own process group) on a free port."""

    def __init__(self, stack: Stack, log_file: Path) -> None:
        """Start it against the stack's ClickHouse as the stack's read-only user."""
        from devstack.stack import READONLY_PASSWORD_VAR, READONLY_USER_VAR, free_port

        conn = load_connections(stack.root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKPULSE_")}
        env.update(
            CLICKHOUSE_URL=conn.clickhouse_url.get_secret_value(), CLICKPULSE_CLICKHOUSE_DATABASE=DATABASE
        )
        stack_env = read_env_file(stack.env_file) if stack.env_file.is_file() else {}
        for key in (READONLY_USER_VAR, READONLY_PASSWORD_VAR):
            if key in stack_env:
                env[key] = stack_env[key]
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argv
                [
                    sys.executable,
                    "-m",
                    "connectors.dashboard",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not Stack.healthy("dashboard", self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DemoError(f"the dashboard did not start; see {log_file}")
            time.sleep(0.2)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def serve_until_interrupted(dashboard: DemoDashboard, stdout: Console) -> None:
    """Keep the demo's dashboard up until Ctrl-C / SIGTERM (or until it dies)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stdout.print(f"dashboard: {dashboard.url}  (Ctrl-C to stop)")
        while not stop.wait(0.5):
            if not dashboard.alive():
                stdout.print("[red]the dashboard stopped[/]")
                return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(opts: DemoOptions, console: Console, stdout: Console | None = None) -> int:
    """Run the demo; returns the process exit code (0: every number matches the truth).

    Progress goes to ``console`` (stderr), the final summary to ``stdout`` (default: stdout).
    """
    stdout = stdout or Console()
    t_start = time.monotonic()
    env = process_environment()
    stack = Stack(StackSettings.from_env(env), environ=env)
    pipeline: Pipeline | None = None
    receiver: WebhookReceiver | None = None
    dashboard: DemoDashboard | None = None
    was_up = all(row["healthy"] for row in stack.status())
    try:
        console.rule("[bold]clickpulse demo")
        stack.up(progress=lambda m: console.print(f"[cyan]•[/] {m}"))
        conn = load_connections(stack.root)
        bootstrap = conn.kafka_bootstrap_servers
        ch_url = conn.clickhouse_url.get_secret_value()

        topics = {f"{PREFIX}{t}": cfg for t, cfg in CONTRACT_TOPICS.items()}
        kafka_io.delete_topics(bootstrap, topics)
        time.sleep(1.0)  # topic deletion is asynchronous
        kafka_io.ensure_topics(bootstrap, topics, partitions=4)
        client = client_from_url(ch_url)
        client.command(f"DROP DATABASE IF EXISTS {DATABASE}")
        console.print(f"[green]•[/] fresh topics {PREFIX}* and database {DATABASE}")

        workdir = stack.root / "demo"
        if workdir.exists():
            import shutil

            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        dashboard = DemoDashboard(stack, workdir / "logs" / "dashboard.log")
        console.print(f"[green]•[/] dashboard on {DATABASE} at {dashboard.url}")
        secret = secrets.token_hex(16)
        progress = Progress(total=opts.events)

        def on_receipt(r: Receipt) -> None:
            if r.status == 200:
                progress.last_webhooks.append(f"{r.path}  {describe_action(r.action)}")
                del progress.last_webhooks[:-3]

        port = _pick_port(RULES_PORT)
        receiver = WebhookReceiver(secret, port=port, on_receipt=on_receipt).start()
        rules_file = rules_for_port(DEMO_RULES, port, workdir / "rules.yaml")
        rules = Rules.of(load_rules_file(rules_file))
        console.print(f"[green]•[/] webhook receiver on {receiver.url()} ({len(rules)} demo rules)")

        cfg = sim_config(SimulateOptions(events=opts.events, seed=opts.seed))
        records, truth = generate(cfg)
        console.print(
            f"[green]•[/] simulated {len(records):,} records over {cfg.span.total_seconds() / 3600:.0f} h of "
            f"simulated time ({truth.duplicate_count:,} duplicates, {sum(truth.invalid_counts.values()):,} "
            f"malformed, {len(truth.late):,} late)"
        )

        env = job_environment(
            conn,
            prefix=PREFIX,
            home=workdir / "home",
            secret=secret,
            checkpoint_interval_ms=opts.checkpoint_interval_ms,
        )
        pipeline = Pipeline(
            PipelineConfig(env, workdir, rules_file, DATABASE, group_prefix=f"demo-{time.time_ns()}")
        )
        t0 = time.monotonic()
        produced = Produced([], 0.0)

        def poll() -> None:
            try:
                progress.events = _scalar(client, f"SELECT count() FROM {DATABASE}.events")
                progress.sessions = _scalar(client, f"SELECT count() FROM {DATABASE}.sessions")
            except Exception as exc:  # noqa: BLE001 - the live view keeps its last counts
                log.warning("counting rows in ClickHouse failed: %s", exc)
            progress.webhooks = len(receiver.unique()) if receiver is not None else 0

        with Live(
            _live_view(progress, pipeline, t0), console=console, refresh_per_second=2, transient=True
        ) as live:

            def tick() -> None:
                assert pipeline is not None
                poll()
                live.update(_live_view(progress, pipeline, t0))

            progress.phase = "starting every job"
            pipeline.start_all(JOB_SETS[opts.jobs])
            pipeline.wait_running(JOB_SETS[opts.jobs], timeout_s=900, tick=tick)
            progress.phase = "waiting for the triggers job's event time to start"
            pipeline.wait_event_time(tick=tick)
            t_ready = time.monotonic()
            console.print(f"[green]•[/] every job running ({t_ready - t0:.0f}s)")

            progress.phase = "producing"
            done = threading.Event()
            box: dict[str, Any] = {}

            backlog = IngestBacklog(
                bootstrap, PREFIX, duplicate_share=truth.duplicate_count / truth.records, limit=opts.backlog
            )

            def producer() -> None:
                try:
                    box["produced"] = produce(
                        bootstrap,
                        f"{PREFIX}events.raw",
                        records,
                        rate=opts.rate,
                        progress=lambda i: setattr(progress, "produced", i),
                        pause=backlog if opts.backlog > 0 else None,
                    )
                except Exception as exc:  # noqa: BLE001 - reported below
                    box["error"] = exc
                finally:
                    backlog.close()
                    done.set()

            threading.Thread(target=producer, name="demo-producer", daemon=True).start()
            while not done.is_set():
                pipeline.check_alive()
                tick()
                done.wait(1.0)
            if "error" in box:
                raise DemoError(f"producing failed: {box['error']}")
            produced = box["produced"]
            console.print(
                f"[green]•[/] produced {len(records):,} records in {produced.seconds:.1f}s "
                f"({len(records) / max(produced.seconds, 1e-9):,.0f}/s, paced so that ingest never has more "
                f"than {opts.backlog:,} records to catch up)"
            )

            progress.phase = "pipeline catching up"
            wait_for_events(pipeline, client, DATABASE, truth.unique_valid, tick=tick)
            t_loaded = time.monotonic()
            console.print(
                f"[green]•[/] every event queryable in ClickHouse ({t_loaded - t_ready:.0f}s after start)"
            )

            progress.phase = "draining the Flink jobs (end of event time)"
            finish(pipeline, bootstrap, PREFIX, tick=tick, say=lambda m: console.print(f"[green]•[/] {m}"))
            poll()
        t_end = time.monotonic()
        console.print(
            f"[green]•[/] drained and stopped ({t_end - t_loaded:.0f}s); "
            f"{len(receiver.receipts()):,} webhook requests received"
        )
        with console.status(
            "comparing with the truth (trigger decisions: the reference evaluator over the observed order)"
        ):
            res = collect_results(
                client=client,
                database=DATABASE,
                bootstrap=bootstrap,
                prefix=PREFIX,
                truth=truth,
                records=records,
                produced=produced,
                receiver=receiver,
                rules=rules,
            )
        stdout.print(receiver.table(last=5))
        total = time.monotonic() - t_start
        render_results(
            stdout,
            res,
            title=f"clickpulse demo: {truth.records:,} raw records, every job running at once, "
            f"{total:,.0f}s in all (jobs up {t_ready - t0:.0f}s, events loaded {t_loaded - t_ready:.0f}s, "
            f"drain {t_end - t_loaded:.0f}s)",
        )
        (workdir / "truth.json").write_bytes(truth.to_json())
        with (workdir / "webhooks.jsonl").open("wb") as out:
            for r in receiver.receipts():
                out.write(
                    orjson.dumps({"at": r.at, "path": r.path, "status": r.status, "action": r.action}) + b"\n"
                )
        with (workdir / "webhook_latency.jsonl").open("wb") as out:
            out.writelines(orjson.dumps(t) + b"\n" for t in res.webhook_times)
        if res.ok:
            stdout.print("[green]demo ok: every number matches the simulator's truth[/]")
        else:
            stdout.print(f"[red]demo: numbers differ from the truth (✗ above); logs in {workdir / 'logs'}[/]")
        stdout.print(f"truth file {workdir / 'truth.json'}, webhooks received {workdir / 'webhooks.jsonl'}")
        if not opts.exit:
            if pipeline is not None:
                pipeline.stop_all()  # the jobs are done; the dashboard and the stack stay
            stdout.print(
                f'explore: clickpulse query --database {DATABASE} "SELECT event, count() FROM events '
                'GROUP BY event ORDER BY 2 DESC"'
            )
            serve_until_interrupted(dashboard, stdout)
        return 0 if res.ok else 1
    except (StackError, DemoError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    finally:
        if pipeline is not None:
            pipeline.stop_all()
        if receiver is not None:
            receiver.close()
        if dashboard is not None:
            dashboard.stop()
        if was_up:
            console.print("[cyan]•[/] the stack was already up before the demo: left running")
        else:
            stack.down(progress=lambda m: console.print(f"[cyan]•[/] {m}"))


def wait_for_events(
    pipeline: Pipeline,
    client: Any,
    database: str,
    expected: int,
    *,
    stall_s: float = 180.0,
    tick: Callable[[], None] | None = None,
) -> int:
    """Wait until ClickHouse ``events`` has ``expected`` rows; give up after ``stall_s`` without progress.

    A failing count (ClickHouse away) is progress of nothing: it counts towards the stall, and the stall
    error names it.
    """
    last, last_change = -1, time.monotonic()
    error = ""
    while True:
        pipeline.check_alive()
        try:
            n = _scalar(client, f"SELECT count() FROM {database}.events")
            error = ""
        except Exception as exc:  # noqa: BLE001 - clickhouse-connect raises DatabaseError, OSError and others
            n, error = last, f"; counting failed: {exc}"
        if n >= expected:
            return n
        if n != last:
            last, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            tails = "".join(f"\n--- {j} ---\n{pipeline.log_tail(j, 3000)}" for j in sorted(pipeline.jobs))
            raise DemoError(
                f"ClickHouse has {max(n, 0):,} of {expected:,} events and nothing moved for "
                f"{stall_s:.0f}s{error}{tails}"
            )
        if tick is not None:
            tick()
        time.sleep(1.0)


def finish(
    pipeline: Pipeline,
    bootstrap: str,
    prefix: str,
    *,
    timeout_s: float = 600.0,
    tick: Callable[[], None] | None = None,
    say: Callable[[str], None] = log.info,
) -> None:
    """Bring the whole pipeline to a clean stop; call it once ClickHouse has every event.

    Each Flink job started (the single jobs, or the ``pipeline`` job) is drained (stop with a savepoint
    and MAX_WATERMARK: every open session is published, every pending sequence rule decided) as soon as
    its committed offsets show it has read its whole input;
    then the loader and the dispatcher finish ``sessions`` and ``actions`` and are stopped with SIGTERM.
    """
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()

    def done(what: str) -> None:
        say(f"{what} ({time.monotonic() - t0:.0f}s)")

    def wait(what: str, cond: Callable[[], bool], jobs: Sequence[str], tick_here: bool = True) -> None:
        while not cond():
            pipeline.check_alive(jobs)
            if time.monotonic() > deadline:
                raise DemoError(f"timed out waiting for {what}")
            if tick is not None and tick_here:
                tick()
            time.sleep(1.0)

    # every unique event is in ClickHouse (the caller waited for it), so events.enriched is complete
    inputs = {
        "ingest": ("events.raw", data_end_offsets(bootstrap, f"{prefix}events.raw")),
        "sessionize": ("events.enriched", data_end_offsets(bootstrap, f"{prefix}events.enriched")),
    }
    inputs["triggers"] = inputs["sessionize"]
    inputs[PIPELINE_JOB] = inputs["ingest"]
    failures: list[BaseException] = []

    def catch_up_and_drain(job: str) -> None:
        # each job is drained as soon as it has read its whole input, before that input can turn idle
        try:
            group, (topic, offsets) = pipeline.group_id(job), inputs[job]
            wait(
                f"{job} to read {topic}",
                lambda: caught_up(bootstrap, group, f"{prefix}{topic}", offsets),
                [job],
                tick_here=False,
            )
            pipeline.drain(job)
            done(f"{job} read all of {topic} and was drained")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failures.append(exc)

    flink = [j for j in _FLINK if j in pipeline.jobs]
    drains = [threading.Thread(target=catch_up_and_drain, args=(j,)) for j in flink]
    for t in drains:
        t.start()
    for t in drains:
        while t.is_alive():
            if tick is not None:
                tick()
            t.join(1.0)
    if failures:
        raise failures[0]
    load = pipeline.group_id("load")
    targets = {
        topic: data_end_offsets(bootstrap, f"{prefix}{topic}") for topic in ("events.enriched", "sessions")
    }
    wait(
        "the loader to load sessions",
        lambda: all(caught_up(bootstrap, load, f"{prefix}{t}", off) for t, off in targets.items()),
        ["load"],
    )
    done("the loader loaded every session")
    actions = data_end_offsets(bootstrap, f"{prefix}actions")
    wait(
        "the dispatcher to settle every action",
        lambda: caught_up(bootstrap, pipeline.group_id("dispatch"), f"{prefix}actions", actions),
        ["dispatch"],
    )
    pipeline.terminate("load")
    pipeline.terminate("dispatch")
    done("every action settled; loader and dispatcher stopped")
