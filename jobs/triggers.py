"""Triggers job: ``events.enriched`` + rules -> per-user rule state -> ``actions`` -> signed webhooks.

Run it as ``python -m jobs.triggers [--rules FILE]`` or ``clickpulse run triggers``. By default the same
process also runs the dispatch loop (:mod:`jobs.dispatch`) that delivers the actions; ``--no-dispatch``
leaves that to a separate ``clickpulse run dispatch``.

Plan:

1. Kafka source ``enriched_events`` (SQL connector = Flink's ``KafkaSource``, ``read_committed``): key
   (user_key), value bytes, and a rowtime from the JSON ``event_time_ms``, extracted in the JVM, with
   per-partition watermarks ``event_time - out_of_orderness`` and source idleness. Optionally a JVM
   pre-filter on the event name (``CLICKPULSE_TRIGGERS_EVENT_FILTER``, off by default: rules can change at
   runtime, a filter cannot).
2. Kafka source ``rule_records`` over the compacted ``rules`` topic (key, value or NULL for a tombstone,
   partition, offset), broadcast to every subtask. It is idle almost always, so event time is the events'
   alone; its watermark is the epoch, so it can never advance event time: were it ahead (say "the end of
   time"), then whenever the events went idle the operator would follow the rules' watermark and fire
   every pending sequence deadline at once. After a rule record, timers wait until the rules source is
   idle again (``idle_timeout_ms``).
3. :class:`TriggerFunction`, a ``KeyedBroadcastProcessFunction`` keyed by user_key, in Python THREAD
   mode (embedded in the JVM by pemja): one ``ValueState`` per user (``udfs.rules.dump_state``,
   with a TTL), event-time timers from the pure reducer :func:`udfs.rules.step` /
   :func:`udfs.rules.on_timer`, and the rule records in broadcast state. The rules in force are the
   ``--rules`` file overlaid by the topic, "newest offset wins" (:mod:`udfs.rules.book`); the driver
   reads the topic once before submitting, so the first events already see today's rules.
4. Actions -> ``actions`` (key user_key, value the action JSON), at-least-once (no transactions: an
   action is readable as soon as it is written, not at the next checkpoint).

Delivery, latency tuning and the guarantees are in ``docs/adr/002-trigger-semantics.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field
from pyflink.common import Row, Types
from pyflink.datastream import KeyedBroadcastProcessFunction, RuntimeContext
from pyflink.datastream.state import MapStateDescriptor

from connectors.actions import read_rule_records
from connectors.flink import (
    REPO_ROOT,
    add_common_args,
    create_table,
    create_table_env,
    kafka_sink_options,
    kafka_source_options,
    setup_logging,
    submitted_detached,
)
from jobs.dispatch import DispatchSettings, add_dispatch_args, stop_on_signals
from udfs.rules import Rule, RuleError, RuleRecord, Rules, effective_rules, resolve_event_filter

log = logging.getLogger("clickpulse.triggers")

JOB = "triggers"
#: Operator ids and state names (**breaking** to change: savepoint state maps to them; see CHANGELOG.md).
UID_TRIGGERS = "triggers-evaluate"
USER_STATE_NAME = "triggers-user-state-v1"
RULES_STATE_NAME = "triggers-rule-records-v1"

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
#: What the SQL source hands to the keyed operator: user_key (the key) and the enriched event's bytes.
EVENT_TYPE = Types.ROW_NAMED(["k", "v"], [Types.STRING(), BYTES])
OUT_TYPE = Types.ROW_NAMED(["k", "v"], [Types.STRING(), BYTES])
# State values are the compact JSON text of dump_state / encode_rule_record, typed STRING: PyFlink 2.2's
# THREAD-mode state converter turns PRIMITIVE_ARRAY(BYTE) values into tuples of ints, and fails on the
# null of a key without state.
RULES_STATE = MapStateDescriptor(RULES_STATE_NAME, Types.STRING(), Types.STRING())
#: Bound of the per-subtask cache of registered (user, time) timers.
PENDING_TIMER_CACHE = 200_000


class TriggersSettings(DispatchSettings):
    """Settings of the triggers job: :class:`jobs.dispatch.DispatchSettings` (webhooks, rules file,
    allowlist, every :class:`connectors.flink.JobSettings` field) plus the ones below.

    ``group_id`` (``--group-id``) is the Flink source's consumer group (default ``clickpulse-triggers``).
    """

    dispatch: bool = Field(True, alias="CLICKPULSE_TRIGGERS_DISPATCH")
    """``CLICKPULSE_TRIGGERS_DISPATCH`` / ``--no-dispatch``: run the dispatch loop in this process
    (default true; turn off when ``clickpulse run dispatch`` runs separately, e.g. under ``flink run``)."""
    dispatch_group_id: str = Field("", alias="CLICKPULSE_DISPATCH_GROUP_ID")
    """``CLICKPULSE_DISPATCH_GROUP_ID``: consumer group of the in-process dispatch loop (default
    ``clickpulse-dispatch``, or ``<group-id>-dispatch`` when ``--group-id`` is given)."""
    out_of_orderness_ms: int = Field(2000, alias="CLICKPULSE_TRIGGERS_OUT_OF_ORDERNESS_MS")
    """``CLICKPULSE_TRIGGERS_OUT_OF_ORDERNESS_MS`` / ``--out-of-orderness-ms``: watermark delay behind the
    newest event time per partition; sequence rules fire this much after their deadline (default 2000)."""
    read_uncommitted: bool = Field(False, alias="CLICKPULSE_TRIGGERS_READ_UNCOMMITTED")
    """``CLICKPULSE_TRIGGERS_READ_UNCOMMITTED``: read ``events.enriched`` without waiting for the ingest
    job's transactions to commit (default false: ``read_committed``). Saves ingest's checkpoint interval on
    event → webhook latency; the price: after an ingest failure the aborted records were already
    evaluated, and a replay that enriches an event differently (e.g. a changed identity) can fire an
    action for a record that is never committed. Actions stay at-least-once with the same ids."""
    idle_timeout_ms: int = Field(2000, alias="CLICKPULSE_TRIGGERS_IDLE_TIMEOUT_MS")
    """``CLICKPULSE_TRIGGERS_IDLE_TIMEOUT_MS``: a source partition without records for this long stops
    holding the watermark back (default 2000)."""
    watermark_interval_ms: int = Field(200, alias="CLICKPULSE_TRIGGERS_WATERMARK_INTERVAL_MS")
    """``CLICKPULSE_TRIGGERS_WATERMARK_INTERVAL_MS``: how often watermarks are emitted (default 200)."""
    buffer_timeout_ms: int = Field(5, alias="CLICKPULSE_TRIGGERS_BUFFER_TIMEOUT_MS")
    """``CLICKPULSE_TRIGGERS_BUFFER_TIMEOUT_MS``: longest time a record waits in a network buffer between
    operators (Flink's default is 100; default 5)."""
    bundle_size: int = Field(100, alias="CLICKPULSE_TRIGGERS_BUNDLE_SIZE")
    """``CLICKPULSE_TRIGGERS_BUNDLE_SIZE``: Python bundle size, PROCESS mode only (default 100)."""
    bundle_time_ms: int = Field(5, alias="CLICKPULSE_TRIGGERS_BUNDLE_TIME_MS")
    """``CLICKPULSE_TRIGGERS_BUNDLE_TIME_MS``: Python bundle time, PROCESS mode only (default 5)."""
    state_backend: str = Field("rocksdb", alias="CLICKPULSE_TRIGGERS_STATE_BACKEND")
    """``CLICKPULSE_TRIGGERS_STATE_BACKEND``: ``rocksdb`` (default: state on local disk, incremental
    checkpoints) or ``hashmap`` (state on the JVM heap: faster per access, bounded by the heap)."""
    timer_service: str = Field("heap", alias="CLICKPULSE_TRIGGERS_TIMER_SERVICE")
    """``CLICKPULSE_TRIGGERS_TIMER_SERVICE``: where event-time timers live, ``heap`` (default: a timer
    registration is a hash-set insert; checkpointed with the keyed state, ~100 bytes per pending timer)
    or ``rocksdb`` (off-heap, for many millions of users with pending timers)."""
    python_execution_mode: str = Field("thread", alias="CLICKPULSE_PYTHON_EXECUTION_MODE")
    """``CLICKPULSE_PYTHON_EXECUTION_MODE``: ``thread`` (embedded in the JVM, default) or ``process``."""
    state_ttl_s: int = Field(100 * 86_400, alias="CLICKPULSE_TRIGGERS_STATE_TTL_S")
    """``CLICKPULSE_TRIGGERS_STATE_TTL_S``: a user's rule state is dropped this long after its last change
    (processing time); 0 disables. Keep it above the longest ``remember_for`` / cooldown / ``once`` horizon
    (default 8640000 = 100 days, above the default 90-day ``remember_for``)."""
    event_filter: str = Field("none", alias="CLICKPULSE_TRIGGERS_EVENT_FILTER")
    """``CLICKPULSE_TRIGGERS_EVENT_FILTER`` / ``--event-filter``: JVM pre-filter on the event name:
    ``none`` (default: every event reaches Python, rules may change freely), ``auto`` (the events the
    rules at submission use) or a comma-separated list. Rules loaded later that need other events are
    refused loudly (log + ``rules_outside_filter`` counter) and need a restart."""
    rules_snapshot_timeout_s: float = Field(30.0, alias="CLICKPULSE_TRIGGERS_RULES_SNAPSHOT_TIMEOUT_S")
    """``CLICKPULSE_TRIGGERS_RULES_SNAPSHOT_TIMEOUT_S``: how long the driver may take to read the rules
    topic before submitting (default 30)."""


# ------------------------------------------------------------------------------ process function


@dataclass(frozen=True)
class FunctionConfig:
    """What the keyed function needs (plain values, pickled into the job graph)."""

    file_rules: tuple[Rule, ...]
    snapshot: tuple[tuple[str, int, int, bytes | None], ...]
    allowlist: tuple[str, ...]
    event_filter: frozenset[str] | None
    state_ttl_ms: int
    log_interval_s: float

    def snapshot_records(self) -> dict[str, RuleRecord]:
        """The rule records the driver read before submitting."""
        return {rid: RuleRecord(p, o, v) for rid, p, o, v in self.snapshot}


COUNTERS = (
    "events",
    "skipped",
    "malformed",
    "evaluations",
    "fires",
    "suppressed",
    "timers_fired",
    "rule_updates",
    "rules_loaded",
    "rules_invalid",
    "rules_outside_filter",
)


#: Counters about the (broadcast) rules: the same on every subtask.
RULE_COUNTERS = frozenset({"rule_updates", "rules_loaded", "rules_invalid", "rules_outside_filter"})


class TriggerFunction(KeyedBroadcastProcessFunction):
    """Keyed by user_key: rule state in one ``ValueState`` (JSON text), rules broadcast, event-time timers.

    Counters (Flink metrics under ``clickpulse``, and a log line every ``log_interval_s`` per subtask):
    ``events`` read, ``skipped`` (no rule uses the event name: no state access), ``malformed``,
    ``evaluations`` (event x enabled rule), ``fires``, ``suppressed`` (a rule's condition held but its
    cooldown or ``once`` kept it from firing), ``timers_fired``, ``rule_updates``, ``rules_loaded``
    (current number, enabled or not), ``rules_invalid``, ``rules_outside_filter`` (the rule counters are
    reported by subtask 0 only, so sums over subtasks stay right).
    """

    def __init__(self, config: FunctionConfig) -> None:
        """Keep the config; state handles, rules and metrics are created in :meth:`open`."""
        self.config = config

    def open(self, runtime_context: RuntimeContext) -> None:
        """Create the state handle (with TTL), the initial rules and the counters."""
        from pyflink.common.time import Time
        from pyflink.datastream.state import StateTtlConfig, ValueStateDescriptor

        from udfs.rules import Allowlist, evaluate

        if not logging.getLogger().handlers:  # the embedded interpreter has no logging set up
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        c = self.config
        self.t = evaluate
        descriptor = ValueStateDescriptor(USER_STATE_NAME, Types.STRING())
        if c.state_ttl_ms > 0:
            descriptor.enable_time_to_live(
                StateTtlConfig.new_builder(Time.milliseconds(c.state_ttl_ms))
                .set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite)
                .set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired)
                .build()
            )
        self.state = runtime_context.get_state(descriptor)
        group = runtime_context.get_metrics_group().add_group("clickpulse")
        self.metrics = {name: group.counter(f"triggers_{name}") for name in COUNTERS}
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.flushed = dict.fromkeys(COUNTERS, 0)
        self.next_flush = 0.0
        self.pending_timers: dict[tuple[str, int], None] = {}
        self.subtask = _subtask_index(runtime_context)
        self.next_log = time.monotonic() + c.log_interval_s
        self.allowlist = Allowlist.parse(c.allowlist)
        self.records = c.snapshot_records()
        self.errors: dict[str, str] = {}
        self.refused: set[str] = set()
        self.rules = Rules()
        self.active: list[Rule] = []
        self.relevant: frozenset[str] | None = frozenset()
        self.restored = False
        self._refresh()

    # -- rules -------------------------------------------------------------------------------------

    def _refresh(self) -> None:
        from udfs.rules import effective_rules

        rules, errors = effective_rules(self.config.file_rules, self.records, self.allowlist)
        for rule_id, err in errors.items():
            if self.errors.get(rule_id) != err:
                log.error("rule %s refused: %s", rule_id, err)
                self._count("rules_invalid", 1)
        self.errors = errors
        event_filter = self.config.event_filter
        if event_filter is not None:
            kept = []
            for rule in rules:
                names = rule.event_names()
                if rule.enabled and (names is None or not names <= event_filter):
                    if rule.id not in self.refused:
                        log.error(
                            "rule %s uses events outside the job's pre-filter %s: not evaluated (restart "
                            "the job with a wider CLICKPULSE_TRIGGERS_EVENT_FILTER)",
                            rule.id,
                            sorted(event_filter),
                        )
                        self._count("rules_outside_filter", 1)
                        self.refused.add(rule.id)
                    continue
                kept.append(rule)
            rules = Rules.of(kept)
        self._count("rules_loaded", len(rules) - self.totals["rules_loaded"])
        self.rules = rules
        self.active = rules.active()
        self.relevant = rules.relevant_events()

    def _restore(self, broadcast_state: Any) -> None:
        """Once per subtask: merge records kept in broadcast state (restored from a checkpoint)."""
        from udfs.rules import decode_rule_record, newer

        self.restored = True
        changed = False
        for rule_id, data in broadcast_state.items():
            rec = decode_rule_record(data)
            if newer(rec, self.records.get(rule_id)):
                self.records[rule_id] = rec
                changed = True
        if changed:
            self._refresh()

    def process_broadcast_element(self, value: Row, ctx: Any) -> Iterator[Any]:
        """One ``rules`` topic record: keep it in broadcast state; apply it when newest for its id."""
        from udfs.rules import encode_rule_record, newer

        state = ctx.get_broadcast_state(RULES_STATE)
        if not self.restored:
            self._restore(state)
        rule_id, raw, partition, offset = value[0], value[1], value[2], value[3]
        rec = RuleRecord(int(partition), int(offset), bytes(raw) if raw is not None else None)
        current = self.records.get(rule_id)
        if current is not None and not newer(rec, current) and rec != current:
            return  # an older version, replayed from the start of the topic
        state.put(rule_id, encode_rule_record(rec))
        if rec != current:
            self.records[rule_id] = rec
            self._count("rule_updates", 1)
            self._refresh()
            if self.subtask == 0:
                log.info("rule %s %s", rule_id, "removed" if raw is None else "updated")
        yield from ()  # a generator, like the other callbacks: PyFlink iterates the result

    # -- events and timers -------------------------------------------------------------------------

    def process_element(self, value: bytes, ctx: Any) -> Iterator[Row]:
        """One enriched event (its JSON bytes) of the current user: evaluate the rules, store state,
        register timers, emit actions."""
        import orjson

        if not self.restored:
            self._restore(ctx.get_broadcast_state(RULES_STATE))
        totals = self.totals
        totals["events"] += 1
        try:
            record = orjson.loads(value)
            if self.relevant is not None and record.get("event") not in self.relevant:
                totals["skipped"] += 1  # no rule can use it: no state access at all
                return
            event = self.t.Event.from_record(record)
        except (orjson.JSONDecodeError, self.t.EventError, AttributeError, TypeError) as exc:
            log.warning("malformed enriched event: %s", exc)
            totals["malformed"] += 1
            return
        raw = self.state.value() or ""
        state = self.t.load_state(raw.encode() if raw else None)
        held: list[str] = []
        new, fires, timers = self.t.step(state, event, self.rules, int(time.time() * 1000), suppressed=held)
        totals["evaluations"] += len(self.active)
        totals["suppressed"] += len(held)
        yield from self._apply(event.user_key, raw, new, fires, timers, ctx)

    def on_timer(self, timestamp: int, ctx: Any) -> Iterator[Row]:
        """The watermark passed a deadline or clean-up time of this user."""
        if not self.restored:
            self._restore(ctx.get_broadcast_state(RULES_STATE))
        raw = self.state.value() or ""
        self.totals["timers_fired"] += 1
        if not raw:
            self._flush_counters()
            return
        state = self.t.load_state(raw.encode())
        self.pending_timers.pop((state.user_key, timestamp), None)
        held: list[str] = []
        new, fires, timers = self.t.on_timer(
            state, self.t.Timer(at_ms=timestamp), self.rules, int(time.time() * 1000), suppressed=held
        )
        self.totals["suppressed"] += len(held)
        yield from self._apply(state.user_key, raw, new, fires, timers, ctx)

    def _apply(
        self, user_key: str, raw: Any, new: Any, fires: list[Any], timers: list[Any], ctx: Any
    ) -> Iterator[Row]:
        import orjson

        data = self.t.dump_state(new).decode()
        if data != raw:
            if data:
                self.state.update(data)
            else:
                self.state.clear()

        if timers:
            # Busy users ask for the same (minute-rounded) clean-up timer on every event; Flink would
            # deduplicate it, but each call crosses into the JVM. Entries leave this cache when their
            # timer fires, so a timer known here is always still pending.
            pending = self.pending_timers
            service = None
            for timer in timers:
                if (user_key, timer.at_ms) not in pending:
                    if service is None:
                        service = ctx.timer_service()
                    service.register_event_time_timer(timer.at_ms)
                    if len(pending) >= PENDING_TIMER_CACHE:
                        pending.clear()
                    pending[(user_key, timer.at_ms)] = None
        if fires:
            self.totals["fires"] += len(fires)
        for fire in fires:
            yield Row(fire.user_key, orjson.dumps(fire.to_action()))
        self._flush_counters()

    def _count(self, name: str, n: int) -> None:
        self.totals[name] += n
        self._flush_counters()

    def _flush_counters(self) -> None:
        """Push counter deltas to Flink (each call crosses into the JVM: at most every 500 ms) and log."""
        now = time.monotonic()
        if now < self.next_flush:
            return
        self.next_flush = now + 0.5
        for name, total in self.totals.items():
            if self.subtask and name in RULE_COUNTERS:
                continue  # every subtask sees the same rules: subtask 0 alone reports them
            delta = total - self.flushed[name]
            if delta:
                self.metrics[name].inc(delta)
                self.flushed[name] = total
        if now >= self.next_log:
            self.next_log = now + self.config.log_interval_s
            log.info("triggers[%d]: %s", self.subtask, " ".join(f"{k}={v}" for k, v in self.totals.items()))


def _subtask_index(runtime_context: RuntimeContext) -> int:
    """This subtask's index. PyFlink 2.2's THREAD-mode context calls a Java method Flink 2 removed, so
    fall back to the Java ``TaskInfo`` (only used to label log lines)."""
    try:
        return int(runtime_context.get_index_of_this_subtask())
    except Exception:  # noqa: BLE001 - pemja raises its own exception types
        try:
            java_context = runtime_context._runtime_context  # noqa: SLF001
            return int(java_context.getTaskInfo().getIndexOfThisSubtask())
        except Exception:  # noqa: BLE001
            return 0


# ---------------------------------------------------------------------------------------- wiring


def key_by_first_field(t_env: Any, table: Any, row_type: Any) -> Any:
    """A ``KeyedStream`` of ``table`` = ``(key STRING, payload)``, keyed in the JVM; the keyed Python
    function gets ``payload``.

    ``DataStream.key_by`` runs a Python operator before the shuffle only to compute the key, which here
    is already a column: a second Python call per event, for nothing. This applies the Java
    ``KeyByKeySelector`` PyFlink uses behind that operator straight to the SQL stream (typed as the
    plain ``RowTypeInfo`` PyFlink's keyed operators read). Same trick as ``jobs/sessionize.py``.
    """
    from pyflink.datastream.data_stream import KeyedStream
    from pyflink.java_gateway import get_gateway

    typed = t_env.to_append_stream(table, row_type)
    key_type = Types.ROW([row_type.get_field_types()[0]]).get_java_type_info()
    j_keyed = typed._j_data_stream.keyBy(get_gateway().jvm.KeyByKeySelector(), key_type)
    return KeyedStream(j_keyed, row_type.get_field_types()[1], typed)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _seconds(ms: int) -> str:
    return f"INTERVAL '{ms / 1000:.3f}' SECOND"


def event_filter_sql(names: frozenset[str] | None) -> str:
    """The ``WHERE`` clause of the JVM pre-filter (empty when there is no filter)."""
    if names is None:
        return ""
    if not names:
        return " WHERE FALSE"
    listed = ", ".join(_quote(n) for n in sorted(names))
    return f" WHERE JSON_VALUE(CAST(v AS STRING), '$.event') IN ({listed})"


def flink_options(s: TriggersSettings) -> dict[str, str]:
    """Latency-oriented Flink options of this job (on top of :func:`connectors.flink.flink_config`)."""
    return {
        "python.execution-mode": s.python_execution_mode,
        "python.fn-execution.bundle.size": str(s.bundle_size),
        "python.fn-execution.bundle.time": str(s.bundle_time_ms),
        "execution.buffer-timeout.interval": f"{s.buffer_timeout_ms} ms",
        "pipeline.auto-watermark-interval": f"{s.watermark_interval_ms} ms",
        "table.exec.source.idle-timeout": f"{s.idle_timeout_ms} ms",
        "state.backend.type": s.state_backend,
        "state.backend.rocksdb.timer-service.factory": s.timer_service.upper(),
    }


def build(t_env: Any, s: TriggersSettings, config: FunctionConfig) -> Any:
    """Declare sources, the keyed trigger operator and the actions sink; return the statement set."""
    group_id = s.group_id or f"clickpulse-{JOB}"
    low_latency_fetch = {"properties.fetch.min.bytes": "1", "properties.fetch.max.wait.ms": "100"}
    create_table(
        t_env,
        "enriched_events",
        f"""  k STRING,
  v BYTES,
  kafka_ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL,
  event_time AS COALESCE(
    TO_TIMESTAMP_LTZ(CAST(JSON_VALUE(CAST(v AS STRING), '$.event_time_ms') AS BIGINT), 3), kafka_ts),
  WATERMARK FOR event_time AS event_time - {_seconds(s.out_of_orderness_ms)}""",
        {
            **kafka_source_options(s, s.topic("events.enriched"), group_id, key_fields="k"),
            **low_latency_fetch,
            **({"properties.isolation.level": "read_uncommitted"} if s.read_uncommitted else {}),
        },
    )
    create_table(
        t_env,
        "rule_records",
        """  k STRING,
  v BYTES,
  `partition` INT METADATA VIRTUAL,
  `offset` BIGINT METADATA VIRTUAL,
  epoch AS TO_TIMESTAMP_LTZ(0, 3),
  WATERMARK FOR epoch AS epoch""",
        {
            **kafka_source_options(s, s.topic("rules"), f"{group_id}-rules", key_fields="k"),
            # the whole compacted topic every time: replayed records are older than the driver's
            # snapshot or the broadcast state and change nothing ("newest offset wins")
            "scan.startup.mode": "earliest-offset",
            **low_latency_fetch,
        },
    )
    create_table(
        t_env,
        "actions_sink",
        "  k STRING,\n  v BYTES",
        {
            **kafka_sink_options(s, s.topic("actions"), f"{group_id}-actions", exactly_once=False),
            "properties.linger.ms": "0",
        },
    )
    events = t_env.sql_query(
        "SELECT COALESCE(k, JSON_VALUE(CAST(v AS STRING), '$.user_key'), '') AS k, v FROM enriched_events"
        + event_filter_sql(config.event_filter)
    )
    rule_records = t_env.sql_query("SELECT k, v, `partition`, `offset` FROM rule_records WHERE k IS NOT NULL")
    keyed = key_by_first_field(t_env, events, EVENT_TYPE)
    broadcast = t_env.to_data_stream(rule_records).broadcast(RULES_STATE)
    actions = (
        keyed.connect(broadcast)
        .process(TriggerFunction(config), output_type=OUT_TYPE)
        .uid(UID_TRIGGERS)
        .name("triggers")
    )
    t_env.create_temporary_view("action_records", t_env.from_data_stream(actions))
    statements = t_env.create_statement_set()
    statements.add_insert_sql("INSERT INTO actions_sink SELECT k, v FROM action_records")
    return statements


def parse_args(argv: Sequence[str] | None) -> TriggersSettings:
    """Settings from the environment (and ``.clickpulse/stack.env``) overridden by the command line."""
    from connectors.settings import by_alias, home_dir

    p = argparse.ArgumentParser(prog="jobs.triggers", description=__doc__.splitlines()[0])
    add_common_args(p)
    add_dispatch_args(p)
    p.add_argument(
        "--no-dispatch",
        dest="dispatch",
        action="store_const",
        const=False,
        default=None,
        help="do not deliver webhooks from this process (run `clickpulse run dispatch` instead)",
    )
    p.add_argument("--out-of-orderness-ms", type=int, default=None, help="watermark delay (default 2000)")
    p.add_argument(
        "--event-filter", default=None, help="none (default), auto, or event names, comma-separated"
    )
    args = p.parse_args(list(argv) if argv is not None else None)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    env_file = home_dir() / "stack.env"
    return TriggersSettings(
        _env_file=env_file if env_file.is_file() else None, **by_alias(TriggersSettings, overrides)
    )


def embedded_python_path() -> None:
    """Let the JVM-embedded interpreter (THREAD mode, pemja) import this repo and this venv's packages.

    PyFlink starts the JVM from this process, so it inherits ``PYTHONPATH``; the embedded interpreter
    builds its ``sys.path`` from it.
    """
    paths = [str(REPO_ROOT), sysconfig.get_paths()["purelib"]]
    existing = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *([existing] if existing else [])])


def _warn_missing_secrets(rules: Rules, s: TriggersSettings, environ: Mapping[str, str]) -> None:
    from udfs.rules import destination_for

    for rule in rules.active():
        try:
            destination_for(rule, environ, default_secret_env=s.webhook_secret_env)
        except RuleError as exc:
            log.warning("%s: its actions will go to %s", exc, s.topic("actions.dlq"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the triggers job (and, unless ``--no-dispatch``, the dispatch loop) until stopped.

    Unbounded runs end on SIGTERM/SIGINT; with ``--bounded`` the job ends at the input's end offsets
    (every pending sequence deadline fires then: the end of input is the end of event time) and the
    dispatch loop stops once those actions are settled.
    """
    from connectors.actions import ActionDispatch
    from connectors.flink_metrics import CounterLogger

    setup_logging()
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = parse_args(argv)
    allowlist = settings.allowlist()
    try:
        file_rules = settings.file_rules()
    except (RuleError, OSError) as exc:
        log.error("rules file: %s", exc)
        return 2
    snapshot = read_rule_records(
        settings.kafka_bootstrap_servers, settings.topic("rules"), timeout_s=settings.rules_snapshot_timeout_s
    )
    rules, errors = effective_rules(file_rules, snapshot, allowlist)
    for rule_id, err in errors.items():
        log.error("rule %s from the rules topic refused: %s", rule_id, err)
    log.info("rules at start: %s", ", ".join(r.id for r in rules) or "(none)")
    event_filter = resolve_event_filter(settings.event_filter, rules)
    if event_filter is not None:
        log.info("JVM pre-filter on event names: %s", ", ".join(sorted(event_filter)))
    if settings.dispatch:
        _warn_missing_secrets(rules, settings, os.environ)
    config = FunctionConfig(
        file_rules=tuple(file_rules),
        snapshot=tuple((rid, r.partition, r.offset, r.value) for rid, r in snapshot.items()),
        allowlist=tuple(settings.webhook_allowlist.split(",")),
        event_filter=event_filter,
        state_ttl_ms=settings.state_ttl_s * 1000,
        log_interval_s=settings.log_interval_s,
    )
    if settings.python_execution_mode == "thread":
        embedded_python_path()
    _, t_env = create_table_env(JOB, settings, extra=flink_options(settings))
    statements = build(t_env, settings, config)

    stop = threading.Event()
    stop_on_signals(stop)
    group_id = settings.group_id or f"clickpulse-{JOB}"
    log.info("submitting %s (group %s)", JOB, group_id)
    result = statements.execute()
    if submitted_detached(JOB, result, t_env):  # `flink run --detached`: the job runs on without us
        if settings.dispatch:
            log.warning("detached submission: deliver webhooks with `clickpulse run dispatch`")
        return 0
    job_done = threading.Event()
    failure: list[BaseException] = []

    def wait_job() -> None:
        try:
            result.wait()
        except Exception as exc:  # noqa: BLE001 - reported by main()
            failure.append(exc)
        finally:
            job_done.set()

    threading.Thread(target=wait_job, name="triggers-job", daemon=True).start()
    rest = settings.flink_rest_url
    if not rest and "PYFLINK_GATEWAY_PORT" not in os.environ:
        rest = f"http://127.0.0.1:{t_env.get_config().get('rest.port', '')}"
    counters = CounterLogger(JOB, rest, settings.log_interval_s) if rest else None
    if counters is not None:
        log.info("Flink REST API (metrics, job status) at %s", rest)
        counters.start()
    dispatcher: threading.Thread | None = None
    drain = threading.Event()
    if settings.dispatch:
        dispatch_group = settings.dispatch_group_id or (
            f"{settings.group_id}-dispatch" if settings.group_id else "clickpulse-dispatch"
        )
        dispatch = ActionDispatch(settings.dispatch_config(dispatch_group), file_rules, os.environ)
        dispatcher = threading.Thread(target=dispatch.run, args=(stop, drain), name="dispatch", daemon=True)
        dispatcher.start()
    while not stop.is_set() and not job_done.is_set():
        stop.wait(0.5)
    if job_done.is_set() and not failure and settings.bounded:
        drain.set()  # let the dispatch loop settle what the bounded run produced, then stop
    elif not job_done.is_set():
        log.info("cancelling the Flink job")
        try:
            result.get_job_client().cancel().result(30)
        except Exception as exc:  # noqa: BLE001 - the JVM may already be gone (SIGTERM to the group)
            log.debug("cancel: %s", exc)
        stop.set()
    else:
        stop.set()
    if dispatcher is not None:
        dispatcher.join(timeout=settings.dispatch_shutdown_s + 30)
    if counters is not None:
        counters.stop()
    if failure:
        log.error("triggers job failed: %s", failure[0])
        return 1
    return 0


if __name__ == "__main__":
    # Run the importable module rather than ``__main__``, so that Flink pickles TriggerFunction by
    # reference (module globals such as the state descriptors hold JVM handles and cannot be pickled).
    from jobs import triggers

    sys.exit(triggers.main())
