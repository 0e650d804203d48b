"""Reading the compacted ``rules`` topic, and the dispatch loop ``actions`` -> signed webhooks.

Rule records. :func:`read_rule_records` reads the topic to its end once (the triggers job's snapshot
before it submits); :class:`RuleBook` follows it live. Both keep, per rule id, the newest
:class:`udfs.rules.RuleRecord` and overlay them on the ``--rules`` file with
:func:`udfs.rules.effective_rules` ("newest offset wins": the pure logic lives in ``udfs.rules.book``).

Dispatch (:class:`ActionDispatch`). A plain Kafka consumer loop over ``actions``: each action is
resolved to its rule's webhook (:class:`RuleBook` follows the rules topic), handed to
:class:`connectors.webhook.WebhookDispatcher` (signed, retried, isolated per destination) and its offset
is committed only once the action is **settled**: delivered (2xx) or written to ``actions.dlq`` and
acknowledged by the broker. A crash or restart therefore re-delivers what was in flight (at-least-once;
receivers deduplicate on ``Idempotency-Key`` = ``action_id``) and never loses an action. Duplicates of
an action that is still in flight (the triggers job re-fired it after a restart) ride on the first
delivery instead of being sent twice.

Backpressure without stalling other destinations (``actions`` partitions mix destinations, so pausing
one would stall them all). Each destination holds at most ``max_queue_per_destination`` unsettled
actions in memory; while the loop is above ``max_in_flight``, each destination with a backlog holds at
most a fair share of that. An action beyond its destination's bound is **spilled**: its record is
written unchanged to ``actions.retry`` (key: the destination), and its ``actions`` offset is settled
once the broker acknowledged the copy. The loop reads ``actions.retry`` like ``actions``; a spilled
action whose destination is still full is not taken: that retry partition is sought back to it and
paused until the destination has drained to half its bound; meanwhile its new actions are spilled
too, behind the older ones. Only destinations that spilled share the retry topic's head-of-line
waits. The consumer pauses everything only while ``max_in_flight`` actions wait for the broker's
acknowledgement of their spill or DLQ record (a slow broker), never for a destination.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from connectors.kafka import GroupJoin, TolerantPoll
from connectors.webhook import LatencySample, RetryPolicy, WebhookDispatcher, dead_letter_record
from udfs.rules import (
    DEFAULT_SECRET_ENV,
    LOOPBACK_ONLY,
    Allowlist,
    Destination,
    Rule,
    RuleError,
    RuleRecord,
    destination_for,
    effective_rules,
    newer,
)
from udfs.timeutil import parse_timestamp_ms

__all__ = [
    "ActionDispatch",
    "DispatchConfig",
    "RuleBook",
    "read_rule_records",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# reading the rules topic


def _rules_consumer(bootstrap: str, client_id: str, security: Mapping[str, Any]) -> KafkaConsumer:
    return KafkaConsumer(
        **security,
        bootstrap_servers=bootstrap,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=500,
    )


def _assign_all(consumer: KafkaConsumer, topic: str, timeout_s: float) -> list[TopicPartition]:
    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic} not found within {timeout_s:.0f}s")
        time.sleep(0.2)
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    return tps


def _caught_up(consumer: KafkaConsumer, end: Mapping[TopicPartition, int]) -> bool:
    return all(consumer.position(tp) >= off for tp, off in end.items())


def _absorb(records: dict[str, RuleRecord], batch: Mapping[TopicPartition, list[Any]]) -> int:
    changed = 0
    for tp, messages in batch.items():
        for m in messages:
            if m.key is None:
                log.warning(
                    "rules topic %s: record at %d:%d without a key ignored", tp.topic, tp.partition, m.offset
                )
                continue
            rule_id = m.key.decode("utf-8", errors="replace")
            rec = RuleRecord(tp.partition, m.offset, m.value)
            if newer(rec, records.get(rule_id)):
                records[rule_id] = rec
                changed += 1
    return changed


def read_rule_records(
    bootstrap: str, topic: str, *, timeout_s: float = 30.0, **security: Any
) -> dict[str, RuleRecord]:
    """Read the whole ``rules`` topic up to its current end: the latest record per rule id.

    ``security``: TLS/SASL client options (``Connections.kafka_security_options``).
    """
    consumer = _rules_consumer(bootstrap, "clickpulse-rules-snapshot", security)
    try:
        tps = _assign_all(consumer, topic, timeout_s)
        end = consumer.end_offsets(tps)
        records: dict[str, RuleRecord] = {}
        deadline = time.monotonic() + timeout_s
        while not _caught_up(consumer, end):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout_s:.0f}s")
            _absorb(records, consumer.poll(timeout_ms=200))
        return records
    finally:
        consumer.close()


class RuleBook(threading.Thread):
    """The current rules (``--rules`` file overlaid with the ``rules`` topic), following the topic live.

    A daemon thread owns a Kafka consumer reading the compacted topic from the beginning. ``rules`` is
    swapped atomically; :meth:`sync` waits until everything published so far has been applied (used
    when an action names a rule not seen yet: the rule may have just been added).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        file_rules: Iterable[Rule],
        allowlist: Allowlist = LOOPBACK_ONLY,
        security: Mapping[str, Any] | None = None,
    ) -> None:
        """Follow ``topic`` on ``bootstrap`` (TLS/SASL options ``security``); :meth:`start` begins reading."""
        super().__init__(name="rulebook", daemon=True)
        self.bootstrap = bootstrap
        self.security = dict(security or {})
        self.topic = topic
        self.file_rules = tuple(file_rules)
        self.allowlist = allowlist
        self.records: dict[str, RuleRecord] = {}
        self.rules, self.errors = effective_rules(self.file_rules, {}, allowlist)
        self._halt = threading.Event()
        self._cond = threading.Condition()
        self._sync_requests = 0
        self._syncs_done = 0
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._poll = TolerantPoll("rules follower")

    @property
    def poll_errors(self) -> int:
        """Polls of the rules topic that failed (Kafka away), counted by its :class:`TolerantPoll`."""
        return self._poll.errors

    def run(self) -> None:
        """Read the topic until :meth:`close`."""
        try:
            consumer = _rules_consumer(self.bootstrap, "clickpulse-rulebook", self.security)
        except Exception as exc:  # noqa: BLE001 - surfaced to the waiting caller
            self._failure = exc
            self._ready.set()
            return
        try:
            tps = _assign_all(consumer, self.topic, 30.0)
            self._catch_up(consumer, tps)
            self._ready.set()
            while not self._halt.is_set():
                with self._cond:
                    pending = self._sync_requests
                if pending > self._syncs_done:
                    self._catch_up(consumer, tps)
                    with self._cond:
                        self._syncs_done = pending
                        self._cond.notify_all()
                    continue
                self._apply(self._poll(consumer, IDLE_POLL_MS))
        except Exception as exc:  # noqa: BLE001 - logged; the book keeps its last rules
            log.exception("rules follower stopped")
            self._failure = exc
            self._ready.set()
        finally:
            consumer.close()

    def _catch_up(self, consumer: KafkaConsumer, tps: list[TopicPartition]) -> None:
        end = consumer.end_offsets(tps)
        while not _caught_up(consumer, end) and not self._halt.is_set():
            self._apply(self._poll(consumer, 100))

    def _apply(self, batch: Mapping[TopicPartition, list[Any]]) -> None:
        if not batch or not _absorb(self.records, batch):
            return
        rules, errors = effective_rules(self.file_rules, self.records, self.allowlist)
        for rule_id, err in errors.items():
            if self.errors.get(rule_id) != err:
                log.error("rule %s from the rules topic refused: %s", rule_id, err)
        self.rules, self.errors = rules, errors
        log.info("rules now: %s", ", ".join(sorted(r.id for r in rules)) or "(none)")

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the topic has been read to its end once (raise on failure or timeout)."""
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"rules topic {self.topic} not read within {timeout_s:.0f}s")
        if self._failure is not None:
            raise RuntimeError(f"rules follower failed: {self._failure}") from self._failure

    def sync(self, timeout_s: float) -> bool:
        """Wait until every rule record published before this call is applied; False on timeout."""
        if not self.is_alive():
            return False
        with self._cond:
            self._sync_requests += 1
            target = self._sync_requests
            return self._cond.wait_for(lambda: self._syncs_done >= target, timeout_s)

    def get(self, rule_id: str, wait_s: float = 0.0) -> Rule | None:
        """The rule ``rule_id``; when unknown, wait up to ``wait_s`` for the topic to catch up once."""
        rule = self.rules.get(rule_id)
        if rule is None and wait_s > 0 and self.sync(wait_s):
            rule = self.rules.get(rule_id)
        return rule

    def close(self) -> None:
        """Stop following the topic."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5.0)


# --------------------------------------------------------------------------------------------------
# dispatch


#: Poll timeout of the rules follower and of an idle dispatch loop (records still end a poll at once).
IDLE_POLL_MS = 500


@dataclass(frozen=True)
class DispatchConfig:
    """Everything the dispatch loop needs (see :class:`jobs.dispatch.DispatchSettings` for the env vars)."""

    bootstrap: str
    actions_topic: str
    dlq_topic: str
    rules_topic: str
    group_id: str
    #: where actions beyond a destination's bound are spilled; default ``<actions_topic>.retry``
    retry_topic: str = ""
    auto_offset_reset: str = "earliest"
    allowlist: Allowlist = LOOPBACK_ONLY
    default_secret_env: str = DEFAULT_SECRET_ENV
    reserved_env: frozenset[str] = frozenset()  # settings variables: never read as a webhook secret
    default_timeout_s: float = 5.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency_per_destination: int = 4
    max_queue_per_destination: int = 10_000
    max_in_flight: int = 10_000
    rules_wait_s: float = 2.0
    commit_interval_s: float = 0.2
    shutdown_s: float = 5.0
    log_interval_s: float = 10.0
    kafka_security: Mapping[str, Any] = field(default_factory=dict)
    """TLS/SASL options of every Kafka client of the loop (``Connections.kafka_security_options``)."""

    @property
    def spill_topic(self) -> str:
        """The ``actions.retry`` topic of this loop."""
        return self.retry_topic or f"{self.actions_topic}.retry"


@dataclass
class _Partition:
    """Offsets of one assigned partition: in flight (not settled) and the next one after the last seen."""

    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None
    committed: int | None = None

    def committable(self) -> int | None:
        if self.pending:
            return min(self.pending)
        return self.next_offset


#: Fields that would say where or how to deliver: never part of an action record (the rule book decides).
DESTINATION_FIELDS = frozenset({"url", "webhook", "secret", "secret_env", "headers", "destination", "action"})


@dataclass
class DispatchCounters:
    """Totals of the dispatch loop (also logged as one line every ``log_interval_s``)."""

    actions: int = 0
    duplicates_in_flight: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    unknown_rule: int = 0
    malformed: int = 0
    foreign_destination: int = 0
    spilled: int = 0
    fire_to_delivery_ms: LatencySample = field(default_factory=LatencySample)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: ActionDispatch) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.owner._commit(force=True)
        with self.owner._lock:
            for tp in revoked:
                self.owner._parts.pop(tp, None)
                self.owner._held.pop(tp, None)

    def on_partitions_assigned(self, assigned: Any) -> None:
        with self.owner._lock:
            for tp in assigned:
                self.owner._parts.setdefault(tp, _Partition())


class ActionDispatch:
    """Consume ``actions``, deliver each to its rule's webhook, commit offsets of settled actions only.

    ``run(stop)`` blocks until ``stop`` is set (or, with ``until_caught_up``, until every action that
    existed when the job it follows finished is settled). Thread-safe counters: :meth:`summary`.
    """

    def __init__(
        self,
        config: DispatchConfig,
        file_rules: Iterable[Rule] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare (nothing connects before :meth:`run`)."""
        self.config = config
        self.file_rules = tuple(file_rules)
        self.environ = dict(os.environ if environ is None else environ)
        self.counters = DispatchCounters()
        self._lock = threading.Lock()
        self._parts: dict[TopicPartition, _Partition] = {}
        self._inflight: dict[str, list[tuple[TopicPartition, int]]] = {}
        # retry partitions paused at an action whose destination is full -> that destination's key
        self._held: dict[TopicPartition, str] = {}
        # per-destination bound of this poll round (see _bound)
        self._fair_share: int | None = None
        self._closing = False
        self._consumer: KafkaConsumer | None = None
        self._poll = TolerantPoll("dispatch")
        self._producer: KafkaProducer | None = None
        self._dispatcher: WebhookDispatcher | None = None
        self._rulebook: RuleBook | None = None
        self._last_commit = 0.0
        self._join: GroupJoin | None = None
        self._next_log = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event, until_caught_up: threading.Event | None = None) -> None:
        """Dispatch until ``stop`` is set; when ``until_caught_up`` is set, stop once nothing is left."""
        c = self.config
        self._rulebook = RuleBook(c.bootstrap, c.rules_topic, self.file_rules, c.allowlist, c.kafka_security)
        self._rulebook.start()
        self._rulebook.wait_ready(60.0)
        self._producer = KafkaProducer(
            **c.kafka_security,
            bootstrap_servers=c.bootstrap,
            client_id="clickpulse-dispatch-dlq",
            acks="all",
            enable_idempotence=True,
            linger_ms=0,
        )
        self._dispatcher = WebhookDispatcher(
            self._on_dead,
            policy=c.policy,
            concurrency_per_destination=c.concurrency_per_destination,
            max_queue_per_destination=c.max_queue_per_destination,
            allowlist=c.allowlist,
            on_delivered=self._on_delivered,
        ).start()
        self._consumer = KafkaConsumer(
            **c.kafka_security,
            bootstrap_servers=c.bootstrap,
            client_id="clickpulse-dispatch",
            group_id=c.group_id,
            enable_auto_commit=False,
            auto_offset_reset=c.auto_offset_reset,
            fetch_max_wait_ms=500,
            max_poll_records=500,
        )
        self._join = GroupJoin(self._consumer, [c.actions_topic, c.spill_topic], listener=_Listener(self))
        self._join.subscribe()
        self._next_log = time.monotonic() + c.log_interval_s
        log.info("dispatching %s (group %s)", c.actions_topic, c.group_id)
        try:
            self._loop(stop, until_caught_up)
        finally:
            self._shutdown()

    def _loop(self, stop: threading.Event, until_caught_up: threading.Event | None) -> None:
        assert self._consumer is not None and self._join is not None
        consumer = self._consumer
        join = self._join
        paused = False
        end: dict[TopicPartition, int] | None = None
        while not stop.is_set():
            join.check(bool(consumer.assignment()))
            with self._lock:
                in_flight = sum(len(p.pending) for p in self._parts.values())
            self._fair_share = self._share(in_flight)
            # Flow control is per destination (spilling). What is left is a guard against a slow
            # broker: actions waiting only for the ack of their spill or DLQ record. Those drain on
            # their own, unlike a lane's backlog, so pausing for them cannot wait for ever.
            assert self._dispatcher is not None
            awaiting_ack = in_flight - sum(self._dispatcher.backlogs().values())
            if awaiting_ack >= self.config.max_in_flight and not paused:
                consumer.pause(*consumer.assignment())
                paused = True
            elif paused and awaiting_ack < self.config.max_in_flight // 2:
                _resume(consumer, [tp for tp in consumer.paused() if tp not in self._held])
                paused = False
            self._release_held(consumer, paused)
            # a poll returns as soon as records arrive; its timeout only paces the loop's other work
            # (commits of delivered actions, held partitions), which there is none of when nothing is
            # in flight: idle, the loop wakes twice a second instead of ten times
            batch = self._poll(consumer, 100 if in_flight or self._held else IDLE_POLL_MS)
            for tp, messages in batch.items():
                for m in messages:
                    held = self._handle(tp, m)
                    if held is not None:
                        # not taken: read it again once its destination has room; nothing after it
                        # in this partition is taken before (the retry topic keeps spill order)
                        consumer.seek(tp, m.offset)
                        consumer.pause(tp)
                        self._held[tp] = held
                        break
            self._commit()
            self._maybe_log()
            if until_caught_up is not None and until_caught_up.is_set():
                assignment = consumer.assignment()
                if end is None and assignment:
                    end = consumer.end_offsets(list(assignment))
                if end is not None and self._settled_up_to(end) and self._retry_drained():
                    log.info("dispatch caught up with %s", self.config.actions_topic)
                    return

    def _share(self, in_flight: int) -> int | None:
        """The bound of every destination's backlog this round: ``None`` (the lane's own) below
        ``max_in_flight``, above it a fair share of ``max_in_flight`` among the lanes with a backlog."""
        if in_flight < self.config.max_in_flight or self._dispatcher is None:
            return None
        lanes = max(1, len(self._dispatcher.backlogs()))
        return max(self.config.concurrency_per_destination, self.config.max_in_flight // (2 * lanes))

    def _bound(self) -> int:
        share = self._fair_share
        return self.config.max_queue_per_destination if share is None else share

    def _release_held(self, consumer: KafkaConsumer, paused: bool) -> None:
        """Resume retry partitions whose destination has drained to half its bound."""
        assert self._dispatcher is not None
        for tp, key in list(self._held.items()):
            if self._dispatcher.backlog(key) <= self._bound() // 2:
                del self._held[tp]
        if not paused:
            # also a partition held before a rebalance revoked and re-assigned it (its hold was dropped)
            stray = [tp for tp in consumer.paused() if tp not in self._held]
            if stray:
                _resume(consumer, stray)

    def _retry_drained(self) -> bool:
        """Every assigned retry partition read to its current end (spilled actions are taken back)."""
        assert self._consumer is not None
        retry = [tp for tp in self._consumer.assignment() if tp.topic == self.config.spill_topic]
        if not retry:
            return True
        end = self._consumer.end_offsets(retry)
        return all(self._consumer.position(tp) >= off for tp, off in end.items())

    def _settled_up_to(self, end: Mapping[TopicPartition, int]) -> bool:
        assert self._consumer is not None
        with self._lock:
            if any(p.pending for p in self._parts.values()):
                return False
        return all(self._consumer.position(tp) >= off for tp, off in end.items())

    def _shutdown(self) -> None:
        with self._lock:
            self._closing = True
        if self._dispatcher is not None:
            # What is still in flight comes back through _on_dead as "shutdown: ...": it is neither
            # dead-lettered nor committed, so the next run delivers it again.
            self._dispatcher.close(self.config.shutdown_s)
        if self._producer is not None:
            self._producer.flush(timeout=10)
        if self._consumer is not None:
            self._commit(force=True)
            self._consumer.close(autocommit=False)
        if self._producer is not None:
            self._producer.close(timeout=5)
        if self._rulebook is not None:
            self._rulebook.close()
        self._log_line()

    # -- one action --------------------------------------------------------------------------------

    def _handle(self, tp: TopicPartition, m: Any) -> str | None:
        """Take one record; a destination key instead when a spilled action must wait for its lane."""
        retried = tp.topic == self.config.spill_topic
        action: dict[str, Any] | None = None
        try:
            parsed = orjson.loads(m.value)
            if not isinstance(parsed, dict) or not isinstance(parsed.get("action_id"), str):
                raise ValueError("not an action record (object with action_id)")
            action = parsed
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            problem = f"malformed action record: {exc}"
        destination: Destination | None = None
        if action is not None:
            destination, problem = self._route(action)
        if retried and destination is not None and not self._has_room(destination.key):
            return destination.key  # not registered: read again when the lane has room
        with self._lock:
            part = self._parts.setdefault(tp, _Partition())
            part.next_offset = max(part.next_offset or 0, m.offset + 1)
            part.pending.add(m.offset)
            if not retried:
                self.counters.actions += 1
        if action is None:
            with self._lock:
                self.counters.malformed += 1
            payload = (m.value or b"").decode("utf-8", errors="replace")
            self._dead_letter(
                {"action_id": f"malformed:{tp.partition}:{m.offset}", "payload": payload},
                [(tp, m.offset)],
                0,
                problem,
            )
            return None
        action_id = action["action_id"]
        with self._lock:
            waiting = self._inflight.get(action_id)
            if waiting is not None:
                waiting.append((tp, m.offset))
                self.counters.duplicates_in_flight += 1
                return None
            self._inflight[action_id] = [(tp, m.offset)]
        if destination is None:
            self._settle_dead(action, 0, problem)
            return None
        assert self._dispatcher is not None
        key = destination.key
        if not retried and key in self._held.values():
            self._spill(action, m.value, key)  # behind the spilled ones waiting for this destination
        elif not self._dispatcher.submit(action, destination, limit=self._bound()):
            self._spill(action, m.value, key)
        return None

    def _route(self, action: Mapping[str, Any]) -> tuple[Destination | None, str]:
        """The destination of an action, or ``None`` and why it cannot be delivered."""
        assert self._rulebook is not None
        rule_id = str(action.get("rule_id", ""))
        rule = self._rulebook.get(rule_id, wait_s=self.config.rules_wait_s)
        if rule is None:
            with self._lock:
                self.counters.unknown_rule += 1
            return None, f"unknown rule {rule_id!r} (removed before delivery?)"
        foreign = sorted(DESTINATION_FIELDS & action.keys())
        if foreign:
            # actions are written by the triggers job alone (ACLs); one that tries to steer its own
            # delivery was forged or corrupted: it reaches no one
            with self._lock:
                self.counters.foreign_destination += 1
            return None, f"action carries destination fields of its own ({', '.join(foreign)}): refused"
        try:
            return destination_for(
                rule,
                self.environ,
                default_secret_env=self.config.default_secret_env,
                reserved_env=self.config.reserved_env,
                default_timeout_s=self.config.default_timeout_s,
            ), ""
        except RuleError as exc:
            return None, str(exc)

    def _has_room(self, key: str) -> bool:
        assert self._dispatcher is not None
        return self._dispatcher.backlog(key) < self._bound()

    def _spill(self, action: Mapping[str, Any], value: bytes, key: str) -> None:
        """Write the action record unchanged to the retry topic; its offsets settle on the broker's ack."""
        assert self._producer is not None
        action_id = str(action.get("action_id"))
        with self._lock:
            offsets = self._inflight.pop(action_id, [])
        future = self._producer.send(self.config.spill_topic, key=key.encode("utf-8"), value=value)

        def acked(_: Any) -> None:
            with self._lock:
                self.counters.spilled += 1
            self._done(offsets)

        def failed(exc: BaseException) -> None:
            # Not committed: the next run reads the action again rather than losing it.
            log.error("could not spill action %s to %s: %s", action_id, self.config.spill_topic, exc)

        future.add_callback(acked)
        future.add_errback(failed)

    # -- outcomes (dispatcher thread) ---------------------------------------------------------------

    def _on_delivered(self, action: dict[str, Any], attempts: int) -> None:
        fired = action.get("fired_at")
        with self._lock:
            self.counters.delivered += 1
            if isinstance(fired, str):
                try:
                    self.counters.fire_to_delivery_ms.add(time.time() * 1000.0 - parse_timestamp_ms(fired))
                except ValueError:
                    pass
            offsets = self._inflight.pop(str(action.get("action_id")), [])
        self._done(offsets)

    def _on_dead(self, action: dict[str, Any], attempts: int, last_error: str) -> None:
        with self._lock:
            closing = self._closing
        if closing and last_error.startswith("shutdown"):
            return  # stays pending: not committed, delivered again by the next run
        self._settle_dead(action, attempts, last_error)

    def _settle_dead(self, action: dict[str, Any], attempts: int, last_error: str) -> None:
        with self._lock:
            offsets = self._inflight.pop(str(action.get("action_id")), [])
        self._dead_letter(action, offsets, attempts, last_error)

    def _dead_letter(
        self,
        action: Mapping[str, Any],
        offsets: list[tuple[TopicPartition, int]],
        attempts: int,
        last_error: str,
    ) -> None:
        assert self._producer is not None
        record = dead_letter_record(action, attempts, last_error)
        key = str(action.get("action_id", "")).encode("utf-8")
        future = self._producer.send(self.config.dlq_topic, key=key, value=orjson.dumps(record))

        def acked(_: Any) -> None:
            with self._lock:
                self.counters.dead_lettered += 1
            self._done(offsets)

        def failed(exc: BaseException) -> None:
            # Not committed: the action is retried by the next run rather than lost.
            log.error("could not write action %s to %s: %s", key.decode(), self.config.dlq_topic, exc)

        future.add_callback(acked)
        future.add_errback(failed)

    def _done(self, offsets: list[tuple[TopicPartition, int]]) -> None:
        with self._lock:
            for tp, off in offsets:
                part = self._parts.get(tp)
                if part is not None:
                    part.pending.discard(off)

    # -- offsets and counters ----------------------------------------------------------------------

    def _commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < self.config.commit_interval_s:
            return
        self._last_commit = now
        with self._lock:
            todo = {}
            for tp, part in self._parts.items():
                off = part.committable()
                if off is not None and off != part.committed:
                    todo[tp] = off
        if not todo or self._consumer is None:
            return
        try:
            self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in todo.items()})
        except Exception as exc:  # noqa: BLE001 - a failed commit only means redelivery later
            log.warning("offset commit failed (actions will be redelivered): %s", exc)
            return
        with self._lock:
            for tp, off in todo.items():
                known = self._parts.get(tp)
                if known is not None:
                    known.committed = off

    def summary(self) -> dict[str, Any]:
        """Counters: actions read, delivered, dead-lettered, retried, in flight, latencies (ms)."""
        stats = self._dispatcher.stats() if self._dispatcher is not None else {}
        with self._lock:
            c = self.counters
            fire_p50, fire_p99 = c.fire_to_delivery_ms.quantiles(0.50, 0.99)
            in_flight = sum(len(p.pending) for p in self._parts.values())
            out: dict[str, Any] = {
                "actions": c.actions,
                "delivered": c.delivered,
                "dead_lettered": c.dead_lettered,
                "unknown_rule": c.unknown_rule,
                "malformed": c.malformed,
                "foreign_destination": c.foreign_destination,
                "duplicates_in_flight": c.duplicates_in_flight,
                "spilled": c.spilled,
                "in_flight": in_flight,
                "partitions": len(self._parts),
                "poll_errors": self._poll.errors,
                "rules_poll_errors": self._rulebook.poll_errors if self._rulebook is not None else 0,
            }
        out["retried"] = stats.get("retried", 0)
        out["send_p50_ms"] = _round(stats.get("latency_p50_ms"))
        out["send_p99_ms"] = _round(stats.get("latency_p99_ms"))
        out["fire_to_delivery_p50_ms"] = _round(fire_p50)
        out["fire_to_delivery_p99_ms"] = _round(fire_p99)
        return out

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + self.config.log_interval_s
            self._log_line()

    def _log_line(self) -> None:
        log.info("dispatch: %s", " ".join(f"{k}={v}" for k, v in self.summary().items()))


def _resume(consumer: KafkaConsumer, tps: list[TopicPartition]) -> None:
    """Resume ``tps``, working around kafka-python 3.0.x (3.0.12 checked) never fetching them again.

    Records buffered for a partition when it is paused are parked, and restored only while the
    fetcher's in-line slot is ``None`` — which, once anything was fetched, it never is again (a drained
    batch stays there, empty): the resumed partition stays parked, and unfetched, for ever. Dropping
    the parked batch loses nothing: the partition's position is still that of its next unread record
    (or where a hold sought it back to), and it is fetched again from there.
    """
    parked = getattr(getattr(consumer, "_fetcher", None), "_paused_partition_records", None)
    for tp in tps:
        if isinstance(parked, dict):
            parked.pop(tp, None)
    consumer.resume(*tps)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
