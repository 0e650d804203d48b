"""Event-time sessions per ``user_key`` as a pure reducer (no Flink, no clock).

The sessionize job keys enriched events by ``user_key`` and, per key, calls::

    state, emits, timers, counts = step(state, Event.from_record(record), watermark_ms, config)
    state, emits, timers, counts = on_timer(state, timer_ms, config)

storing ``dump_state(state)`` in keyed state (clearing it when ``state.is_empty()``), sending every
:class:`SessionRecord` to ``sessions`` and every :class:`LateEvent` to ``events.late``, and registering
every returned time as an **event-time** timer. ``docs/adr/004-sessions.md`` explains the semantics;
in short:

* A session is a run of one user's events in which consecutive events are less than ``gap`` apart
  and every event is less than ``max`` after the session's first event (the same greedy rule as
  :func:`devstack.simulator.expected_sessions`).
* A session is published (version 1..n) when the watermark passes ``end + gap``; every later change
  (an event within the allowed lateness) publishes a new version at once. ``version`` is the
  session's event count, so it grows with every change and is the same in every replay.
* ``session_id`` is derived from ``user_key`` and the first event (earliest ``(time, message_id)``).
  When a late event bridges two sessions the earlier one survives (its id is kept) and the later one
  is retracted: a record with its id, ``retracted: true`` and a higher version. A late event that
  becomes a session's new first event changes its id the same way (old id retracted).
* An event is too late when ``event_time + allowed_lateness <= watermark``, where the watermark is
  the larger of Flink's watermark and the key's newest event time minus the out-of-orderness bound
  (the bound the watermark strategy declares). Too-late events become :class:`LateEvent`, never
  silently dropped. Session state is purged once the watermark passes ``end + gap + lateness``, so
  an accepted event never belongs to a purged session.
* Sessions never span ``max`` or more. An out-of-order event that would stretch a session to
  ``max`` (by extending it backwards or by bridging two sessions) does not merge across that limit;
  for in-order data this is exactly the greedy split, for such rare out-of-order cases the split
  point can differ from a batch recomputation (the ADR has the details).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from udfs.event import EventError, EventHeader
from udfs.timeutil import format_ms

__all__ = [
    "Counts",
    "Event",
    "EventError",
    "KeyState",
    "NO_KEY_BOUND_MS",
    "LateEvent",
    "Session",
    "SessionConfig",
    "SessionRecord",
    "StepResult",
    "Touch",
    "dump_state",
    "load_state",
    "on_timer",
    "session_id_for",
    "step",
]

_STATE_VERSION = 1
ORDER_COMPLETED = "Order Completed"
#: A session with at most one page view, no order and shorter than this is a bounce (GA4's
#: "not engaged" rule).
ENGAGED_AFTER_MS = 10_000
_MICROS = 1_000_000
#: ``currency`` of a session whose orders used different currencies.
MIXED_CURRENCY = "MIXED"


#: An out-of-orderness bound that turns the per-key lateness bound off: the newest event time of a key
#: minus this lies before every watermark, so Flink's watermark alone decides what is too late (for
#: watermarks that follow receive time, not event time, see ``jobs.pipeline``).
NO_KEY_BOUND_MS = 1 << 62


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Time rules of sessionization, all in milliseconds."""

    gap_ms: int = 30 * 60_000
    """Inactivity gap: an event this long or longer after the previous one starts a new session."""
    max_ms: int = 24 * 3_600_000
    """Maximum session length: an event this long or longer after the first one starts a new session."""
    allowed_lateness_ms: int = 3_600_000
    """How far behind the watermark an event may be and still update its session."""
    out_of_orderness_ms: int = 60_000
    """The watermark strategy's out-of-orderness bound (per key: newest event time minus this);
    :data:`NO_KEY_BOUND_MS` turns the per-key bound off (Flink's watermark alone decides)."""

    def __post_init__(self) -> None:
        """Reject a non-positive gap or maximum and a negative lateness or out-of-orderness bound."""
        if self.gap_ms <= 0 or self.max_ms <= 0:
            raise ValueError("gap_ms and max_ms must be positive")
        if self.allowed_lateness_ms < 0 or self.out_of_orderness_ms < 0:
            raise ValueError("allowed_lateness_ms and out_of_orderness_ms must be >= 0")


# --------------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True, slots=True)
class Touch:
    """What one event tells about where a session entered or exited.

    ``rank`` is 1 for events with a page (browser hits) and 0 for events without one (server-side
    events): the landing is the earliest event with a page, the exit the latest one.
    """

    rank: int
    ts_ms: int
    message_id: str
    page_path: str | None = None
    anonymous_id: str | None = None
    utm_source: str | None = None
    utm_medium: str | None = None
    utm_campaign: str | None = None
    utm_term: str | None = None
    utm_content: str | None = None
    referrer_type: str | None = None
    country: str | None = None
    device_type: str | None = None

    def entry_key(self) -> tuple[int, int, str]:
        """Smaller is a better landing: events with a page first, then earliest."""
        return (-self.rank, self.ts_ms, self.message_id)

    def exit_key(self) -> tuple[int, int, str]:
        """Larger is a better exit: events with a page first, then latest."""
        return (self.rank, self.ts_ms, self.message_id)

    def to_list(self) -> list[Any]:
        """Compact form for state."""
        return [
            self.rank,
            self.ts_ms,
            self.message_id,
            self.page_path,
            self.anonymous_id,
            self.utm_source,
            self.utm_medium,
            self.utm_campaign,
            self.utm_term,
            self.utm_content,
            self.referrer_type,
            self.country,
            self.device_type,
        ]


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class Event:
    """The parts of an enriched event sessionization needs."""

    message_id: str
    user_key: str
    ts_ms: int
    is_page: bool
    is_order: bool
    revenue_micros: int
    currency: str | None
    touch: Touch
    exit_mark: Touch

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Event:
        """Build from an enriched event dict (``event_time_ms``, else ISO-8601 or epoch-ms ``timestamp``)."""
        message_id, user_key, ts_ms = EventHeader.from_record(record)
        kind = record.get("type")
        is_order = kind == "track" and record.get("event") == ORDER_COMPLETED
        revenue_micros = 0
        currency = None
        if is_order:
            props = record.get("properties")
            if isinstance(props, Mapping):
                revenue = props.get("revenue")
                if isinstance(revenue, int | float) and not isinstance(revenue, bool):
                    revenue_micros = round(revenue * _MICROS)
                currency = _opt_str(props.get("currency"))
        has_page = bool(record.get("page_url"))
        touch = Touch(
            rank=1 if has_page else 0,
            ts_ms=ts_ms,
            message_id=message_id,
            page_path=_opt_str(record.get("page_path")) if has_page else None,
            anonymous_id=_opt_str(record.get("anonymous_id")),
            utm_source=_opt_str(record.get("utm_source")),
            utm_medium=_opt_str(record.get("utm_medium")),
            utm_campaign=_opt_str(record.get("utm_campaign")),
            utm_term=_opt_str(record.get("utm_term")),
            utm_content=_opt_str(record.get("utm_content")),
            referrer_type=_opt_str(record.get("referrer_type")),
            country=_opt_str(record.get("country")),
            device_type=_opt_str(record.get("device_type")),
        )
        return cls(
            message_id=message_id,
            user_key=user_key,
            ts_ms=ts_ms,
            is_page=kind == "page",
            is_order=is_order,
            revenue_micros=revenue_micros,
            currency=currency,
            touch=touch,
            exit_mark=Touch(touch.rank, ts_ms, message_id, touch.page_path),
        )


# --------------------------------------------------------------------------------------------------
# state


@dataclass(frozen=True, slots=True)
class Session:
    """One session's aggregates; ``first_id`` is the message_id of its first event (earliest, ties by id).

    ``exit`` keeps only rank, time, message_id and page_path (all an exit needs).
    ``published_id``/``published_version`` tell what was last sent to ``sessions`` for this session
    (``None``/0: nothing yet).
    """

    start_ms: int
    end_ms: int
    first_id: str
    events: int
    page_views: int
    orders: int
    revenue_micros: int
    currency: str | None
    entry: Touch
    exit: Touch
    published_id: str | None = None
    published_version: int = 0

    @classmethod
    def of(cls, ev: Event) -> Session:
        """A session of one event."""
        return cls(
            start_ms=ev.ts_ms,
            end_ms=ev.ts_ms,
            first_id=ev.message_id,
            events=1,
            page_views=1 if ev.is_page else 0,
            orders=1 if ev.is_order else 0,
            revenue_micros=ev.revenue_micros,
            currency=ev.currency,
            entry=ev.touch,
            exit=ev.exit_mark,
        )

    def merge(self, other: Session) -> Session:
        """Aggregates of both sessions; publication bookkeeping of ``self`` (the survivor)."""
        first = (
            (self.start_ms, self.first_id)
            if (self.start_ms, self.first_id) <= (other.start_ms, other.first_id)
            else (other.start_ms, other.first_id)
        )
        return Session(
            start_ms=first[0],
            end_ms=max(self.end_ms, other.end_ms),
            first_id=first[1],
            events=self.events + other.events,
            page_views=self.page_views + other.page_views,
            orders=self.orders + other.orders,
            revenue_micros=self.revenue_micros + other.revenue_micros,
            currency=_currency(self.currency, other.currency),
            entry=self.entry if self.entry.entry_key() <= other.entry.entry_key() else other.entry,
            exit=self.exit if self.exit.exit_key() >= other.exit.exit_key() else other.exit,
            published_id=self.published_id,
            published_version=self.published_version,
        )

    def to_list(self) -> list[Any]:
        """Compact form for state."""
        return [
            self.start_ms,
            self.end_ms,
            self.first_id,
            self.events,
            self.page_views,
            self.orders,
            self.revenue_micros,
            self.currency,
            self.entry.to_list(),
            self.exit.to_list()[:4],
            self.published_id,
            self.published_version,
        ]

    @classmethod
    def from_list(cls, item: Sequence[Any]) -> Session:
        """Inverse of :meth:`to_list`."""
        return cls(
            item[0],
            item[1],
            item[2],
            item[3],
            item[4],
            item[5],
            item[6],
            item[7],
            Touch(*item[8]),
            Touch(*item[9]),
            item[10],
            item[11],
        )


@dataclass(frozen=True, slots=True)
class KeyState:
    """Everything kept for one user_key: open and recently closed sessions (sorted by start).

    ``max_ts`` is the newest event time accepted for the key (it feeds the per-key lateness bound).
    ``timers`` are the event-time timers registered and not fired yet: a new one is registered only
    when none of them fires at or before the next due time (a close or a purge), so a key has about
    one timer outstanding instead of one per event.
    """

    user_key: str = ""
    sessions: tuple[Session, ...] = ()
    max_ts: int | None = None
    timers: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        """True when nothing needs to be stored."""
        return not self.sessions


def dump_state(state: KeyState) -> bytes:
    """Serialize compactly (JSON arrays) for Flink keyed state; ``b""`` for an empty state."""
    if state.is_empty():
        return b""
    sessions = [s.to_list() for s in state.sessions]
    return orjson.dumps([_STATE_VERSION, state.user_key, state.max_ts, list(state.timers), sessions])


def load_state(data: bytes | str | None) -> KeyState:
    """Inverse of :func:`dump_state` (bytes, or the same JSON as text); ``None``/empty: empty state."""
    if not data:
        return KeyState()
    doc = orjson.loads(data)
    if doc[0] != _STATE_VERSION:
        raise ValueError(f"unsupported session state version {doc[0]!r}")
    return KeyState(
        user_key=doc[1],
        max_ts=doc[2],
        timers=tuple(doc[3]),
        sessions=tuple(Session.from_list(s) for s in doc[4]),
    )


# --------------------------------------------------------------------------------------------------
# outputs


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One message for the ``sessions`` topic (key ``session_id``)."""

    session_id: str
    version: int
    retracted: bool
    value: Mapping[str, Any]

    def to_json(self) -> bytes:
        """The JSON value bytes."""
        return orjson.dumps(self.value)


@dataclass(frozen=True, slots=True)
class LateEvent:
    """An event too late for its session; the job writes the original record to ``events.late``."""

    message_id: str
    user_key: str
    ts_ms: int
    watermark_ms: int


Emit = SessionRecord | LateEvent


@dataclass(frozen=True, slots=True)
class Counts:
    """What one call did, for metrics."""

    opened: int = 0  #: sessions created
    closed: int = 0  #: sessions published for the first time
    updated: int = 0  #: new versions of already published sessions
    merged: int = 0  #: sessions absorbed into an earlier one
    retracted: int = 0  #: retraction records
    late: int = 0  #: events too late (to events.late)
    late_accepted: int = 0  #: events behind the watermark but within the allowed lateness
    purged: int = 0  #: sessions dropped from state


class StepResult(NamedTuple):
    """Result of :func:`step` / :func:`on_timer`: new state, records to send, timers to register, counts."""

    state: KeyState
    emits: tuple[Emit, ...]
    timers: tuple[int, ...]
    counts: Counts


def session_id_for(user_key: str, first_message_id: str) -> str:
    """Deterministic session id: 32 hex chars of sha256 over user_key and the first event's message_id."""
    material = f"{user_key}\x1f{first_message_id}".encode()
    return hashlib.sha256(material).hexdigest()[:32]


def session_value(
    user_key: str,
    s: Session,
    session_id: str,
    version: int,
    *,
    retracted: bool = False,
    superseded_by: str | None = None,
) -> dict[str, Any]:
    """The ``sessions`` record of ``s`` (see ``docs/adr/004-sessions.md`` for every field)."""
    duration_ms = s.end_ms - s.start_ms
    entry = s.entry
    return {
        "session_id": session_id,
        "user_key": user_key,
        "anonymous_id": entry.anonymous_id,
        "start": format_ms(s.start_ms),
        "end": format_ms(s.end_ms),
        "start_ms": s.start_ms,
        "end_ms": s.end_ms,
        "duration_s": duration_ms / 1000,
        "events": s.events,
        "page_views": s.page_views,
        "entry_page": entry.page_path,
        "exit_page": s.exit.page_path,
        "utm_source": entry.utm_source,
        "utm_medium": entry.utm_medium,
        "utm_campaign": entry.utm_campaign,
        "utm_term": entry.utm_term,
        "utm_content": entry.utm_content,
        "referrer_type": entry.referrer_type,
        "country": entry.country,
        "device_type": entry.device_type,
        "is_bounce": s.page_views <= 1 and s.orders == 0 and duration_ms < ENGAGED_AFTER_MS,
        "converted": s.orders > 0,
        "orders": s.orders,
        "revenue": s.revenue_micros / _MICROS,
        "currency": s.currency,
        "version": version,
        "retracted": retracted,
        "superseded_by": superseded_by,
    }


# --------------------------------------------------------------------------------------------------
# reducer


def _currency(a: str | None, b: str | None) -> str | None:
    """Currency of a session's orders: the one currency, or ``MIXED`` (order-independent)."""
    if a is None or a == b:
        return b if a is None else a
    return a if b is None else MIXED_CURRENCY


def _add(s: Session, ev: Event) -> Session:
    first_id = s.first_id
    start = s.start_ms
    if (ev.ts_ms, ev.message_id) < (start, first_id):
        start, first_id = ev.ts_ms, ev.message_id
    t = ev.touch
    return Session(
        start_ms=start,
        end_ms=max(s.end_ms, ev.ts_ms),
        first_id=first_id,
        events=s.events + 1,
        page_views=s.page_views + (1 if ev.is_page else 0),
        orders=s.orders + (1 if ev.is_order else 0),
        revenue_micros=s.revenue_micros + ev.revenue_micros,
        currency=_currency(s.currency, ev.currency),
        entry=t if t.entry_key() < s.entry.entry_key() else s.entry,
        exit=ev.exit_mark if t.exit_key() > s.exit.exit_key() else s.exit,
        published_id=s.published_id,
        published_version=s.published_version,
    )


def _retraction(user_key: str, old: Session, superseded_by: str) -> SessionRecord:
    """Retract what was published for ``old`` (same content, so the same ``start``; higher version)."""
    assert old.published_id is not None
    version = old.published_version + 1
    value = session_value(
        user_key, old, old.published_id, version, retracted=True, superseded_by=superseded_by
    )
    return SessionRecord(old.published_id, version, True, value)


def _publish(user_key: str, s: Session) -> tuple[Session, SessionRecord]:
    sid = session_id_for(user_key, s.first_id)
    value = session_value(user_key, s, sid, s.events)
    published = Session(
        s.start_ms,
        s.end_ms,
        s.first_id,
        s.events,
        s.page_views,
        s.orders,
        s.revenue_micros,
        s.currency,
        s.entry,
        s.exit,
        sid,
        s.events,
    )
    return published, SessionRecord(sid, s.events, False, value)


def _due(s: Session, cfg: SessionConfig) -> int:
    """When the session next needs the timer: its close (until published), then its purge."""
    close = s.end_ms + cfg.gap_ms
    return close if s.published_version == 0 else close + cfg.allowed_lateness_ms


def _schedule(
    sessions: Sequence[Session], pending: tuple[int, ...], cfg: SessionConfig
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(pending timers, timers to register)``: one new timer only if none fires by the next due time."""
    if not sessions:
        return pending, ()
    due = min(_due(s, cfg) for s in sessions)
    if any(t <= due for t in pending):
        return pending, ()
    return tuple(sorted((*pending, due))), (due,)


def step(state: KeyState, ev: Event, watermark_ms: int, cfg: SessionConfig) -> StepResult:
    """Apply one event; ``watermark_ms`` is the operator's current event-time watermark."""
    user_key = ev.user_key
    ts = ev.ts_ms
    # the per-key bound is what a bounded-out-of-orderness watermark over this key alone would be
    key_bound = state.max_ts - cfg.out_of_orderness_ms - 1 if state.max_ts is not None else watermark_ms
    effective_wm = max(watermark_ms, key_bound)
    if ts + cfg.allowed_lateness_ms <= effective_wm:
        late = LateEvent(ev.message_id, user_key, ts, effective_wm)
        return StepResult(state, (late,), (), Counts(late=1))

    sessions = list(state.sessions)
    starts = [s.start_ms for s in sessions]
    i = bisect.bisect_right(starts, ts) - 1  # last session starting at or before ts
    emits: list[Emit] = []
    opened = merged = 0
    # ``old``: the session before this event; ``absorbed``: a later session merged into it
    absorbed: Session | None = None
    if i >= 0 and ts <= sessions[i].end_ms:
        idx, old = i, sessions[i]
        changed = _add(old, ev)
    else:
        prev = sessions[i] if i >= 0 else None
        nxt = sessions[i + 1] if i + 1 < len(sessions) else None
        join_prev = prev is not None and ts - prev.end_ms < cfg.gap_ms and ts - prev.start_ms < cfg.max_ms
        join_next = nxt is not None and nxt.start_ms - ts < cfg.gap_ms and nxt.end_ms - ts < cfg.max_ms
        if join_prev:
            assert prev is not None
            idx, old = i, prev
            changed = _add(prev, ev)
            if join_next and nxt is not None and nxt.end_ms - changed.start_ms < cfg.max_ms:
                # the event bridges two sessions: the earlier one survives
                absorbed = nxt
                changed = changed.merge(nxt)
                del sessions[i + 1]
                merged = 1
        elif join_next:
            assert nxt is not None
            idx, old = i + 1, nxt
            changed = _add(nxt, ev)
        else:
            idx, old = i + 1, None
            changed = Session.of(ev)
            sessions.insert(idx, changed)
            opened = 1

    closed = updated = retracted = 0
    new_sid = session_id_for(user_key, changed.first_id)
    # every session whose published record no longer stands under its id gets a retraction
    had_publication = False
    for before in (old, absorbed):
        if before is not None and before.published_id:
            had_publication = True
            if before.published_id != new_sid:
                emits.append(_retraction(user_key, before, new_sid))
                retracted += 1
    # a published session (or one already closed by the watermark) is sent again at once
    if had_publication or watermark_ms >= changed.end_ms + cfg.gap_ms:
        changed, record = _publish(user_key, changed)
        emits.append(record)
        if had_publication:
            updated = 1
        else:
            closed = 1
    sessions[idx] = changed
    pending, timers = _schedule(sessions, state.timers, cfg)
    new_state = KeyState(
        user_key=user_key,
        sessions=tuple(sessions),
        max_ts=ts if state.max_ts is None else max(state.max_ts, ts),
        timers=pending,
    )
    counts = Counts(
        opened=opened,
        closed=closed,
        updated=updated,
        merged=merged,
        retracted=retracted,
        late_accepted=1 if ts < watermark_ms else 0,
    )
    return StepResult(new_state, tuple(emits), timers, counts)


def on_timer(state: KeyState, timer_ms: int, cfg: SessionConfig) -> StepResult:
    """The watermark reached ``timer_ms``: publish sessions closed by then, purge expired ones.

    Flink fires a key's timers in time order, so every pending timer up to ``timer_ms`` has fired.
    """
    emits: list[Emit] = []
    keep: list[Session] = []
    closed = purged = 0
    for s in state.sessions:
        close = s.end_ms + cfg.gap_ms
        if timer_ms >= close and s.published_version == 0:
            s, record = _publish(state.user_key, s)
            emits.append(record)
            closed += 1
        if timer_ms >= close + cfg.allowed_lateness_ms:
            purged += 1
            continue
        keep.append(s)
    pending, timers = _schedule(keep, tuple(t for t in state.timers if t > timer_ms), cfg)
    if not emits and not purged and pending == state.timers:
        return StepResult(state, (), (), Counts())
    new_state = KeyState(state.user_key, tuple(keep), state.max_ts, pending)
    return StepResult(new_state, tuple(emits), timers, Counts(closed=closed, purged=purged))
