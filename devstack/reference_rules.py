"""A brute-force reference for trigger decisions, written from ADR 002 and independent of the reducer.

The triggers job runs the incremental reducer (``step`` / ``on_timer``) over per-user state. This module
answers the same question another way, for checking it: given one user's events **in the order the job
read them** and the watermark standing before each, which ``(rule_id, user, group, message_id)`` fire,
with which ``event_time``. It keeps no state between decisions: at every decision point it scans the
user's history again, from the beginning or from the last decision that restarted the rule (a fire, a
cancel), using only the list of decisions already made. It is slow (quadratic per user and rule) and
meant for simulations of a few thousand events.

Semantics (``docs/adr/002-trigger-semantics.md``), for every enabled rule:

* **Time.** A point of event time ``T`` *has passed* before the ``j``-th event is read when the highest
  watermark seen up to then is ``>= T``. After the last event the run is drained: everything passes.
* **count** (``event``/``where``, ``group_by``, ``count_at_least`` n, ``within`` W): per group (the JSON
  array of the ``group_by`` values; an event missing one of them is not counted), the *open window* is
  the set of events counted since the window last restarted. An event is counted unless it is older
  than the newest event of the open window minus W, or its message id is already in it; counting it
  drops the window's events older than the (new) newest minus W. When the open window then holds n
  events, the rule fires on this event (event time = its timestamp, events sorted by time) and the
  window restarts empty; if cooldown or ``once`` holds the fire back, only the newest n − 1 events stay
  (ADR 002 §2: the state keeps at most n − 1 events). Clean-up (§2): once W has passed after an event,
  that event leaves the window; a window that empties this way is forgotten (its newest time with it).
* **sequence** (``first``, ``then_not``, W): the first event matching ``first`` arms the rule (deadline =
  its time + W); further ``first`` events are ignored while armed. A ``then_not`` event read afterwards
  with a time in ``[first, deadline]`` (inclusive) cancels it, if it is read before the deadline has
  passed; otherwise the rule fires when the deadline passes (event time = the deadline). After a fire or
  a cancel the next ``first`` arms it again (the event whose reading followed the fire included).
* **returning** (``returning_after`` A, ``remember_for`` R, optional ``event``/``where``): a matching event
  fires when the newest earlier matching event is at least A older (inclusive). The newest time is
  forgotten once R has passed after it (§2: a user absent longer counts as new).
* **cooldown** C: a condition met at event time ``t`` does not fire while ``t < last fire's event time +
  C`` (per group for counts); the bookkeeping itself is forgotten once ``last fire + C`` has passed, so a
  late event behind that point is not held back. **once**: never again after a fire (per group); a
  ``once`` sequence is not even armed again.

Clean-up happens on timers that ADR 002 §2 rounds up to the minute, and the reducer drops *every*
expired piece whenever any of the user's timers fires, so the exact moment is somewhere between the
piece's own end and its timer. ``cleanup="eager"`` drops each piece as soon as its end has passed;
``"lazy"`` only when its own minute-rounded timer passes (a count window as a whole, at its newest
event + W). Decisions that differ between the two depend on a late event arriving in that gap; callers
report them instead of comparing (:func:`devstack.simulator.expected_trigger_decisions`).

Not modelled: rule changes while running (§3), and the per-user bound of ``MAX_GROUPS_PER_RULE`` (1024)
count groups — simulated users touch a few deals.

Action ids follow ADR 002 §4: the SHA-256 (hex) of ``rule_id``, ``user_key``, group key and the
triggering ``message_id``, UTF-8, joined by the ASCII unit separator (U+001F).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Literal, NamedTuple

import orjson

from udfs.rules import CountWhen, EventMatcher, ReturningWhen, Rule, Rules, SequenceWhen, lookup_path
from udfs.timeutil import format_ms

__all__ = [
    "Cleanup",
    "ExpectedFire",
    "RefEvent",
    "evaluate",
    "evaluate_user",
    "fire_keys",
    "reference_action_id",
]

Cleanup = Literal["eager", "lazy"]

_MINUTE_MS = 60_000
_END_OF_TIME = 2**62


class RefEvent(NamedTuple):
    """An enriched event as rule evaluation sees it; ``record`` is the flat event (paths resolve in it)."""

    message_id: str
    name: str | None
    type: str | None
    user_key: str
    ts_ms: int
    record: Mapping[str, Any]


@dataclass(frozen=True)
class ExpectedFire:
    """One decision to fire. ``events``: ``{message_id, event, timestamp}`` of the events behind it, in
    time order; ``details``: ``{"group": {path: value}}`` for count rules."""

    action_id: str
    rule_id: str
    user_key: str
    group: str
    message_id: str
    event_time_ms: int
    events: tuple[Mapping[str, Any], ...]
    details: Mapping[str, Any] = field(default_factory=dict)


def reference_action_id(rule_id: str, group: str, message_id: str) -> str:
    """``sha256(rule_id ␟ group ␟ message_id)``, hex (ADR 002 §4)."""
    unit_separator = chr(0x1F)
    text = unit_separator.join([rule_id, group, message_id])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def evaluate(
    events: Sequence[RefEvent], watermarks: Sequence[int], rules: Rules, cleanup: Cleanup = "eager"
) -> list[ExpectedFire]:
    """The fires for every user of ``events`` (read in this order; ``watermarks[i]`` stands before the
    ``i``-th is read), the run drained at the end. Users are independent: each one's events keep their
    order and their watermarks."""
    per_user: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        per_user[e.user_key].append(i)
    fires: list[ExpectedFire] = []
    for user, idx in per_user.items():
        fires += evaluate_user(user, [events[i] for i in idx], [watermarks[i] for i in idx], rules, cleanup)
    return fires


def evaluate_user(
    user_key: str,
    events: Sequence[RefEvent],
    watermarks: Sequence[int],
    rules: Rules,
    cleanup: Cleanup = "eager",
) -> list[ExpectedFire]:
    """The fires for one user's ``events`` in read order (see :func:`evaluate`)."""
    history = _History(user_key, list(events), list(accumulate(watermarks, max, initial=-_END_OF_TIME))[1:])
    fires: list[ExpectedFire] = []
    for rule in rules:
        if not rule.enabled:
            continue
        when = rule.when
        if isinstance(when, CountWhen):
            fires += _count(rule, when, history, cleanup)
        elif isinstance(when, SequenceWhen):
            fires += _sequence(rule, when, history, cleanup)
        elif isinstance(when, ReturningWhen):
            fires += _returning(rule, when, history, cleanup)
    return fires


# --------------------------------------------------------------------------------------------------
# time


@dataclass(frozen=True)
class _History:
    user_key: str
    events: list[RefEvent]
    marks: list[int]  # the highest watermark seen before each event is read

    def passed(self, at_ms: int, before: int) -> bool:
        """Whether event time ``at_ms`` has passed before event ``before`` is read (``len`` = the end)."""
        if before >= len(self.events):
            return True
        return before >= 0 and self.marks[before] >= at_ms


def _minute_up(ms: int) -> int:
    return -(-ms // _MINUTE_MS) * _MINUTE_MS


def _forget_at(end_ms: int, cleanup: Cleanup) -> int:
    """When a piece whose end is ``end_ms`` is forgotten: its end (eager) or its minute timer (lazy)."""
    return end_ms if cleanup == "eager" else _minute_up(end_ms)


def _matches(matcher: EventMatcher, e: RefEvent) -> bool:
    return matcher.matches(e.name, e.type, e.record)


def _forgotten_by(h: _History, before: int, cleanup: Cleanup) -> Callable[[int], bool]:
    """``forgotten(end)`` for decisions taken on reading event ``before`` (after its watermark step)."""

    def forgotten(end: int) -> bool:
        return h.passed(_forget_at(end, cleanup), before)

    return forgotten


def _held_back(rule: Rule, fires_before: Sequence[int], at_ms: int, forgotten: Callable[[int], bool]) -> bool:
    """Cooldown / once, given the event times of this rule's (and group's) earlier fires in read order,
    and ``forgotten(end)``: whether bookkeeping ending at ``end`` is gone by now."""
    if not fires_before:
        return False
    if rule.once:
        return True
    if rule.cooldown_ms is None:
        return False
    last = fires_before[-1]
    return at_ms < last + rule.cooldown_ms and not forgotten(last + rule.cooldown_ms)


def _view(e: RefEvent) -> dict[str, Any]:
    return {"message_id": e.message_id, "event": e.name, "timestamp": format_ms(e.ts_ms)}


# --------------------------------------------------------------------------------------------------
# count


def _group_of(when: CountWhen, e: RefEvent) -> tuple[str, list[Any]] | None:
    if not _matches(when.match, e):
        return None
    values = [lookup_path(e.record, path) for path in when.group_by]
    if any(v is None for v in values):
        return None
    return (orjson.dumps(values).decode() if values else ""), values


def _count(rule: Rule, when: CountWhen, h: _History, cleanup: Cleanup) -> list[ExpectedFire]:
    n, within = when.count_at_least, when.within_ms
    groups = [_group_of(when, e) for e in h.events]
    fired: dict[int, int] = {}  # read index -> event time, of every fire so far
    held: set[int] = set()  # read indices where the window was complete but held back
    out: list[ExpectedFire] = []

    def open_window(j: int, group: str) -> list[RefEvent]:
        """The group's open window just before event ``j`` is read, from a fresh scan of the history
        since the group's last fire."""
        start = max((i + 1 for i in fired if i < j and _key(groups[i]) == group), default=0)
        window: list[RefEvent] = []
        for i in range(start, j + 1):
            window = _expire(window, i)
            if i == j:
                break
            if _key(groups[i]) == group:
                window = _admit(window, h.events[i])[1]
                if i in held:
                    window = window[-(n - 1) :] if n > 1 else []
        return window

    def _expire(window: list[RefEvent], before: int) -> list[RefEvent]:
        if cleanup == "eager":
            return [x for x in window if not h.passed(x.ts_ms + within, before)]
        if window and h.passed(_minute_up(max(x.ts_ms for x in window) + within), before):
            return []
        return window

    def _admit(window: list[RefEvent], e: RefEvent) -> tuple[bool, list[RefEvent]]:
        newest = max([e.ts_ms, *(x.ts_ms for x in window)])
        if e.ts_ms < newest - within or any(x.message_id == e.message_id for x in window):
            return False, window
        kept = [x for x in [*window, e] if x.ts_ms >= newest - within]
        return True, sorted(kept, key=lambda x: (x.ts_ms, x.message_id))

    for j, e in enumerate(h.events):
        g = groups[j]
        if g is None:
            continue
        group, values = g
        counted, window = _admit(open_window(j, group), e)
        if not counted or len(window) < n:
            continue
        earlier = [t for i, t in sorted(fired.items()) if i < j and _key(groups[i]) == group]
        if _held_back(rule, earlier, e.ts_ms, _forgotten_by(h, j, cleanup)):
            held.add(j)
            continue
        fired[j] = e.ts_ms
        paths = [".".join(p) for p in when.group_by]
        out.append(
            ExpectedFire(
                action_id=reference_action_id(rule.id, group, e.message_id),
                rule_id=rule.id,
                user_key=h.user_key,
                group=group,
                message_id=e.message_id,
                event_time_ms=e.ts_ms,
                events=tuple(_view(x) for x in window[-n:]),
                details={"group": dict(zip(paths, values, strict=True))},
            )
        )
    return out


def _key(g: tuple[str, list[Any]] | None) -> str | None:
    return None if g is None else g[0]


# --------------------------------------------------------------------------------------------------
# sequence


def _sequence(rule: Rule, when: SequenceWhen, h: _History, cleanup: Cleanup) -> list[ExpectedFire]:
    events, end = h.events, len(h.events)
    fire_times: list[int] = []
    out: list[ExpectedFire] = []
    start = 0  # the first read index that may arm the rule
    while start < end and not (rule.once and fire_times):
        armed = next((i for i in range(start, end) if _matches(when.first, events[i])), None)
        if armed is None:
            break
        first = events[armed]
        deadline = first.ts_ms + when.within_ms
        # the deadline is decided before the first event read once the watermark has passed it
        decided = next((k for k in range(armed + 1, end) if h.passed(deadline, k)), end)
        cancel = next(
            (
                c
                for c in range(armed + 1, decided)
                if _matches(when.then_not, events[c]) and first.ts_ms <= events[c].ts_ms <= deadline
            ),
            None,
        )
        if cancel is not None:
            start = cancel + 1
            continue
        start = decided

        def forgotten(until: int, decided: int = decided, deadline: int = deadline) -> bool:
            # forgotten on an earlier watermark step, or earlier in this one (timers run in time order)
            at = _forget_at(until, cleanup)
            return h.passed(at, decided - 1) or at <= deadline

        if _held_back(rule, fire_times, deadline, forgotten):
            continue
        fire_times.append(deadline)
        out.append(
            ExpectedFire(
                action_id=reference_action_id(rule.id, "", first.message_id),
                rule_id=rule.id,
                user_key=h.user_key,
                group="",
                message_id=first.message_id,
                event_time_ms=deadline,
                events=(_view(first),),
                details={"missing": when.then_not.event, "within_ms": when.within_ms},
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# returning


def _returning(rule: Rule, when: ReturningWhen, h: _History, cleanup: Cleanup) -> list[ExpectedFire]:
    events = h.events
    matching = [i for i, e in enumerate(events) if _matches(when.match, e)]
    fire_times: list[int] = []
    out: list[ExpectedFire] = []

    def last_seen(j: int) -> int | None:
        """The newest time of the matching events read before ``j`` and not forgotten by then (a fresh
        scan: forgetting restarts the memory)."""
        newest: int | None = None
        for i in matching:
            if i > j:
                break
            if newest is not None and h.passed(_forget_at(newest + when.remember_for_ms, cleanup), i):
                newest = None
            if i == j:
                break
            newest = events[i].ts_ms if newest is None else max(newest, events[i].ts_ms)
        return newest

    for j in matching:
        e = events[j]
        last = last_seen(j)
        if last is None or e.ts_ms - last < when.after_ms:
            continue
        if _held_back(rule, fire_times, e.ts_ms, _forgotten_by(h, j, cleanup)):
            continue
        fire_times.append(e.ts_ms)
        out.append(
            ExpectedFire(
                action_id=reference_action_id(rule.id, "", e.message_id),
                rule_id=rule.id,
                user_key=h.user_key,
                group="",
                message_id=e.message_id,
                event_time_ms=e.ts_ms,
                events=(_view(e),),
                details={"previous_seen": format_ms(last), "absent_ms": e.ts_ms - last},
            )
        )
    return out


def fire_keys(fires: Iterable[ExpectedFire]) -> set[tuple[str, str, str, str, int]]:
    """``(rule_id, user_key, group, message_id, event_time_ms)`` of each fire, for comparisons."""
    return {(f.rule_id, f.user_key, f.group, f.message_id, f.event_time_ms) for f in fires}
