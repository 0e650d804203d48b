"""Sessionize job: ``events.enriched`` -> event-time sessions per user_key -> ``sessions`` / ``events.late``.

Run it as ``python -m jobs.sessionize``, ``clickpulse run sessionize`` or ``flink run -py jobs/sessionize.py``
(the counters go to the TaskManager log and to Flink metrics).

Plan:

1. Kafka source ``enriched_events`` (SQL connector = Flink's ``KafkaSource``, ``read_committed``): key
   (user_key), value bytes, and a rowtime ``event_time`` taken from the JSON ``event_time_ms`` in the JVM,
   with per-partition watermarks ``event_time - out_of_orderness`` and source idleness.
2. The table becomes a ``DataStream`` (watermarks included) keyed by user_key in the JVM
   (:func:`keyed_by_first_field`), into the ``KeyedProcessFunction`` :class:`SessionizeFunction`, run in
   Python THREAD mode (embedded in the JVM by pemja). It only loads/stores one ``ValueState`` (compact
   JSON, with a write-through cache of decoded states) and registers event-time timers; the session
   logic is the pure reducer :mod:`udfs.sessions`.
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
import logging
import os
import sys
import sysconfig
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field
from pyflink.common import Row, Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, RuntimeContext

from connectors.flink import (
    REPO_ROOT,
    JobSettings,
    create_table,
    create_table_env,
    kafka_sink_options,
    kafka_source_options,
    submitted_detached,
)
from udfs import sessions as reducer

log = logging.getLogger("clickpulse.sessionize")

JOB = "sessionize"
#: Operator ids (**breaking** to change: savepoint state maps to them; note changes in CHANGELOG.md).
UID_SESSIONS = "sessionize-sessions"
STATE_NAME = "sessions-v1"

#: Rows in and out of the keyed function: ``(key, value bytes)``.
OUT_TYPE = Types.ROW_NAMED(["k", "v"], [Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE())])
EVENT_TYPE = OUT_TYPE
LATE_TAG = OutputTag("late-events", OUT_TYPE)


class SessionizeSettings(JobSettings):
    """Settings of the sessionize job (plus every :class:`connectors.flink.JobSettings` field)."""

    session_gap_s: int = Field(1800, alias="CLICKPULSE_SESSION_GAP_S")
    """``CLICKPULSE_SESSION_GAP_S`` / ``--gap-s``: inactivity gap closing a session (default 1800)."""
    session_max_s: int = Field(24 * 3600, alias="CLICKPULSE_SESSION_MAX_S")
    """``CLICKPULSE_SESSION_MAX_S`` / ``--max-session-s``: longest session; longer activity splits
    (default 86400)."""
    allowed_lateness_s: int = Field(3600, alias="CLICKPULSE_ALLOWED_LATENESS_S")
    """``CLICKPULSE_ALLOWED_LATENESS_S`` / ``--allowed-lateness-s``: how far behind the watermark an event
    still updates its session; later ones go to ``events.late`` (default 3600)."""
    out_of_orderness_s: int = Field(60, alias="CLICKPULSE_OUT_OF_ORDERNESS_S")
    """``CLICKPULSE_OUT_OF_ORDERNESS_S`` / ``--out-of-orderness-s``: watermark delay behind the newest
    event time per partition (default 60)."""
    idle_timeout_s: int = Field(60, alias="CLICKPULSE_IDLE_TIMEOUT_S")
    """``CLICKPULSE_IDLE_TIMEOUT_S``: a partition without records for this long stops holding the
    watermark back (default 60). Keep it well above the longest stall of a partition that has data
    (time spent in operators chained to the source still counts, FLINK-40234): a partition marked
    idle too early lets the watermark run ahead and its events turn late."""
    state_ttl_s: int = Field(7 * 24 * 3600, alias="CLICKPULSE_SESSION_STATE_TTL_S")
    """``CLICKPULSE_SESSION_STATE_TTL_S``: safety-net TTL (processing time since last write) of a key's
    state; timers purge it normally at end + gap + lateness (default 604800 = 7 days)."""
    state_backend: str = Field("rocksdb", alias="CLICKPULSE_SESSIONIZE_STATE_BACKEND")
    """``CLICKPULSE_SESSIONIZE_STATE_BACKEND``: ``rocksdb`` (default: state on disk, any number of users)
    or ``hashmap`` (state on the JVM heap: faster, bounded by memory)."""
    state_cache_keys: int = Field(20_000, alias="CLICKPULSE_SESSIONIZE_STATE_CACHE")
    """``CLICKPULSE_SESSIONIZE_STATE_CACHE``: decoded per-key states kept in the Python worker
    (write-through; Flink state stays the source of truth; 0 disables; default 20000)."""
    python_execution_mode: str = Field("thread", alias="CLICKPULSE_PYTHON_EXECUTION_MODE")
    """``CLICKPULSE_PYTHON_EXECUTION_MODE``: ``thread`` (embedded, default) or ``process``."""
    log_interval_s: float = Field(10.0, alias="CLICKPULSE_LOG_INTERVAL_S")
    """``CLICKPULSE_LOG_INTERVAL_S``: period of the one-line counter log (default 10)."""


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
    def of(cls, s: SessionizeSettings) -> FunctionConfig:
        """Pick the function's fields out of the job settings."""
        return cls(
            gap_ms=s.session_gap_s * 1000,
            max_ms=s.session_max_s * 1000,
            allowed_lateness_ms=s.allowed_lateness_s * 1000,
            out_of_orderness_ms=s.out_of_orderness_s * 1000,
            state_ttl_ms=s.state_ttl_s * 1000,
            state_cache_keys=s.state_cache_keys,
            log_interval_s=s.log_interval_s,
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


def _subtask_index(runtime_context: RuntimeContext) -> int:
    """This subtask's index. PyFlink 2.2's THREAD-mode context calls ``getIndexOfThisSubtask()``, which
    Flink 2 moved to ``getTaskInfo()``; go through the wrapped Java context then (-1 if that fails too)."""
    try:
        return int(runtime_context.get_index_of_this_subtask())
    except AttributeError:
        java_context = getattr(runtime_context, "_runtime_context", None)
        try:
            return int(java_context.getTaskInfo().getIndexOfThisSubtask())  # type: ignore[union-attr]
        except AttributeError:
            return -1


class SessionizeFunction(KeyedProcessFunction):
    """Keyed by user_key: one ``ValueState`` (:func:`udfs.sessions.dump_state` JSON), event-time timers.

    The state is typed ``STRING``: in THREAD mode PyFlink converts ``PRIMITIVE_ARRAY(BYTE)`` state
    element by element into a tuple of ints, while strings cross pemja as they are.
    """

    def __init__(self, config: FunctionConfig) -> None:
        """Keep the config; state, reducer config and metrics are created in :meth:`open`."""
        self.config = config

    def open(self, runtime_context: RuntimeContext) -> None:
        """Create the state handle (with a safety-net TTL), the reducer config and the counters."""
        from pyflink.common.time import Time
        from pyflink.datastream.state import StateTtlConfig, ValueStateDescriptor

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
        descriptor = ValueStateDescriptor(STATE_NAME, Types.STRING())
        descriptor.enable_time_to_live(
            StateTtlConfig.new_builder(Time.milliseconds(c.state_ttl_ms))
            .set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite)
            .set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired)
            .build()
        )
        self.state = runtime_context.get_state(descriptor)
        self.cache = StateCache(c.state_cache_keys, min(c.state_ttl_ms / 1000, 3600.0))
        self.subtask = _subtask_index(runtime_context)
        group = runtime_context.get_metrics_group().add_group("clickpulse")
        self.metrics = {name: group.counter(f"sessions_{name}") for name in COUNTERS}
        # counted here and pushed to the Flink counters once a second: each ``inc`` crosses into the JVM
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.flushed = dict.fromkeys(COUNTERS, 0)
        now = time.monotonic()
        self.next_flush = now + 1.0
        self.next_log = now + c.log_interval_s

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
        if now >= self.next_flush:
            self._flush(now)

    def _flush(self, now: float) -> None:
        self.next_flush = now + 1.0
        for name, total in self.totals.items():
            delta = total - self.flushed[name]
            if delta:
                self.metrics[name].inc(delta)
                self.flushed[name] = total
        if now >= self.next_log:
            self.next_log = now + self.config.log_interval_s
            log.info("sessionize[%d]: %s", self.subtask, " ".join(f"{k}={v}" for k, v in self.totals.items()))

    def close(self) -> None:
        """Push the last counts and log them."""
        self.next_log = 0.0
        self._flush(time.monotonic())


# ---------------------------------------------------------------------------------------- wiring


def _interval(seconds: int) -> str:
    return f"INTERVAL '{int(seconds)}' SECOND"


def keyed_by_first_field(t_env: Any, table: Any, value_type: Any) -> Any:
    """A PyFlink ``KeyedStream`` of ``table`` = ``(key STRING, value ROW)``, keyed in the JVM.

    ``DataStream.key_by`` runs a Python operator that turns each element into ``Row(key, element)``
    and then keys the Java stream by field 0 (``KeyByKeySelector``). Here SQL already produces that
    ``(key, element)`` row, so the same Java key-by follows directly and one Python hop per event is
    saved (~2,400 -> ~4,000 events/s on this box, see ``docs/adr/004-sessions.md``). Downstream, the
    keyed function sees exactly what it would after ``key_by``: the element, with the key as the
    current key.
    """
    from pyflink.datastream.data_stream import KeyedStream
    from pyflink.java_gateway import get_gateway

    key_type = Types.STRING()
    typed = t_env.to_append_stream(table, Types.ROW([key_type, value_type]))
    j_keyed = typed._j_data_stream.keyBy(
        get_gateway().jvm.KeyByKeySelector(), Types.ROW([key_type]).get_java_type_info()
    )
    return KeyedStream(j_keyed, value_type, typed)


def build(env: Any, t_env: Any, s: SessionizeSettings) -> Any:
    """Declare sources, the keyed session operator and sinks; return the statement set that runs the job."""
    group_id = s.group_id or f"clickpulse-{JOB}"
    create_table(
        t_env,
        "enriched_events",
        f"""  k STRING,
  v BYTES,
  kafka_ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL,
  event_time AS COALESCE(
    TO_TIMESTAMP_LTZ(TRY_CAST(JSON_VALUE(CAST(v AS STRING), '$.event_time_ms') AS BIGINT), 3), kafka_ts),
  WATERMARK FOR event_time AS event_time - {_interval(s.out_of_orderness_s)}""",
        kafka_source_options(s, s.topic("events.enriched"), group_id, key_fields="k"),
    )
    for name, topic in (("sessions_sink", "sessions"), ("late_sink", "events.late")):
        create_table(
            t_env,
            name,
            "  k STRING,\n  v BYTES",
            kafka_sink_options(s, s.topic(topic), f"{group_id}-{topic}"),
        )
    events = t_env.sql_query(
        "SELECT k, ROW(k, v) FROM ("
        "  SELECT COALESCE(k, JSON_VALUE(CAST(v AS STRING), '$.user_key'), '') AS k, v FROM enriched_events)"
    )
    sessions = (
        keyed_by_first_field(t_env, events, EVENT_TYPE)
        .process(SessionizeFunction(FunctionConfig.of(s)), output_type=OUT_TYPE)
        .uid(UID_SESSIONS)
        .name("sessionize")
    )
    late = sessions.get_side_output(LATE_TAG)
    t_env.create_temporary_view("session_records", t_env.from_data_stream(sessions))
    t_env.create_temporary_view("late_records", t_env.from_data_stream(late))
    statements = t_env.create_statement_set()
    statements.add_insert_sql("INSERT INTO sessions_sink SELECT k, v FROM session_records")
    statements.add_insert_sql("INSERT INTO late_sink SELECT k, v FROM late_records")
    return statements


def parse_args(argv: Sequence[str] | None) -> SessionizeSettings:
    """Settings from the environment (and ``.clickpulse/stack.env``) overridden by the command line."""
    from connectors.settings import by_alias, home_dir
    from jobs.ingest import add_common_args

    p = argparse.ArgumentParser(prog="jobs.sessionize", description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--gap-s", dest="session_gap_s", type=int, default=None, help="inactivity gap (1800)")
    p.add_argument("--max-session-s", dest="session_max_s", type=int, default=None, help="max length (86400)")
    p.add_argument("--allowed-lateness-s", type=int, default=None, help="allowed lateness (3600)")
    p.add_argument("--out-of-orderness-s", type=int, default=None, help="watermark delay (60)")
    args = p.parse_args(list(argv) if argv is not None else None)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    env_file = home_dir() / "stack.env"
    return SessionizeSettings(
        _env_file=env_file if env_file.is_file() else None, **by_alias(SessionizeSettings, overrides)
    )


def thread_mode_environment() -> None:
    """Make the JVM-embedded interpreter (pemja) find this venv's packages and the repo's modules.

    The JVM is started by PyFlink from this process and inherits its environment; in THREAD mode it
    embeds the interpreter of ``python.executable``, whose ``sys.path`` comes from ``PYTHONPATH``.
    """
    paths = [str(REPO_ROOT), sysconfig.get_paths()["purelib"]]
    existing = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *([existing] if existing else [])])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sessionize job (blocks until it ends: bounded runs end, unbounded ones run until killed)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_args(argv)
    thread_mode_environment()
    env, t_env = create_table_env(
        JOB,
        settings,
        extra={
            "python.execution-mode": settings.python_execution_mode,
            "table.exec.source.idle-timeout": f"{settings.idle_timeout_s} s",
            "state.backend.type": settings.state_backend,
        },
    )
    statements = build(env, t_env, settings)
    log.info("submitting %s (group %s)", JOB, settings.group_id or f"clickpulse-{JOB}")
    result = statements.execute()
    if not submitted_detached(JOB, result, t_env):
        result.wait()
    return 0


if __name__ == "__main__":
    # run the imported module's main: the keyed function is then pickled by reference
    # (``jobs.sessionize.SessionizeFunction``), not by value together with ``__main__``'s globals
    from jobs.sessionize import main as module_main

    sys.exit(module_main())
