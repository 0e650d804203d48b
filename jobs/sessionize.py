"""Sessionize job: ``events.enriched`` -> event-time sessions per user_key -> ``sessions`` / ``events.late``.

Run it as ``python -m jobs.sessionize``, ``clickpulse run sessionize`` or ``flink run -py jobs/sessionize.py``
(the counters go to the TaskManager log and to Flink metrics).

Plan:

1. Kafka source ``enriched_events`` (SQL connector = Flink's ``KafkaSource``, ``read_committed``): key
   (user_key), value bytes, and a rowtime ``event_time`` taken from the JSON ``event_time_ms`` in the JVM,
   with per-partition watermarks ``event_time - out_of_orderness`` and source idleness; an event more
   than ``CLICKPULSE_FLINK_WATERMARK_MAX_LEAD_MS`` ahead of its Kafka record time drives the watermark
   as if it were only that far ahead, so a few future-dated events cannot make everything else late.
2. The table becomes a ``DataStream`` (watermarks included) keyed by user_key in the JVM, into a
   ``KeyedProcessFunction``: with ``--engine jvm`` (default) the Java one of ``connectors/jvm``
   (:func:`build_jvm`; the same logic as :mod:`udfs.sessions`, events parsed once in the JVM); with
   ``--engine python`` :class:`SessionizeFunction` (keyed by :func:`keyed_by_first_field`), run in Python
   THREAD mode (embedded in the JVM by pemja). Either only loads/stores one ``ValueState`` (with
   ``python``: compact JSON and a write-through cache of decoded states) and registers event-time timers;
   the session logic is the pure reducer :mod:`udfs.sessions` or its Java transcription.
3. Session records (main output) -> ``sessions`` (key session_id); too-late events (side output) ->
   ``events.late`` (key user_key, value = the enriched event as received). Both sinks are Kafka
   transactions committed with checkpoints (exactly-once).

Why SQL at the edges: Python's DataStream API can only take event timestamps from a Python operator
placed after the source, which merges the partitions before watermarks are generated and parses every
event one more time; the SQL source extracts ``event_time_ms`` in the JVM and generates watermarks per
Kafka partition. PyFlink's DataStream ``KafkaSink`` cannot write a Kafka key different from the value
(both serializers get the whole element), while the contract keys ``sessions`` by session_id; the SQL
Kafka sink is the same ``KafkaSink`` (``DeliveryGuarantee.EXACTLY_ONCE``, transactional id prefix,
``transaction.timeout.ms``) with key/value columns. See ``docs/adr/004-sessions.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import Field
from pyflink.common import Row, Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, RuntimeContext

from connectors.flink import (
    ENRICHED_USER_KEY_SQL,
    FlinkSettings,
    OperatorCounters,
    create_enriched_source,
    create_kafka_sinks,
    create_table_env,
    job_options,
    key_by_first_field,
    python_operator_options,
    run_job,
    string_value_state,
)
from connectors.runtime import setup_logging
from connectors.settings import Connections, ConsumerSettings, Settings, compose, environment, seconds_flag
from udfs import sessions as reducer

log = logging.getLogger("clickpulse.sessionize")

JOB = "sessionize"
#: Operator ids (**breaking** to change: savepoint state maps to them; note changes in CHANGELOG.md).
#: The two engines keep incompatible states, so each has its own uid and state name: switching engines
#: starts sessions afresh (the restored checkpoint's state of the other engine is left unclaimed, so a
#: restore needs ``--restore none`` or Flink's ``execution.state-recovery.ignore-unclaimed-state``).
UID_SESSIONS = "sessionize-sessions"
STATE_NAME = "sessions-v1"
UID_SESSIONS_JVM = "sessionize-sessions-jvm"
STATE_NAME_JVM = "sessions-jvm-v1"
#: The JVM operator's entry point (``connectors/jvm``, built by ``make jars``).
JVM_OPERATOR = "dev.clickpulse.operators.sessions.SessionizeOperator"

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
#: Rows in and out of the keyed function: ``(key, value bytes)``.
OUT_TYPE = Types.ROW_NAMED(["k", "v"], [Types.STRING(), BYTES])
EVENT_TYPE = OUT_TYPE
LATE_TAG = OutputTag("late-events", OUT_TYPE)

_HOUR_MS = 3600 * 1000


class SessionsEngine(StrEnum):
    """Which implementation of the sessions operator runs (the same sessions, see
    ``tests/job/test_sessions_differential.py``)."""

    JVM = "jvm"  # Java KeyedProcessFunction (connectors/jvm), no Python on the event path
    PYTHON = "python"  # THREAD-mode Python KeyedProcessFunction over udfs/sessions.py, the specification


class SessionizeSettings(Settings):
    """Options of event-time sessionization."""

    engine: SessionsEngine = Field(SessionsEngine.JVM, alias="CLICKPULSE_SESSIONIZE_ENGINE")
    """``CLICKPULSE_SESSIONIZE_ENGINE`` / ``--engine``: ``jvm`` (default: the Java operator of
    ``connectors/jvm``, the same sessions as the reducer in ``udfs/sessions.py`` at about a quarter of its
    CPU per event) or ``python`` (that reducer in a Python operator). Their states differ: a checkpoint of
    one does not restore into the other (``docs/adr/004-sessions.md``)."""

    gap_ms: int = Field(30 * 60 * 1000, alias="CLICKPULSE_SESSIONIZE_GAP_MS", gt=0)
    """``CLICKPULSE_SESSIONIZE_GAP_MS`` / ``--gap-ms``: inactivity gap closing a session (default 1800000 =
    30 min)."""
    max_length_ms: int = Field(24 * _HOUR_MS, alias="CLICKPULSE_SESSIONIZE_MAX_LENGTH_MS", gt=0)
    """``CLICKPULSE_SESSIONIZE_MAX_LENGTH_MS`` / ``--max-length-ms``: longest session; longer activity
    splits (default 86400000 = 24 h)."""
    allowed_lateness_ms: int = Field(_HOUR_MS, alias="CLICKPULSE_SESSIONIZE_ALLOWED_LATENESS_MS", ge=0)
    """``CLICKPULSE_SESSIONIZE_ALLOWED_LATENESS_MS`` / ``--allowed-lateness-ms``: how far behind the
    watermark an event still updates its session; later ones go to ``events.late`` (default 3600000 =
    1 h)."""
    out_of_orderness_ms: int = Field(60_000, alias="CLICKPULSE_SESSIONIZE_OUT_OF_ORDERNESS_MS", ge=0)
    """``CLICKPULSE_SESSIONIZE_OUT_OF_ORDERNESS_MS`` / ``--out-of-orderness-ms``: watermark delay behind
    the newest event time per partition (default 60000)."""
    idle_timeout_ms: int = Field(60_000, alias="CLICKPULSE_SESSIONIZE_IDLE_TIMEOUT_MS", gt=0)
    """``CLICKPULSE_SESSIONIZE_IDLE_TIMEOUT_MS``: a partition without records for this long stops holding
    the watermark back (default 60000). Keep it well above the longest stall of a partition that has data
    (time spent in operators chained to the source still counts, FLINK-40234): a partition marked idle
    too early lets the watermark run ahead and its events turn late. Off in a bounded run (``--bounded``),
    where every partition ends."""
    state_ttl_ms: int = Field(7 * 24 * _HOUR_MS, alias="CLICKPULSE_SESSIONIZE_STATE_TTL_MS", gt=0)
    """``CLICKPULSE_SESSIONIZE_STATE_TTL_MS``: safety-net TTL (processing time since last write) of a
    key's state; timers purge it normally at end + gap + lateness (default 604800000 = 7 days)."""
    state_backend: str = Field("rocksdb", alias="CLICKPULSE_SESSIONIZE_STATE_BACKEND")
    """``CLICKPULSE_SESSIONIZE_STATE_BACKEND``: ``rocksdb`` (default: state on disk, any number of users)
    or ``hashmap`` (state on the JVM heap: faster, bounded by memory)."""
    state_cache_keys: int = Field(20_000, alias="CLICKPULSE_SESSIONIZE_STATE_CACHE_KEYS", ge=0)
    """``CLICKPULSE_SESSIONIZE_STATE_CACHE_KEYS``: decoded per-key states kept in the Python worker
    (write-through; Flink state stays the source of truth; 0 disables; default 20000)."""


def add_sessionize_args(p: argparse.ArgumentParser) -> None:
    """The sessionize job's own command-line options (the hidden ``-s`` ones are deprecated, in seconds)."""
    p.add_argument("--gap-ms", dest="gap_ms", type=int, default=None, help="inactivity gap (1800000)")
    p.add_argument(
        "--max-length-ms", dest="max_length_ms", type=int, default=None, help="max length (86400000)"
    )
    p.add_argument("--allowed-lateness-ms", type=int, default=None, help="allowed lateness (3600000)")
    p.add_argument("--out-of-orderness-ms", type=int, default=None, help="watermark delay (60000)")
    p.add_argument(
        "--engine", choices=[e.value for e in SessionsEngine], default=None, help="sessions operator (jvm)"
    )
    for old, dest in (
        ("--gap-s", "gap_ms"),
        ("--max-session-s", "max_length_ms"),
        ("--allowed-lateness-s", "allowed_lateness_ms"),
        ("--out-of-orderness-s", "out_of_orderness_ms"),
    ):
        p.add_argument(old, dest=dest, type=seconds_flag, help=argparse.SUPPRESS)


@dataclass(frozen=True)
class SessionizeJobSettings:
    """Everything the sessionize job reads: the areas it is composed of."""

    connections: Connections
    consumer: ConsumerSettings
    flink: FlinkSettings
    sessionize: SessionizeSettings


# ------------------------------------------------------------------------------ process function


@dataclass(frozen=True)
class FunctionConfig:
    """What the keyed function needs (plain values: pickled into the job graph)."""

    gap_ms: int
    max_ms: int
    allowed_lateness_ms: int
    out_of_orderness_ms: int
    state_ttl_ms: int
    state_cache_keys: int
    log_interval_s: float

    @classmethod
    def of(cls, s: SessionizeJobSettings) -> FunctionConfig:
        """Pick the function's fields out of the job settings."""
        c = s.sessionize
        return cls(
            gap_ms=c.gap_ms,
            max_ms=c.max_length_ms,
            allowed_lateness_ms=c.allowed_lateness_ms,
            out_of_orderness_ms=c.out_of_orderness_ms,
            state_ttl_ms=c.state_ttl_ms,
            state_cache_keys=c.state_cache_keys,
            log_interval_s=s.consumer.log_interval_ms / 1000.0,
        )


_COUNT_FIELDS = ("opened", "closed", "updated", "merged", "retracted", "late", "late_accepted", "purged")
_NO_COUNTS = reducer.Counts()
#: Counters of the keyed operator (Flink metrics ``clickpulse.sessions_<name>``, and the periodic log line).
COUNTERS = ("events", *_COUNT_FIELDS, "malformed")


class StateCache:
    """Write-through LRU of decoded per-key states (what :meth:`SessionizeFunction` last stored).

    In THREAD mode every keyed-state read crosses into the JVM and the state must then be decoded;
    PyFlink's process mode has a read cache (``python.state.cache-size``) for the same reason, thread
    mode has none. Entries are only ever what this instance wrote for its own keys, the Flink state is
    still written on every change, and a restarted task starts with an empty cache, so a hit is
    always what a read would return. Entries older than ``max_age_s`` are ignored so the state TTL
    (processing time since the last write) is never outlived.
    """

    def __init__(self, capacity: int, max_age_s: float) -> None:
        """Keep at most ``capacity`` keys (0 disables the cache)."""
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str, now: float) -> Any | None:
        """The cached state of ``key``, or ``None``."""
        hit = self.entries.get(key)
        if hit is None:
            return None
        if now - hit[0] > self.max_age_s:
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return hit[1]

    def put(self, key: str, state: Any, now: float) -> None:
        """Remember what was just written for ``key``."""
        if self.capacity <= 0:
            return
        self.entries[key] = (now, state)
        self.entries.move_to_end(key)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def drop(self, key: str) -> None:
        """Forget ``key`` (its state was cleared)."""
        self.entries.pop(key, None)


class SessionizeFunction(KeyedProcessFunction):
    """Keyed by user_key: one ``ValueState`` (:func:`udfs.sessions.dump_state` JSON), event-time timers.

    The state is typed ``STRING`` (see :func:`connectors.flink.string_value_state`).
    """

    def __init__(self, config: FunctionConfig) -> None:
        """Keep the config; state, reducer config and metrics are created in :meth:`open`."""
        self.config = config

    def open(self, runtime_context: RuntimeContext) -> None:
        """Create the state handle (with a safety-net TTL), the reducer config and the counters."""
        c = self.config
        # (THREAD mode: pemja routes Python logging into the TaskManager log; never print to stderr,
        # the JVM's stderr is a pipe PyFlink does not drain)
        self.r = reducer
        self.cfg = reducer.SessionConfig(
            gap_ms=c.gap_ms,
            max_ms=c.max_ms,
            allowed_lateness_ms=c.allowed_lateness_ms,
            out_of_orderness_ms=c.out_of_orderness_ms,
        )
        self.state = runtime_context.get_state(string_value_state(STATE_NAME, c.state_ttl_ms))
        self.cache = StateCache(c.state_cache_keys, min(c.state_ttl_ms / 1000, 3600.0))
        self.counters = OperatorCounters(
            runtime_context, "sessions", COUNTERS, label=JOB, log_interval_s=c.log_interval_s
        )
        self.totals = self.counters.totals

    def process_element(self, value: Row, ctx: KeyedProcessFunction.Context) -> Iterator[Any]:
        """One enriched event: reduce, store, register timers, emit sessions / the late event."""
        import orjson

        raw = value[1]
        try:
            ev = self.r.Event.from_record(orjson.loads(raw))
        except (orjson.JSONDecodeError, self.r.EventError, TypeError, AttributeError) as exc:
            log.warning("malformed enriched event for key %r: %s", value[0], exc)
            self.totals["malformed"] += 1
            yield LATE_TAG, Row(value[0], raw)
            return
        self.totals["events"] += 1
        key = value[0]
        now = time.monotonic()
        state = self._load(key, now)
        res = self.r.step(state, ev, ctx.timer_service().current_watermark(), self.cfg)
        yield from self._apply(key, now, state, res, ctx, raw)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext) -> Iterator[Any]:
        """The watermark passed a session's end + gap (publish) or end + gap + lateness (purge)."""
        key = ctx.get_current_key()
        now = time.monotonic()
        state = self._load(key, now)
        res = self.r.on_timer(state, timestamp, self.cfg)
        yield from self._apply(key, now, state, res, ctx, None)

    def _load(self, key: str, now: float) -> Any:
        state = self.cache.get(key, now)
        if state is None:
            state = self.r.load_state(self.state.value())
        return state

    def _apply(
        self, key: str, now: float, before: Any, res: Any, ctx: Any, raw: bytes | None
    ) -> Iterator[Any]:
        if res.state is not before:
            if res.state.is_empty():
                self.state.clear()
                self.cache.drop(key)
            else:
                self.state.update(self.r.dump_state(res.state).decode())
                self.cache.put(key, res.state, now)
        timers = ctx.timer_service()
        for t in res.timers:
            timers.register_event_time_timer(t)
        for e in res.emits:
            if isinstance(e, self.r.SessionRecord):
                yield Row(e.session_id, e.to_json())
            else:
                yield LATE_TAG, Row(e.user_key, raw)
        counts = res.counts
        if counts != _NO_COUNTS:
            totals = self.totals
            for name in _COUNT_FIELDS:
                totals[name] += getattr(counts, name)
        self.counters.maybe_flush(now)

    def close(self) -> None:
        """Push the last counts and log them."""
        self.counters.close()


# ---------------------------------------------------------------------------------------- wiring


def build(t_env: Any, events: Any, s: SessionizeJobSettings, per_key_bound: bool = True) -> tuple[Any, Any]:
    """The sessionize part of the graph: ``events`` (``k`` user_key, ``v`` the enriched event's JSON, with
    an event-time attribute and watermarks, see :func:`connectors.flink.create_enriched_source`) ->
    ``(sessions, late)``, two ``(k STRING, v BYTES)`` tables: session records keyed by session_id and
    too-late events keyed by user_key. ``s.sessionize.engine`` picks the operator.

    ``per_key_bound=False``: lateness is judged by Flink's watermark alone (:data:`udfs.sessions.
    NO_KEY_BOUND_MS`), for watermarks that do not follow event time (the pipeline's receive time)."""
    config = FunctionConfig.of(s)
    if not per_key_bound:
        config = dataclasses.replace(config, out_of_orderness_ms=reducer.NO_KEY_BOUND_MS)
    t_env.create_temporary_view("sessionize_events", events)
    if s.sessionize.engine is SessionsEngine.JVM:
        return build_jvm(t_env, config)
    keyed_rows = t_env.sql_query(
        f"SELECT k, ROW(k, v) FROM (SELECT {ENRICHED_USER_KEY_SQL} AS k, v FROM sessionize_events)"
    )
    sessions = (
        key_by_first_field(t_env, keyed_rows, EVENT_TYPE)
        .process(SessionizeFunction(config), output_type=OUT_TYPE)
        .uid(UID_SESSIONS)
        .name("sessionize")
    )
    late = sessions.get_side_output(LATE_TAG)
    return t_env.from_data_stream(sessions), t_env.from_data_stream(late)


def build_jvm(t_env: Any, c: FunctionConfig) -> tuple[Any, Any]:
    """:func:`build` with the Java operator: the ``(k, v)`` rows (watermarks included) go to
    ``SessionizeOperator.apply`` through the gateway, which keys them by user_key in the JVM (``k``, else
    the JSON's ``user_key``) and parses each event once there; no Python runs on the event path."""
    from pyflink.datastream import DataStream
    from pyflink.java_gateway import get_gateway

    operator = get_gateway().jvm
    for part in JVM_OPERATOR.split("."):
        operator = getattr(operator, part)
    rows = t_env.to_data_stream(t_env.sql_query("SELECT k, v FROM sessionize_events"))
    j_sessions = operator.apply(
        rows._j_data_stream,  # noqa: SLF001 - PyFlink has no public way to apply a Java function
        c.gap_ms,
        c.max_ms,
        c.allowed_lateness_ms,
        c.out_of_orderness_ms,
        STATE_NAME_JVM,
        c.state_ttl_ms,
        JOB,
        int(c.log_interval_s * 1000),
        UID_SESSIONS_JVM,
        "sessionize",
    )
    late = operator.lateEvents(j_sessions)
    return t_env.from_data_stream(DataStream(j_sessions)), t_env.from_data_stream(DataStream(late))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sessionize job (blocks until it ends: bounded runs end, unbounded ones run until killed)."""
    setup_logging()
    s = compose(SessionizeJobSettings, environment(), job_options(JOB, argv, add_sessionize_args))
    _, t_env = create_table_env(
        JOB,
        s.flink,
        s.connections.state_dir,
        extra={
            **python_operator_options(s.flink),
            "table.exec.source.idle-timeout": f"{s.sessionize.idle_timeout_ms} ms",
            "state.backend.type": s.sessionize.state_backend,
        },
        bounded=s.consumer.bounded,
    )
    group_id = s.consumer.group(JOB)
    events = create_enriched_source(
        t_env,
        s.connections,
        s.consumer,
        group_id,
        s.sessionize.out_of_orderness_ms,
        s.flink.watermark_max_lead_ms,
    )
    sessions, late = build(t_env, events, s)
    create_kafka_sinks(
        t_env, s.connections, s.flink, group_id, {"sessions_sink": "sessions", "late_sink": "events.late"}
    )
    statements = t_env.create_statement_set()
    statements.add_insert("sessions_sink", sessions)
    statements.add_insert("late_sink", late)
    log.info("submitting %s (group %s)", JOB, group_id)
    run_job(JOB, statements, t_env, s.flink, s.consumer.log_interval_ms)
    return 0


if __name__ == "__main__":
    # run the imported module's main: the keyed function is then pickled by reference
    # (``jobs.sessionize.SessionizeFunction``), not by value together with ``__main__``'s globals
    from jobs.sessionize import main as module_main

    sys.exit(module_main())
