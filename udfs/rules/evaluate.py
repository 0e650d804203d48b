"""Trigger rule evaluation as a pure per-user reducer.

The triggers job keys enriched events by ``user_key`` and, per key, calls::

    state, fires, timers = step(state, Event.from_record(record), rules, now_ms)
    state, fires, timers = on_timer(state, Timer(at_ms=timestamp), rules, now_ms)

storing ``dump_state(state)`` in keyed state (or clearing it when ``state.is_empty()``), emitting
``fire.to_action()`` to the ``actions`` topic and registering every returned :class:`Timer` as an
**event-time** timer. ``now_ms`` is wall-clock time and only feeds ``fired_at``; every decision uses
event time, so a replay from a checkpoint makes the same decisions and the same ``action_id`` values.
See ``docs/adr/002-trigger-semantics.md`` for the time semantics and the state bound.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

import orjson

from udfs.event import EventError, EventHeader
from udfs.rules.definition import (
    CountWhen,
    EventMatcher,
    ReturningWhen,
    Rule,
    Rules,
    SequenceWhen,
    lookup_path,
)
from udfs.timeutil import format_ms

__all__ = [
    "CLEANUP_GRANULARITY_MS",
    "MAX_GROUPS_PER_RULE",
    "CountState",
    "Event",
    "EventError",
    "Fire",
    "GroupState",
    "ReturningState",
    "RuleState",
    "SequenceState",
    "Timer",
    "UserState",
    "action_id_for",
    "dump_state",
    "load_state",
    "on_timer",
    "step",
]

log = logging.getLogger(__name__)

#: Clean-up timers are rounded up to this granularity so a busy user registers at most one per minute.
CLEANUP_GRANULARITY_MS = 60_000
#: Per user and count rule, at most this many groups are tracked; the stalest groups without
#: cooldown/once bookkeeping are evicted first (protects state from bots touching thousands of groups).
MAX_GROUPS_PER_RULE = 1_024
_STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# inputs and outputs


@dataclass(frozen=True)
class Event:
    """The parts of an enriched event rule evaluation needs; ``record`` is the whole flat event."""

    message_id: str
    name: str | None
    type: str | None
    user_key: str
    ts_ms: int
    record: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Event:
        """Build from an enriched event dict (``event_time_ms``, else ISO-8601 or epoch-ms ``timestamp``)."""
        message_id, user_key, ts_ms = EventHeader.from_record(record)
        name = record.get("event")
        event_type = record.get("type")
        return cls(
            message_id=message_id,
            name=name if isinstance(name, str) else None,
            type=event_type if isinstance(event_type, str) else None,
            user_key=user_key,
            ts_ms=ts_ms,
            record=record,
        )


@dataclass(frozen=True, order=True)
class Timer:
    """An event-time timer: call :func:`on_timer` once the watermark passes ``at_ms``."""

    at_ms: int


@dataclass(frozen=True)
class Fire:
    """A rule fired for a user. :meth:`to_action` renders the ``actions`` topic record."""

    action_id: str
    rule_id: str
    user_key: str
    fired_at_ms: int
    event_time_ms: int
    events: tuple[Mapping[str, Any], ...]
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_action(self) -> dict[str, Any]:
        """The action record: ``{action_id, rule_id, user_key, fired_at, event_time, events, details}``."""
        return {
            "action_id": self.action_id,
            "rule_id": self.rule_id,
            "user_key": self.user_key,
            "fired_at": format_ms(self.fired_at_ms),
            "event_time": format_ms(self.event_time_ms),
            "events": [dict(e) for e in self.events],
            "details": dict(self.details),
        }


def action_id_for(rule_id: str, group_key: str, message_id: str) -> str:
    """Deterministic action id: sha256 over rule, group and the triggering message id.

    Not over the user: an event's ``message_id`` already names one user's event, and the ``user_key`` it is
    evaluated under can differ between a run and its replay when an identity lookup failed open (ADR 002 §4).
    """
    material = "\x1f".join((rule_id, group_key, message_id)).encode("utf-8")
    return hashlib.sha256(material).hexdigest()


# --------------------------------------------------------------------------------------------------
# state


@dataclass(frozen=True)
class GroupState:
    """One count group: recent matching events ``(ts_ms, message_id)`` sorted by time, at most N-1.

    ``max_ts`` is the newest event time seen in the group (events older than ``max_ts - within`` are
    too late to count). ``last_fired_ms`` is kept only while a cooldown runs, or forever for ``once``.
    """

    hits: tuple[tuple[int, str], ...] = ()
    max_ts: int = 0
    last_fired_ms: int | None = None


@dataclass(frozen=True)
class CountState:
    """State of one count rule for one user: groups by canonical group key (JSON of the values)."""

    fingerprint: str
    groups: Mapping[str, GroupState] = field(default_factory=dict)


@dataclass(frozen=True)
class SequenceState:
    """State of one sequence rule: the pending ``first`` event (time, message id), fire bookkeeping."""

    fingerprint: str
    pending_ms: int | None = None
    pending_message_id: str | None = None
    last_fired_ms: int | None = None


@dataclass(frozen=True)
class ReturningState:
    """State of one returning rule: last activity time, fire bookkeeping."""

    fingerprint: str
    last_seen_ms: int | None = None
    last_fired_ms: int | None = None


RuleState: TypeAlias = CountState | SequenceState | ReturningState


@dataclass(frozen=True)
class UserState:
    """Everything kept for one user: per rule id, that rule's state. Empty = nothing to store."""

    user_key: str = ""
    rules: Mapping[str, RuleState] = field(default_factory=dict)

    def is_empty(self) -> bool:
        """True when nothing needs storing (the job clears its keyed state)."""
        return not self.rules


def dump_state(state: UserState) -> bytes:
    """Serialize compactly (JSON arrays) for Flink keyed state; ``b""`` for an empty state."""
    if state.is_empty():
        return b""
    out: dict[str, list[Any]] = {}
    for rule_id, rs in state.rules.items():
        if isinstance(rs, CountState):
            groups = {k: [g.max_ts, g.last_fired_ms, [list(h) for h in g.hits]] for k, g in rs.groups.items()}
            out[rule_id] = ["c", rs.fingerprint, groups]
        elif isinstance(rs, SequenceState):
            out[rule_id] = ["s", rs.fingerprint, rs.pending_ms, rs.pending_message_id, rs.last_fired_ms]
        else:
            out[rule_id] = ["r", rs.fingerprint, rs.last_seen_ms, rs.last_fired_ms]
    return orjson.dumps({"v": _STATE_VERSION, "u": state.user_key, "r": out})


def load_state(data: bytes | None) -> UserState:
    """Inverse of :func:`dump_state`; ``None`` or ``b""`` give an empty state."""
    if not data:
        return UserState()
    doc = orjson.loads(data)
    if doc.get("v") != _STATE_VERSION:
        raise ValueError(f"unsupported trigger state version {doc.get('v')!r}")
    rules: dict[str, RuleState] = {}
    for rule_id, item in doc["r"].items():
        kind = item[0]
        if kind == "c":
            groups = {
                k: GroupState(hits=tuple((int(t), str(m)) for t, m in g[2]), max_ts=g[0], last_fired_ms=g[1])
                for k, g in item[2].items()
            }
            rules[rule_id] = CountState(fingerprint=item[1], groups=groups)
        elif kind == "s":
            rules[rule_id] = SequenceState(item[1], item[2], item[3], item[4])
        elif kind == "r":
            rules[rule_id] = ReturningState(item[1], item[2], item[3])
        else:
            raise ValueError(f"unknown rule state kind {kind!r}")
    return UserState(user_key=doc.get("u", ""), rules=rules)


# --------------------------------------------------------------------------------------------------
# helpers


def _round_up(ms: int) -> int:
    return -(-ms // CLEANUP_GRANULARITY_MS) * CLEANUP_GRANULARITY_MS


def _suppressed(rule: Rule, last_fired_ms: int | None, at_ms: int) -> bool:
    if last_fired_ms is None:
        return False
    if rule.once:
        return True
    return rule.cooldown_ms is not None and at_ms < last_fired_ms + rule.cooldown_ms


def _bookkeeping(rule: Rule, fired_at_event_ms: int) -> int | None:
    return fired_at_event_ms if (rule.once or rule.cooldown_ms is not None) else None


def _bookkeeping_expired(rule: Rule, last_fired_ms: int | None, watermark: int) -> bool:
    if last_fired_ms is None or rule.once:
        return False
    return rule.cooldown_ms is None or last_fired_ms + rule.cooldown_ms <= watermark


def _bookkeeping_timer(rule: Rule, last_fired_ms: int | None) -> int | None:
    if last_fired_ms is None or rule.once or rule.cooldown_ms is None:
        return None
    return _round_up(last_fired_ms + rule.cooldown_ms)


def _matcher_fields(matcher: EventMatcher) -> dict[str, Any]:
    return {".".join(path): value for path, value in matcher.where}


def _event_view(message_id: str, name: str | None, ts_ms: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A contributing event as it appears in an action: id, name, time and the relevant fields.

    Fields under ``properties.`` go into ``properties`` (without the prefix); any other dotted path
    (``utm_source``, ``page_host``) goes into ``fields``.
    """
    view: dict[str, Any] = {"message_id": message_id, "event": name, "timestamp": format_ms(ts_ms)}
    props = {k[len("properties.") :]: v for k, v in fields.items() if k.startswith("properties.")}
    others = {k: v for k, v in fields.items() if not k.startswith("properties.")}
    view["properties"] = props
    if others:
        view["fields"] = others
    return view


def _reconcile(state: UserState, rules: Rules) -> dict[str, RuleState]:
    """Drop state of rules that were removed, disabled, or whose condition changed."""
    kept: dict[str, RuleState] = {}
    for rule_id, rs in state.rules.items():
        rule = rules.get(rule_id)
        if rule is None or not rule.enabled or rule.fingerprint != rs.fingerprint:
            continue
        expected = {CountWhen: CountState, SequenceWhen: SequenceState, ReturningWhen: ReturningState}
        if isinstance(rs, expected[type(rule.when)]):
            kept[rule_id] = rs
    return kept


# --------------------------------------------------------------------------------------------------
# count


def _count_step(
    rule: Rule,
    when: CountWhen,
    rs: CountState | None,
    ev: Event,
    user_key: str,
    now_ms: int,
    suppressed: list[str],
) -> tuple[CountState | None, list[Fire], list[int]]:
    if not when.match.matches(ev.name, ev.type, ev.record):
        return rs, [], []
    values = [lookup_path(ev.record, path) for path in when.group_by]
    if any(v is None for v in values):
        return rs, [], []
    group_key = orjson.dumps(values).decode() if values else ""
    groups = dict(rs.groups) if rs is not None else {}
    gs = groups.get(group_key, GroupState(max_ts=ev.ts_ms))
    max_ts = max(gs.max_ts, ev.ts_ms) if gs.hits else ev.ts_ms
    horizon = max_ts - when.within_ms
    if ev.ts_ms < horizon or any(m == ev.message_id for _, m in gs.hits):
        return rs, [], []  # too late for this window, or a redelivered duplicate
    hits = [h for h in gs.hits if h[0] >= horizon]
    k = bisect.bisect_right(hits, (ev.ts_ms, ev.message_id))
    hits.insert(k, (ev.ts_ms, ev.message_id))
    n = when.count_at_least
    window: list[tuple[int, str]] | None = None
    for i in range(max(0, k - n + 1), min(k, len(hits) - n) + 1):
        if hits[i + n - 1][0] - hits[i][0] <= when.within_ms:
            window = hits[i : i + n]
            break
    fires: list[Fire] = []
    last_fired = gs.last_fired_ms
    held = window is not None and _suppressed(rule, last_fired, ev.ts_ms)
    if held:
        suppressed.append(rule.id)
    if window is not None and not held:
        fields = dict(zip((".".join(p) for p in when.group_by), values, strict=True))
        fields.update(_matcher_fields(when.match))
        fires.append(
            Fire(
                action_id=action_id_for(rule.id, group_key, ev.message_id),
                rule_id=rule.id,
                user_key=user_key,
                fired_at_ms=now_ms,
                event_time_ms=ev.ts_ms,
                events=tuple(_event_view(m, when.match.event, t, fields) for t, m in window),
                details={
                    "group": dict(zip((".".join(p) for p in when.group_by), values, strict=True)),
                    "count": n,
                    "within_ms": when.within_ms,
                },
            )
        )
        hits = []
        last_fired = _bookkeeping(rule, ev.ts_ms)
    elif n > 1:
        hits = hits[-(n - 1) :]
    else:
        hits = []
    new_gs = GroupState(hits=tuple(hits), max_ts=max_ts, last_fired_ms=last_fired)
    timers: list[int] = []
    if new_gs.hits:
        timers.append(_round_up(max_ts + when.within_ms))
    cooldown_timer = _bookkeeping_timer(rule, last_fired)
    if cooldown_timer is not None:
        timers.append(cooldown_timer)
    if new_gs.hits or new_gs.last_fired_ms is not None:
        groups[group_key] = new_gs
    else:
        groups.pop(group_key, None)
    if len(groups) > MAX_GROUPS_PER_RULE:
        _evict(groups, keep=group_key)
    fingerprint = rule.fingerprint
    return (CountState(fingerprint, groups) if groups else None), fires, timers


def _evict(groups: dict[str, GroupState], keep: str) -> None:
    candidates = sorted((g.max_ts, k) for k, g in groups.items() if g.last_fired_ms is None and k != keep)
    excess = len(groups) - MAX_GROUPS_PER_RULE
    for _, key in candidates[:excess]:
        del groups[key]
    if excess > 0:
        log.debug("evicted %d stale count groups", min(excess, len(candidates)))


def _count_expire(
    rule: Rule, when: CountWhen, rs: CountState, watermark: int
) -> tuple[CountState | None, list[int]]:
    groups: dict[str, GroupState] = {}
    timers: list[int] = []
    for key, gs in rs.groups.items():
        hits = tuple(h for h in gs.hits if h[0] + when.within_ms > watermark)
        last_fired = None if _bookkeeping_expired(rule, gs.last_fired_ms, watermark) else gs.last_fired_ms
        if not hits and last_fired is None:
            continue
        groups[key] = GroupState(hits=hits, max_ts=gs.max_ts, last_fired_ms=last_fired)
        if hits:
            timers.append(_round_up(gs.max_ts + when.within_ms))
        cooldown_timer = _bookkeeping_timer(rule, last_fired)
        if cooldown_timer is not None:
            timers.append(cooldown_timer)
    return (CountState(rs.fingerprint, groups) if groups else None), timers


# --------------------------------------------------------------------------------------------------
# sequence


def _sequence_step(
    rule: Rule, when: SequenceWhen, rs: SequenceState | None, ev: Event
) -> tuple[SequenceState | None, list[int]]:
    st = rs or SequenceState(rule.fingerprint)
    timers: list[int] = []
    if (
        st.pending_ms is not None
        and when.then_not.matches(ev.name, ev.type, ev.record)
        and st.pending_ms <= ev.ts_ms <= st.pending_ms + when.within_ms
    ):
        st = replace(st, pending_ms=None, pending_message_id=None)
    elif (
        st.pending_ms is None
        and when.first.matches(ev.name, ev.type, ev.record)
        and not (rule.once and st.last_fired_ms is not None)
    ):
        st = replace(st, pending_ms=ev.ts_ms, pending_message_id=ev.message_id)
        timers.append(ev.ts_ms + when.within_ms)
    if st.pending_ms is None and st.last_fired_ms is None:
        return None, timers
    return st, timers


def _sequence_expire(
    rule: Rule,
    when: SequenceWhen,
    rs: SequenceState,
    watermark: int,
    user_key: str,
    now_ms: int,
    suppressed: list[str],
) -> tuple[SequenceState | None, list[Fire], list[int]]:
    fires: list[Fire] = []
    st = rs
    if st.pending_ms is not None and st.pending_message_id is not None:
        deadline = st.pending_ms + when.within_ms
        if deadline <= watermark:
            if _suppressed(rule, st.last_fired_ms, deadline):
                suppressed.append(rule.id)
            else:
                fires.append(
                    Fire(
                        action_id=action_id_for(rule.id, "", st.pending_message_id),
                        rule_id=rule.id,
                        user_key=user_key,
                        fired_at_ms=now_ms,
                        event_time_ms=deadline,
                        events=(
                            _event_view(
                                st.pending_message_id,
                                when.first.event,
                                st.pending_ms,
                                _matcher_fields(when.first),
                            ),
                        ),
                        details={
                            "missing": when.then_not.event,
                            "within_ms": when.within_ms,
                            "deadline": format_ms(deadline),
                        },
                    )
                )
                st = replace(st, last_fired_ms=_bookkeeping(rule, deadline))
            st = replace(st, pending_ms=None, pending_message_id=None)
    if _bookkeeping_expired(rule, st.last_fired_ms, watermark):
        st = replace(st, last_fired_ms=None)
    timers: list[int] = []
    if st.pending_ms is not None:
        timers.append(st.pending_ms + when.within_ms)
    cooldown_timer = _bookkeeping_timer(rule, st.last_fired_ms)
    if cooldown_timer is not None:
        timers.append(cooldown_timer)
    if st.pending_ms is None and st.last_fired_ms is None:
        return None, fires, timers
    return st, fires, timers


# --------------------------------------------------------------------------------------------------
# returning


def _returning_step(
    rule: Rule,
    when: ReturningWhen,
    rs: ReturningState | None,
    ev: Event,
    user_key: str,
    now_ms: int,
    suppressed: list[str],
) -> tuple[ReturningState | None, list[Fire], list[int]]:
    if not when.match.matches(ev.name, ev.type, ev.record):
        return rs, [], []
    st = rs or ReturningState(rule.fingerprint)
    fires: list[Fire] = []
    last = st.last_seen_ms
    returned = last is not None and ev.ts_ms - last >= when.after_ms
    held = returned and _suppressed(rule, st.last_fired_ms, ev.ts_ms)
    if held:
        suppressed.append(rule.id)
    if last is not None and returned and not held:
        fires.append(
            Fire(
                action_id=action_id_for(rule.id, "", ev.message_id),
                rule_id=rule.id,
                user_key=user_key,
                fired_at_ms=now_ms,
                event_time_ms=ev.ts_ms,
                events=(_event_view(ev.message_id, ev.name, ev.ts_ms, _matcher_fields(when.match)),),
                details={"previous_seen": format_ms(last), "absent_ms": ev.ts_ms - last},
            )
        )
        st = replace(st, last_fired_ms=_bookkeeping(rule, ev.ts_ms))
    if last is None or ev.ts_ms > last:
        st = replace(st, last_seen_ms=ev.ts_ms)
    timers = [_round_up(st.last_seen_ms + when.remember_for_ms)] if st.last_seen_ms is not None else []
    cooldown_timer = _bookkeeping_timer(rule, st.last_fired_ms)
    if cooldown_timer is not None:
        timers.append(cooldown_timer)
    return st, fires, timers


def _returning_expire(
    rule: Rule, when: ReturningWhen, rs: ReturningState, watermark: int
) -> tuple[ReturningState | None, list[int]]:
    st = rs
    if st.last_seen_ms is not None and st.last_seen_ms + when.remember_for_ms <= watermark:
        st = replace(st, last_seen_ms=None)
    if _bookkeeping_expired(rule, st.last_fired_ms, watermark):
        st = replace(st, last_fired_ms=None)
    if st.last_seen_ms is None and st.last_fired_ms is None:
        return None, []
    timers = [_round_up(st.last_seen_ms + when.remember_for_ms)] if st.last_seen_ms is not None else []
    cooldown_timer = _bookkeeping_timer(rule, st.last_fired_ms)
    if cooldown_timer is not None:
        timers.append(cooldown_timer)
    return st, timers


# --------------------------------------------------------------------------------------------------
# the reducer


def _timers(values: Iterable[int]) -> list[Timer]:
    return [Timer(at_ms=v) for v in sorted(set(values))]


def step(
    state: UserState, event: Event, rules: Rules, now_ms: int, *, suppressed: list[str] | None = None
) -> tuple[UserState, list[Fire], list[Timer]]:
    """Feed one enriched event of this user through every enabled rule.

    Returns the new state, the rules that fired (count and returning rules fire here; sequence rules
    fire only from :func:`on_timer`) and event-time timers to register. ``now_ms`` (wall clock) is
    used only as ``fired_at``. ``suppressed``, if given, gets the id of every rule whose condition was
    met but did not fire because of its cooldown or ``once``.
    """
    held = suppressed if suppressed is not None else []
    user_key = event.user_key
    kept = _reconcile(state, rules)
    fires: list[Fire] = []
    timer_values: list[int] = []
    for rule in rules.active():
        current = kept.get(rule.id)
        when = rule.when
        new: RuleState | None
        if isinstance(when, CountWhen):
            new, f, t = _count_step(
                rule,
                when,
                current if isinstance(current, CountState) else None,
                event,
                user_key,
                now_ms,
                held,
            )
            fires += f
        elif isinstance(when, SequenceWhen):
            new, t = _sequence_step(
                rule, when, current if isinstance(current, SequenceState) else None, event
            )
        else:
            new, f, t = _returning_step(
                rule,
                when,
                current if isinstance(current, ReturningState) else None,
                event,
                user_key,
                now_ms,
                held,
            )
            fires += f
        timer_values += t
        if new is None:
            kept.pop(rule.id, None)
        else:
            kept[rule.id] = new
    return UserState(user_key=user_key, rules=kept), fires, _timers(timer_values)


def on_timer(
    state: UserState, timer: Timer, rules: Rules, now_ms: int, *, suppressed: list[str] | None = None
) -> tuple[UserState, list[Fire], list[Timer]]:
    """Advance the user's event-time clock to ``timer.at_ms`` (the watermark passed it).

    Fires sequence rules whose ``then_not`` did not arrive before the deadline, drops expired window
    entries, cooldowns and last-seen times, and returns timers for what remains. Idempotent: calling
    it again with the same or an earlier timer changes nothing. ``suppressed``: as in :func:`step`.
    """
    held = suppressed if suppressed is not None else []
    watermark = timer.at_ms
    kept = _reconcile(state, rules)
    fires: list[Fire] = []
    timer_values: list[int] = []
    out: dict[str, RuleState] = {}
    for rule_id, rs in kept.items():
        rule = rules.by_id[rule_id]
        when = rule.when
        new: RuleState | None
        if isinstance(when, CountWhen) and isinstance(rs, CountState):
            new, t = _count_expire(rule, when, rs, watermark)
        elif isinstance(when, SequenceWhen) and isinstance(rs, SequenceState):
            new, f, t = _sequence_expire(rule, when, rs, watermark, state.user_key, now_ms, held)
            fires += f
        elif isinstance(when, ReturningWhen) and isinstance(rs, ReturningState):
            new, t = _returning_expire(rule, when, rs, watermark)
        else:  # pragma: no cover - _reconcile guarantees matching kinds
            continue
        timer_values += [v for v in t if v > watermark]
        if new is not None:
            out[rule_id] = new
    return UserState(user_key=state.user_key, rules=out), fires, _timers(timer_values)
