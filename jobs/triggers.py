"""Triggers job: ``events.enriched`` + rules -> per-user rule state -> ``actions`` -> signed webhooks.

Run it as ``python -m jobs.triggers [--rules FILE]`` or ``clickpulse run triggers``. By default the same
process also runs the dispatch loop (:mod:`jobs.dispatch`) that delivers the actions; ``--no-dispatch``
leaves that to a separate ``clickpulse run dispatch``.

Plan:

1. Kafka source ``enriched_events`` (SQL connector = Flink's ``KafkaSource``, ``read_committed``): key
   (user_key), value bytes, and a rowtime from the JSON ``event_time_ms``, extracted in the JVM, with
   per-partition watermarks ``event_time - out_of_orderness`` (the event time capped at its Kafka record
   time + ``CLICKPULSE_FLINK_WATERMARK_MAX_LEAD_MS``, so future-dated events cannot fire sequence
   deadlines early) and source idleness. Optionally a JVM pre-filter on the event name
   (``CLICKPULSE_TRIGGERS_EVENT_FILTER``, off by default: rules can change at runtime, a filter cannot).
2. Kafka source ``rule_records`` over the compacted ``rules`` topic (key, value or NULL for a tombstone,
   partition, offset), broadcast to every subtask. It is idle almost always, so event time is the events'
   alone; its watermark is the epoch, so it can never advance event time: were it ahead (say "the end of
   time"), then whenever the events went idle the operator would follow the rules' watermark and fire
   every pending sequence deadline at once. After a rule record, timers wait until the rules source is
   idle again (``idle_timeout_ms``).
3. A ``KeyedBroadcastProcessFunction`` keyed by user_key, picked by ``--engine``
   (``CLICKPULSE_TRIGGERS_ENGINE``): with ``jvm`` (default) the Java one of ``connectors/jvm``
   (:func:`build_jvm`: the same logic as :mod:`udfs.rules`, each event parsed once in the JVM, no Python
   on the event path; rule records are validated and compiled by :func:`udfs.rules.compile_rule_record`
   in a Python UDF on the rarely written rules stream, so rule parsing has one implementation); with
   ``python`` :class:`TriggerFunction`, in Python THREAD mode (embedded in the JVM by pemja). Either
   keeps one state value per user (with a TTL), event-time timers from the pure reducer
   :func:`udfs.rules.step` / :func:`udfs.rules.on_timer` (or its Java transcription), and the rule
   records in broadcast state. The rules in force are the ``--rules`` file overlaid by the topic,
   "newest offset wins" (:mod:`udfs.rules.book`); the driver reads the topic once before submitting, so
   the first events already see today's rules. The engines' states differ and have their own uids and
   state names: switching engines starts the per-user rule state afresh (windows, pending sequences,
   cooldowns and ``once`` marks; the rules themselves come back from the topic), see
   ``docs/adr/002-trigger-semantics.md``.
4. Actions -> ``actions`` (key user_key, value the action JSON), at-least-once (no transactions: an
   action is readable as soon as it is written, not at the next checkpoint).

Delivery, latency tuning and the guarantees are in ``docs/adr/002-trigger-semantics.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from pydantic import Field
from pyflink.common import Row, Types
from pyflink.datastream import KeyedBroadcastProcessFunction, RuntimeContext
from pyflink.datastream.state import MapStateDescriptor
from pyflink.table import DataTypes
from pyflink.table.udf import ScalarFunction, udf

from connectors.actions import read_rule_records
from connectors.dispatch import DispatchSettings, add_dispatch_args
from connectors.flink import (
    ENRICHED_USER_KEY_SQL,
    FlinkSettings,
    OperatorCounters,
    create_enriched_source,
    create_table,
    create_table_env,
    job_options,
    kafka_sink_options,
    kafka_source_options,
    key_by_first_field,
    python_operator_options,
    run_job,
    sql_string,
    string_value_state,
)
from connectors.runtime import CliError, exit_status, setup_logging, stop_on_signals
from connectors.settings import (
    Connections,
    ConsumerSettings,
    Settings,
    compose,
    declared_variables,
    environment,
)
from udfs.rules import (
    Allowlist,
    Rule,
    RuleError,
    RuleRecord,
    Rules,
    compile_rule_record,
    decode_rule_record,
    effective_rules,
    encode_rule_record,
    newer,
    resolve_event_filter,
)

log = logging.getLogger("clickpulse.triggers")

JOB = "triggers"
#: Operator ids and state names (**breaking** to change: savepoint state maps to them; see CHANGELOG.md).
#: The two engines keep incompatible states, so each has its own uid and state names: switching engines
#: starts the per-user rule state afresh (the restored checkpoint's state of the other engine is left
#: unclaimed, so a restore needs ``--restore none`` or Flink's
#: ``execution.state-recovery.ignore-unclaimed-state``).
UID_TRIGGERS = "triggers-evaluate"
USER_STATE_NAME = "triggers-user-state-v1"
RULES_STATE_NAME = "triggers-rule-records-v1"
UID_TRIGGERS_JVM = "triggers-evaluate-jvm"
USER_STATE_NAME_JVM = "triggers-user-state-jvm-v1"
RULES_STATE_NAME_JVM = "triggers-rule-records-jvm-v1"
#: The JVM operator's entry point (``connectors/jvm``, built by ``make jars``).
JVM_OPERATOR = "dev.clickpulse.operators.triggers.TriggersOperator"
#: The SQL name of :class:`CompileRuleRecord` (engine ``jvm``).
COMPILE_RULE_RECORD_FUNCTION = "triggers_compile_rule_record"

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
#: What the keyed operator emits: user_key and the action's JSON bytes.
OUT_TYPE = Types.ROW_NAMED(["k", "v"], [Types.STRING(), BYTES])
# Broadcast state values are the compact JSON text of encode_rule_record, typed STRING (see
# connectors.flink.string_value_state for why).
RULES_STATE = MapStateDescriptor(RULES_STATE_NAME, Types.STRING(), Types.STRING())
#: Bound of the per-subtask cache of registered (user, time) timers.
PENDING_TIMER_CACHE = 200_000


class TriggersEngine(StrEnum):
    """Which implementation of the trigger operator runs (the same actions from the same input)."""

    JVM = "jvm"  # Java KeyedBroadcastProcessFunction (connectors/jvm), no Python on the event path
    PYTHON = "python"  # THREAD-mode Python function over udfs/rules (the specification)


class TriggersSettings(Settings):
    """Options of rule evaluation (webhook delivery is :class:`connectors.dispatch.DispatchSettings`).

    The Flink source's consumer group is ``--group-id`` (default ``clickpulse-triggers``).
    """

    engine: TriggersEngine = Field(TriggersEngine.JVM, alias="CLICKPULSE_TRIGGERS_ENGINE")
    """``CLICKPULSE_TRIGGERS_ENGINE`` / ``--engine``: ``jvm`` (default: the Java operator of
    ``connectors/jvm``, the same rule evaluation as ``udfs/rules`` without Python on the event path; rule
    records are still validated in Python) or ``python`` (``udfs/rules`` in a Python operator). Their
    states differ: a checkpoint of one does not restore into the other, switching starts the per-user
    rule state afresh (``docs/adr/002-trigger-semantics.md``). In ``pipeline``, ``--engine`` sets this
    and ``CLICKPULSE_SESSIONIZE_ENGINE``."""
    dispatch: bool = Field(True, alias="CLICKPULSE_TRIGGERS_DISPATCH")
    """``CLICKPULSE_TRIGGERS_DISPATCH`` / ``--no-dispatch``: run the dispatch loop in this process
    (default true; turn off when ``clickpulse run dispatch`` runs separately, e.g. under ``flink run``)."""
    dispatch_group_id: str = Field("", alias="CLICKPULSE_DISPATCH_GROUP_ID")
    """``CLICKPULSE_DISPATCH_GROUP_ID``: consumer group of the in-process dispatch loop (default
    ``clickpulse-dispatch``, or ``<group-id>-dispatch`` when ``--group-id`` is given)."""
    out_of_orderness_ms: int = Field(2000, alias="CLICKPULSE_TRIGGERS_OUT_OF_ORDERNESS_MS", ge=0)
    """``CLICKPULSE_TRIGGERS_OUT_OF_ORDERNESS_MS`` / ``--out-of-orderness-ms``: watermark delay behind the
    newest event time per partition; sequence rules fire this much after their deadline (default 2000)."""
    read_uncommitted: bool = Field(False, alias="CLICKPULSE_TRIGGERS_READ_UNCOMMITTED")
    """``CLICKPULSE_TRIGGERS_READ_UNCOMMITTED``: read ``events.enriched`` without waiting for the ingest
    job's transactions to commit (default false: ``read_committed``). Saves ingest's checkpoint interval on
    event → webhook latency; the price: after an ingest failure the aborted records were already
    evaluated, and a replay that enriches an event differently (e.g. a changed identity) can fire an
    action for a record that is never committed. Actions stay at-least-once with the same ids."""
    idle_timeout_ms: int = Field(2000, alias="CLICKPULSE_TRIGGERS_IDLE_TIMEOUT_MS", gt=0)
    """``CLICKPULSE_TRIGGERS_IDLE_TIMEOUT_MS``: a source partition without records for this long stops
    holding the watermark back (default 2000). Off in a bounded run (``--bounded``), where every partition
    ends."""
    watermark_interval_ms: int = Field(200, alias="CLICKPULSE_TRIGGERS_WATERMARK_INTERVAL_MS", gt=0)
    """``CLICKPULSE_TRIGGERS_WATERMARK_INTERVAL_MS``: how often watermarks are emitted (default 200)."""
    buffer_timeout_ms: int = Field(5, alias="CLICKPULSE_TRIGGERS_BUFFER_TIMEOUT_MS", ge=0)
    """``CLICKPULSE_TRIGGERS_BUFFER_TIMEOUT_MS``: longest time a record waits in a network buffer between
    operators (Flink's default is 100; default 5)."""
    bundle_size: int = Field(100, alias="CLICKPULSE_TRIGGERS_BUNDLE_SIZE", gt=0)
    """``CLICKPULSE_TRIGGERS_BUNDLE_SIZE``: Python bundle size, PROCESS mode only (default 100)."""
    bundle_time_ms: int = Field(10, alias="CLICKPULSE_TRIGGERS_BUNDLE_TIME_MS", gt=0)
    """``CLICKPULSE_TRIGGERS_BUNDLE_TIME_MS``: Python bundle time, PROCESS mode only (default 10). In
    ``pipeline`` it is also the bundle time of the ingest stage (a PROCESS-mode pandas UDF on the event
    path), where it trades latency for CPU: at 1,000 events/s, 5 ms gave webhook p50 44 / p99 202 ms, 10 ms
    p50 43-45 / p99 123-178 ms, 20 ms p50 50-55 / p99 144-146 ms (and 761, 745-755, 638-659 pipeline CPU
    µs per event; bench/RESULTS.md)."""
    state_backend: str = Field("rocksdb", alias="CLICKPULSE_TRIGGERS_STATE_BACKEND")
    """``CLICKPULSE_TRIGGERS_STATE_BACKEND``: ``rocksdb`` (default: state on local disk, incremental
    checkpoints) or ``hashmap`` (state on the JVM heap: faster per access, bounded by the heap)."""
    timer_service: str = Field("heap", alias="CLICKPULSE_TRIGGERS_TIMER_SERVICE")
    """``CLICKPULSE_TRIGGERS_TIMER_SERVICE``: where event-time timers live, ``heap`` (default: a timer
    registration is a hash-set insert; checkpointed in full with the keyed state, ~100 bytes per timer)
    or ``rocksdb`` (off-heap, for many millions of users with pending timers). The ``jvm`` engine
    registers one timer per user (the times it waits for are kept in the user's state); ``python``
    one per user and pending time."""
    state_ttl_ms: int = Field(100 * 86_400_000, alias="CLICKPULSE_TRIGGERS_STATE_TTL_MS", ge=0)
    """``CLICKPULSE_TRIGGERS_STATE_TTL_MS``: a user's rule state is dropped this long after its last change
    (processing time); 0 disables. Keep it above the longest ``remember_for`` / cooldown / ``once`` horizon
    (default 8640000000 = 100 days, above the default 90-day ``remember_for``)."""
    event_filter: str = Field("none", alias="CLICKPULSE_TRIGGERS_EVENT_FILTER")
    """``CLICKPULSE_TRIGGERS_EVENT_FILTER`` / ``--event-filter``: JVM pre-filter on the event name:
    ``none`` (default: every event reaches Python, rules may change freely), ``auto`` (the events the
    rules at submission use) or a comma-separated list. Rules loaded later that need other events are
    refused loudly (log + ``rules_outside_filter`` counter) and need a restart."""
    rules_snapshot_timeout_ms: int = Field(
        30_000, alias="CLICKPULSE_TRIGGERS_RULES_SNAPSHOT_TIMEOUT_MS", gt=0
    )
    """``CLICKPULSE_TRIGGERS_RULES_SNAPSHOT_TIMEOUT_MS``: how long the driver may take to read the rules
    topic before submitting (default 30000)."""


def add_triggers_args(p: argparse.ArgumentParser) -> None:
    """The triggers job's own command-line options (plus the dispatch ones)."""
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
        "--engine", choices=[e.value for e in TriggersEngine], default=None, help="trigger operator (jvm)"
    )
    p.add_argument(
        "--event-filter", default=None, help="none (default), auto, or event names, comma-separated"
    )


@dataclass(frozen=True)
class TriggersJobSettings:
    """Everything the triggers job reads: the areas it is composed of."""

    connections: Connections
    consumer: ConsumerSettings
    flink: FlinkSettings
    triggers: TriggersSettings
    dispatch: DispatchSettings

    def dispatch_group(self) -> str:
        """Consumer group of the in-process dispatch loop."""
        if self.triggers.dispatch_group_id:
            return self.triggers.dispatch_group_id
        return f"{self.consumer.group_id}-dispatch" if self.consumer.group_id else "clickpulse-dispatch"


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
    engine: TriggersEngine

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
    """Engine ``python``, keyed by user_key: rule state in one ``ValueState`` (JSON text), rules
    broadcast, event-time timers.

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
        from udfs.rules import Allowlist, evaluate

        if not logging.getLogger().handlers:  # the embedded interpreter has no logging set up
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        c = self.config
        self.t = evaluate
        self.state = runtime_context.get_state(string_value_state(USER_STATE_NAME, c.state_ttl_ms))
        self.counters = OperatorCounters(
            runtime_context,
            "triggers",
            COUNTERS,
            label=JOB,
            log_interval_s=c.log_interval_s,
            flush_s=0.5,
            shared=RULE_COUNTERS,
        )
        self.totals = self.counters.totals
        self.subtask = self.counters.subtask
        self.pending_timers: dict[tuple[str, int], None] = {}
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
        # the timer is gone from Flink whatever the state: forget it here too, or a later request for the
        # same (user, time) would be taken for a pending timer and never registered
        self.pending_timers.pop((ctx.get_current_key(), timestamp), None)
        if not raw:
            self.counters.maybe_flush()
            return
        state = self.t.load_state(raw.encode())
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
            key = ctx.get_current_key()  # what Flink keys its timers by (the user_key column)
            service = None
            for timer in timers:
                if (key, timer.at_ms) not in pending:
                    if service is None:
                        service = ctx.timer_service()
                    service.register_event_time_timer(timer.at_ms)
                    if len(pending) >= PENDING_TIMER_CACHE:
                        pending.clear()
                    pending[(key, timer.at_ms)] = None
        if fires:
            self.totals["fires"] += len(fires)
        for fire in fires:
            yield Row(fire.user_key, orjson.dumps(fire.to_action()))
        self.counters.maybe_flush()

    def _count(self, name: str, n: int) -> None:
        self.totals[name] += n
        self.counters.maybe_flush()


# ---------------------------------------------------------------------------------------- wiring


def event_filter_sql(names: frozenset[str] | None) -> str:
    """The ``WHERE`` clause of the JVM pre-filter (empty when there is no filter)."""
    if names is None:
        return ""
    if not names:
        return " WHERE FALSE"
    listed = ", ".join(sql_string(n) for n in sorted(names))
    return f" WHERE JSON_VALUE(CAST(v AS STRING), '$.event') IN ({listed})"


def flink_options(s: TriggersJobSettings) -> dict[str, str]:
    """Latency-oriented Flink options of this job (on top of :func:`connectors.flink.flink_config`)."""
    t = s.triggers
    return {
        **python_operator_options(s.flink),
        "python.fn-execution.bundle.size": str(t.bundle_size),
        "python.fn-execution.bundle.time": str(t.bundle_time_ms),
        "execution.buffer-timeout.interval": f"{t.buffer_timeout_ms} ms",
        "pipeline.auto-watermark-interval": f"{t.watermark_interval_ms} ms",
        "table.exec.source.idle-timeout": f"{t.idle_timeout_ms} ms",
        "state.backend.type": t.state_backend,
        "state.backend.rocksdb.timer-service.factory": t.timer_service.upper(),
    }


#: Kafka fetch settings of the triggers sources: hand records over at once instead of batching.
LOW_LATENCY_FETCH = {"properties.fetch.min.bytes": "1", "properties.fetch.max.wait.ms": "100"}


def create_sources(t_env: Any, s: TriggersJobSettings, job: str = JOB) -> None:
    """The ``enriched_events`` and ``rule_records`` source tables of the triggers job."""
    create_enriched_source(
        t_env,
        s.connections,
        s.consumer,
        s.consumer.group(job),
        s.triggers.out_of_orderness_ms,
        s.flink.watermark_max_lead_ms,
        extra={
            **LOW_LATENCY_FETCH,
            **({"properties.isolation.level": "read_uncommitted"} if s.triggers.read_uncommitted else {}),
        },
    )
    create_rules_source(t_env, s, job)


def create_rules_source(t_env: Any, s: TriggersJobSettings, job: str = JOB) -> Any:
    """The ``rule_records`` source table over the compacted ``rules`` topic (returned)."""
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
            **kafka_source_options(
                s.connections,
                s.consumer,
                s.connections.topic("rules"),
                f"{s.consumer.group(job)}-rules",
                key_fields="k",
            ),
            # the whole compacted topic every time: replayed records are older than the driver's
            # snapshot or the broadcast state and change nothing ("newest offset wins")
            "scan.startup.mode": "earliest-offset",
            # its own idle timeout: in the pipeline the job-wide one is the sessions' (a minute), and
            # until this rarely written source counts as idle it holds event time at the epoch (none
            # in a bounded run, see connectors.flink.BOUNDED_OPTIONS)
            **(
                {}
                if s.consumer.bounded
                else {"scan.watermark.idle-timeout": f"{s.triggers.idle_timeout_ms} ms"}
            ),
            **LOW_LATENCY_FETCH,
        },
    )
    return t_env.from_path("rule_records")


def create_actions_sink(t_env: Any, s: TriggersJobSettings, job: str = JOB) -> None:
    """The ``actions_sink`` table: at-least-once, no linger (an action is readable as soon as written)."""
    create_table(
        t_env,
        "actions_sink",
        "  k STRING,\n  v BYTES",
        {
            **kafka_sink_options(
                s.connections,
                s.flink,
                s.connections.topic("actions"),
                f"{s.consumer.group(job)}-actions",
                exactly_once=False,
            ),
            "properties.linger.ms": "0",
        },
    )


def build(t_env: Any, events: Any, rule_records: Any, config: FunctionConfig) -> Any:
    """The triggers part of the graph: ``events`` (``k`` user_key, ``v`` the enriched event's JSON, with
    an event-time attribute ``event_time`` and watermarks) and ``rule_records`` (``k`` rule id, ``v`` rule
    JSON or NULL, ``partition``, ``offset``) -> actions, a ``(k STRING, v BYTES)`` table keyed by user_key.
    ``config.engine`` picks the operator; the event pre-filter (``config.event_filter``) is SQL before
    either."""
    t_env.create_temporary_view("triggers_events", events)
    t_env.create_temporary_view("triggers_rule_records", rule_records)
    if config.engine is TriggersEngine.JVM:
        return build_jvm(t_env, config)
    keyed_rows = t_env.sql_query(
        f"SELECT {ENRICHED_USER_KEY_SQL} AS k, v FROM triggers_events" + event_filter_sql(config.event_filter)
    )
    rules = t_env.sql_query(
        "SELECT k, v, `partition`, `offset` FROM triggers_rule_records WHERE k IS NOT NULL"
    )
    broadcast = t_env.to_data_stream(rules).broadcast(RULES_STATE)
    actions = (
        key_by_first_field(t_env, keyed_rows, BYTES)
        .connect(broadcast)
        .process(TriggerFunction(config), output_type=OUT_TYPE)
        .uid(UID_TRIGGERS)
        .name("triggers")
    )
    return t_env.from_data_stream(actions)


def jvm_config_json(config: FunctionConfig) -> str:
    """The ``configJson`` of ``TriggersOperator.apply`` (engine ``jvm``): the ``--rules`` file's rules as
    :meth:`udfs.rules.Rule.compiled`, the driver's snapshot of the rules topic by rule id as
    :func:`udfs.rules.compile_rule_record` (validated here against the allowlist, parsed), the event
    pre-filter (sorted names, or ``null``), the state TTL, the log label and the log interval."""
    allowlist = Allowlist.parse(config.allowlist)
    snapshot = {
        rule_id: orjson.loads(compile_rule_record(rule_id, record, allowlist))
        for rule_id, record in config.snapshot_records().items()
    }
    doc = {
        "file_rules": [rule.compiled() for rule in config.file_rules],
        "snapshot": snapshot,
        "event_filter": sorted(config.event_filter) if config.event_filter is not None else None,
        "state_ttl_ms": config.state_ttl_ms,
        "label": JOB,
        "log_interval_ms": round(config.log_interval_s * 1000),
    }
    return orjson.dumps(doc).decode()


class CompileRuleRecord(ScalarFunction):
    """SQL ``triggers_compile_rule_record(k, v, partition, offset)``: a ``rules`` topic record as the JVM
    operator reads it (:func:`udfs.rules.compile_rule_record`, validated against the allowlist). Rule
    records are rare: Python here costs nothing, and rule validation keeps one implementation."""

    def __init__(self, allowlist: tuple[str, ...]) -> None:
        """Keep the destination allowlist's entries (parsed in :meth:`open`)."""
        self.entries = allowlist
        self.allowlist: Allowlist | None = None

    def open(self, function_context: Any) -> None:
        """Parse the allowlist once per worker."""
        self.allowlist = Allowlist.parse(self.entries)

    def eval(self, k: str, v: bytes | None, partition: int, offset: int) -> str:
        """The compiled record's compact JSON ``[partition, offset, rule or null, error or null]``."""
        allowlist = self.allowlist if self.allowlist is not None else Allowlist.parse(self.entries)
        record = RuleRecord(int(partition), int(offset), bytes(v) if v is not None else None)
        return compile_rule_record(k, record, allowlist)


def build_jvm(t_env: Any, config: FunctionConfig) -> Any:
    """:func:`build` with the Java operator: the pre-filtered ``(k, v, event_time)`` events (watermarks
    and record timestamps included) and the ``(k, v)`` rule records compiled by :class:`CompileRuleRecord`
    go to ``TriggersOperator.apply`` through the gateway, which keys the events by ``k`` in the JVM,
    broadcasts the rule records and parses each event once there; no Python runs on the event path."""
    from pyflink.datastream import DataStream
    from pyflink.java_gateway import get_gateway

    operator = get_gateway().jvm
    for part in JVM_OPERATOR.split("."):
        operator = getattr(operator, part)
    t_env.create_temporary_system_function(
        COMPILE_RULE_RECORD_FUNCTION,
        udf(
            CompileRuleRecord(config.allowlist),
            input_types=[DataTypes.STRING(), DataTypes.BYTES(), DataTypes.INT(), DataTypes.BIGINT()],
            result_type=DataTypes.STRING(),
        ),
    )
    events = t_env.to_data_stream(
        t_env.sql_query(
            f"SELECT {ENRICHED_USER_KEY_SQL} AS k, v, event_time FROM triggers_events"
            + event_filter_sql(config.event_filter)
        )
    )
    rules = t_env.to_data_stream(
        t_env.sql_query(
            f"SELECT k, {COMPILE_RULE_RECORD_FUNCTION}(k, v, `partition`, `offset`) AS v"
            " FROM triggers_rule_records WHERE k IS NOT NULL"
        )
    )
    j_actions = operator.apply(
        events._j_data_stream,  # noqa: SLF001 - PyFlink has no public way to apply a Java function
        rules._j_data_stream,  # noqa: SLF001
        jvm_config_json(config),
        USER_STATE_NAME_JVM,
        RULES_STATE_NAME_JVM,
        UID_TRIGGERS_JVM,
        "triggers",
    )
    return t_env.from_data_stream(DataStream(j_actions))


def _warn_missing_secrets(rules: Rules, s: TriggersJobSettings, environ: Mapping[str, str]) -> None:
    from udfs.rules import destination_for

    for rule in rules.active():
        try:
            destination_for(
                rule,
                environ,
                default_secret_env=s.dispatch.webhook_secret_env,
                reserved_env=declared_variables(),
            )
        except RuleError as exc:
            log.warning("%s: its actions will go to %s", exc, s.connections.topic("actions.dlq"))


def function_config(s: TriggersJobSettings, file_rules: list[Rule]) -> FunctionConfig:
    """Read the rules topic once (so the first events already see today's rules) and make the keyed
    function's configuration."""
    snapshot = read_rule_records(
        s.connections.kafka_bootstrap_servers,
        s.connections.topic("rules"),
        timeout_s=s.triggers.rules_snapshot_timeout_ms / 1000,
        **s.connections.kafka_security_options(),
    )
    rules, errors = effective_rules(file_rules, snapshot, s.dispatch.allowlist())
    for rule_id, err in errors.items():
        log.error("rule %s from the rules topic refused: %s", rule_id, err)
    log.info("rules at start: %s", ", ".join(r.id for r in rules) or "(none)")
    event_filter = resolve_event_filter(s.triggers.event_filter, rules)
    if event_filter is not None:
        log.info("JVM pre-filter on event names: %s", ", ".join(sorted(event_filter)))
    if s.triggers.dispatch:
        _warn_missing_secrets(rules, s, os.environ)
    return FunctionConfig(
        file_rules=tuple(file_rules),
        snapshot=tuple((rid, r.partition, r.offset, r.value) for rid, r in snapshot.items()),
        allowlist=tuple(s.dispatch.webhook_allowlist.split(",")),
        event_filter=event_filter,
        state_ttl_ms=s.triggers.state_ttl_ms,
        log_interval_s=s.consumer.log_interval_ms / 1000,
        engine=s.triggers.engine,
    )


def run_with_dispatch(
    job: str, s: TriggersJobSettings, statements: Any, t_env: Any, file_rules: list[Rule]
) -> int:
    """Submit ``statements`` and, unless ``--no-dispatch``, run the dispatch loop beside the job until
    it ends or SIGTERM/SIGINT; returns the exit status.

    With ``--bounded`` the job ends at the input's end offsets (every pending sequence deadline fires
    then: the end of input is the end of event time) and the dispatch loop stops once those actions
    are settled.
    """
    from connectors.actions import ActionDispatch

    stop = threading.Event()
    stop_on_signals(stop)
    drain = threading.Event()
    dispatcher: threading.Thread | None = None
    if s.triggers.dispatch:
        dispatch_config = s.dispatch.dispatch_config(s.connections, s.consumer, s.dispatch_group())
        dispatch = ActionDispatch(dispatch_config, file_rules, os.environ)
        dispatcher = threading.Thread(target=dispatch.run, args=(stop, drain), name="dispatch", daemon=True)
    log.info("submitting %s (group %s)", job, s.consumer.group(job))
    outcome = run_job(
        job,
        statements,
        t_env,
        s.flink,
        s.consumer.log_interval_ms,
        stop=stop,
        on_submitted=dispatcher.start if dispatcher is not None else None,
    )
    if outcome == "detached":  # `flink run --detached`: the job runs on without us
        if s.triggers.dispatch:
            log.warning("detached submission: deliver webhooks with `clickpulse run dispatch`")
        return 0
    if outcome == "finished" and s.consumer.bounded:
        drain.set()  # let the dispatch loop settle what the bounded run produced, then stop
    else:
        stop.set()
    if dispatcher is not None:
        dispatcher.join(timeout=s.dispatch.dispatch_shutdown_ms / 1000 + 30)
    return 1 if outcome == "failed" else 0


def load_file_rules(s: TriggersJobSettings) -> list[Rule]:
    """The ``--rules`` file's rules, validated before any job starts; raises :class:`CliError` (exit
    status 2) saying why a file is refused."""
    try:
        return s.dispatch.file_rules()
    except (RuleError, OSError) as exc:
        raise CliError(f"rules file: {exc}", exit_code=2) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the triggers job (and, unless ``--no-dispatch``, the dispatch loop) until stopped."""
    setup_logging()
    s = compose(TriggersJobSettings, environment(), job_options(JOB, argv, add_triggers_args))
    file_rules = load_file_rules(s)
    config = function_config(s, file_rules)
    _, t_env = create_table_env(
        JOB, s.flink, s.connections.state_dir, extra=flink_options(s), bounded=s.consumer.bounded
    )
    create_sources(t_env, s)
    actions = build(t_env, t_env.from_path("enriched_events"), t_env.from_path("rule_records"), config)
    create_actions_sink(t_env, s)
    statements = t_env.create_statement_set()
    statements.add_insert("actions_sink", actions)
    return run_with_dispatch(JOB, s, statements, t_env, file_rules)


if __name__ == "__main__":
    # Run the importable module rather than ``__main__``, so that Flink pickles TriggerFunction by
    # reference (module globals such as the state descriptors hold JVM handles and cannot be pickled).
    from jobs import triggers

    sys.exit(exit_status(triggers.main))
