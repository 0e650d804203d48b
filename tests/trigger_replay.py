"""Replays of recorded histories through both trigger operators, for the differential test and the bench:
:func:`generate_history` makes a seeded history (the rules in force at start, rule records, events and
watermarks, as one triggers subtask would see them), :func:`replay_python` runs it through the production
Python operator ``jobs.triggers.TriggerFunction`` (with small in-process stand-ins for what Flink gives
it: keyed value state, broadcast state, the timer service, metrics), :func:`replay_java` through the Java
port (``dev.clickpulse.operators.triggers.TriggerReplay`` in ``clickpulse-operators.jar``), without Flink.

A history is a list of ops; the first is ``("config", TriggerSetup)``, then:

- ``("r", rule_id, RuleRecord)``: a ``rules`` topic record on the broadcast side;
- ``("e", key, event JSON text, now_ms)``: an enriched event of user ``key`` (the current key) at wall
  clock ``now_ms`` (which only becomes ``fired_at``);
- ``("w", watermark, now_ms)``: the watermark advances; timers at or before it fire;
- ``("t", key, at)``: a timer of ``key`` at ``at`` that Flink restored from a checkpoint (one the JVM
  operator took before it kept one timer per key; the Python operator registers one per time anyway).

Both write the same transcript: ``["a", key, action]`` per action, then ``["state", key, dump_state
JSON]`` per key still holding state (sorted by key) and ``["counts", {name: total}]`` (the operator's
counters, ``jobs.triggers.COUNTERS``); the JVM operator runs a key's due times at its one Flink timer, so
within one watermark advance its actions interleave keys differently (the same per key). Timers behave as
Flink's: one per (key, time), fired in (time, key) order when a watermark reaches them, including ones
registered while firing. The event pre-filter of a
setup is the operator's (rules needing other events are refused); the SQL filter in front of the
operator is not applied, every event of the history reaches it.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import orjson

from tests.session_replay import WM_MAX, Replay, encode_history, run_java_replay
from udfs.rules import Allowlist, Rule, RuleRecord, compile_rule_record, parse_rule
from udfs.timeutil import format_ms

REPLAY_CLASS = "dev.clickpulse.operators.triggers.TriggerReplay"
SEC = 1_000
MIN = 60_000
START_MS = 1_795_000_000_000
ALLOWLIST = ("localhost", "127.0.0.0/8", "::1")

Op = tuple[Any, ...]


@dataclass(frozen=True)
class TriggerSetup:
    """What the operator starts with: the ``--rules`` file, the rules topic as the driver read it before
    submitting, the destination allowlist and the JVM pre-filter's event names (``None``: no filter)."""

    file_rules: tuple[Rule, ...]
    snapshot: tuple[tuple[str, RuleRecord], ...]
    allowlist: tuple[str, ...] = ALLOWLIST
    event_filter: frozenset[str] | None = None

    def compile(self, rule_id: str, record: RuleRecord) -> str:
        """A rule record as the JVM operator reads it (validated here, as the driver does)."""
        return compile_rule_record(rule_id, record, Allowlist.parse(self.allowlist))

    def java_config(self) -> dict[str, Any]:
        """The ``config`` line of ``TriggerReplay``."""
        return {
            "file_rules": [r.compiled() for r in self.file_rules],
            "snapshot": {rid: orjson.loads(self.compile(rid, rec)) for rid, rec in self.snapshot},
            "event_filter": sorted(self.event_filter) if self.event_filter is not None else None,
        }


# ------------------------------------------------------------------------------------------ rules

VIEW, ADD, ORDER, PAGE, SIGNUP = (
    "Product Viewed",
    "Product Added",
    "Order Completed",
    "Page Viewed",
    "Signed Up",
)
GIFT = "Wünsch 🎁 Added"
NOISE = ("Scrolled", "Video Played", "Ärger")
HOOK = {"webhook": {"url": "http://localhost:8089/hook"}}


def _rule_doc(rid: str, when: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "when": when, "action": HOOK, **extra}


def _value(doc: dict[str, Any]) -> bytes:
    """A rules topic value: the rule as JSON, without its id (the record key gives it)."""
    return orjson.dumps({k: v for k, v in doc.items() if k != "id"})


VIEWS_BY_DEAL = _rule_doc(
    "views_by_deal",
    {"event": VIEW, "group_by": ["properties.deal_id"], "count_at_least": 3, "within": "2m"},
    cooldown="5m",
)
ADD_EUR = _rule_doc("add_eur", {"event": ADD, "where": {"properties.currency": "EUR"}})
CART_ABANDON = _rule_doc(
    "cart_abandon", {"sequence": {"first": ADD, "then_not": ORDER, "within": "3m"}}, cooldown="10m"
)
WELCOME_BACK = _rule_doc(
    "welcome_back", {"returning_after": "5m", "remember_for": "20m", "event": PAGE}, cooldown="10m"
)
FILE_RULES = [
    VIEWS_BY_DEAL,
    ADD_EUR,
    _rule_doc(
        "order_pair",
        {"event": ORDER, "group_by": ["properties.sku", "utm_source"], "count_at_least": 2, "within": "10m"},
        once=True,
    ),
    _rule_doc(
        "premium_price",
        {
            "event": VIEW,
            "where": {"properties.price": 10, "properties.premium": True},
            "count_at_least": 2,
            "within": "1m",
        },
        cooldown="30s",
    ),
    _rule_doc(
        "page_no_ref", {"event": PAGE, "where": {"properties.ref": None, "country": "DE"}}, cooldown="1m"
    ),
    _rule_doc(
        "order_total",
        {"event": ORDER, "where": {"properties.total": 2.5, "properties.item.flag": False}, "within": "1s"},
    ),
    CART_ABANDON,
    _rule_doc(
        "deal_seq",
        {
            "sequence": {
                "first": {"event": VIEW, "where": {"properties.deal_id": "LAS"}},
                "then_not": {"event": ADD, "where": {"properties.deal_id": "LAS"}},
                "within": "90s",
            }
        },
        once=True,
    ),
    WELCOME_BACK,
    _rule_doc("signup_off", {"event": SIGNUP}, enabled=False),
    _rule_doc(
        "gift",
        {"event": GIFT, "group_by": ["properties.item.name"], "count_at_least": 2, "within": "5m"},
        description="nested group path, non-ASCII event name",
    ),
]
ANY_RETURN = _rule_doc("any_return", {"returning_after": "3m", "remember_for": "10m"})
TOPIC_RETURN = _rule_doc(
    "topic_return", {"returning_after": "2m", "remember_for": "6m", "event": ORDER}, once=True
)
BAD_HOST = _rule_doc("bad_host", {"event": SIGNUP}) | {
    "action": {"webhook": {"url": "http://evil.example/x"}}
}
NEW_GIFT = _rule_doc("new_gift", {"event": GIFT, "where": {"properties.item.name": "𝄞"}}, once=True)


def _updates() -> list[tuple[float, str, RuleRecord]]:
    """Rule records arriving mid-history: (fraction of the history, rule id, record)."""

    def rec(partition: int, offset: int, doc: dict[str, Any] | None) -> RuleRecord:
        return RuleRecord(partition, offset, _value(doc) if doc is not None else None)

    welcome_2m = WELCOME_BACK | {"cooldown": "2m"}  # the condition is the same: state kept
    return [
        (0.12, "any_return", rec(0, 20, ANY_RETURN)),  # any activity: no event name can be skipped
        (
            0.22,
            "views_by_deal",
            rec(0, 21, VIEWS_BY_DEAL | {"when": {**VIEWS_BY_DEAL["when"], "count_at_least": 2}}),
        ),
        (0.30, "welcome_back", rec(0, 22, welcome_2m)),
        (0.38, "views_by_deal", rec(0, 7, VIEWS_BY_DEAL | {"cooldown": "1s"})),  # older: ignored
        (0.45, "add_eur", rec(0, 23, ADD_EUR | {"when": {"event": ADD, "count_at_least": 0}})),  # invalid
        (0.50, "règle", rec(0, 24, ADD_EUR)),  # not a valid rule id
        (0.55, "any_return", rec(0, 25, None)),  # tombstone
        (
            0.60,
            "add_eur",
            rec(0, 26, ADD_EUR | {"when": {"event": ADD, "where": {"properties.currency": "USD"}}}),
        ),
        (0.65, "cart_abandon", rec(0, 27, CART_ABANDON | {"enabled": False})),
        (0.70, "welcome_back", rec(0, 22, welcome_2m)),  # redelivered as it is: no change
        (0.75, "cart_abandon", rec(1, 0, CART_ABANDON | {"cooldown": "5m"})),  # another partition: newer
        (0.80, "topic_return", rec(0, 28, None)),
        (0.85, "new_gift", rec(0, 29, NEW_GIFT)),
        (0.90, "bad_host", rec(0, 30, _rule_doc("bad_host", {"event": SIGNUP}))),  # valid now
        (0.93, "nope", rec(0, 31, None)),  # a tombstone for a rule that never was
    ]


def default_setup(*, event_filter: bool = False) -> TriggerSetup:
    """The rules file, the topic snapshot and (with ``event_filter``) a pre-filter that leaves the gift
    rules and any-activity rules outside."""
    return TriggerSetup(
        file_rules=tuple(parse_rule(doc, Allowlist.parse(ALLOWLIST)) for doc in FILE_RULES),
        snapshot=(
            ("topic_return", RuleRecord(0, 3, _value(TOPIC_RETURN))),
            ("bad_host", RuleRecord(0, 4, _value(BAD_HOST))),
            ("signup_off", RuleRecord(0, 5, _value(FILE_RULES[9] | {"cooldown": "1m"}))),
        ),
        event_filter=frozenset({VIEW, ADD, ORDER, PAGE, NOISE[0]}) if event_filter else None,
    )


# ------------------------------------------------------------------------------------------ events

DEALS: tuple[Any, ...] = (
    "LAS", "LAS", "NYC", "Zürich", "東京", "🚀deal", "", 7, 7.0, 0.1, 2.675, 1e-7, 1e16, -0.0, 123456789.125,
    0.30000000000000004, True, False, None, ["LAS", 1], {"b": 1, "a": [2.5, "x"]},
)  # fmt: skip
SKUS: tuple[Any, ...] = (1, 2, 2.0, "A-1", "Ω", "𝄞", True, False, 1e-7, 1.5e300, -3, "")
UTM: tuple[Any, ...] = ("google", "google", None, "ñewsletter", 0, "")
_MISSING = object()


def _properties(rng: random.Random, name: str | None, deals: list[Any]) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if name == VIEW:
        p["deal_id"] = rng.choice(deals)
        p["price"] = rng.choice([10, 10, 10.0, "10", 9.99, True, None])
        p["premium"] = rng.choice([True, True, False, "true", None, 1])
    elif name == ADD:
        p["currency"] = rng.choice(["EUR", "EUR", "USD", None, "eur"])
        p["deal_id"] = rng.choice(["LAS", "LAS", "NYC", 7])
        p["sku"] = rng.choice(SKUS)
    elif name == ORDER:
        p["sku"] = rng.choice(SKUS[:4])
        p["total"] = rng.choice([2.5, 2.5, "2.5", 3, 25e-1, None])
        p["item"] = rng.choice(
            [{"flag": False}, {"flag": False, "n": 1}, {"flag": True}, {"flag": 0}, "x", None]
        )
    elif name == PAGE:
        ref = rng.choice([_MISSING, _MISSING, None, "google", ""])
        if ref is not _MISSING:
            p["ref"] = ref
    elif name == GIFT:
        item = rng.choice([{"name": "Bär 🐻"}, {"name": "𝄞"}, {"name": "x"}, {"name": 42}, {}, None])
        if item is not None:
            p["item"] = item
    if rng.random() < 0.05:
        p["nested"] = {"deep": [1, {"x": [2, 3]}], "ü": "😀"}
    return p


def _event(
    rng: random.Random, user: str, ts: int, mid: str, deals: list[Any], country: str | None
) -> dict[str, Any]:
    names: list[str | None] = [VIEW, ADD, ORDER, PAGE, GIFT, SIGNUP, *NOISE, None]
    name = rng.choices(names, [10, 4, 3, 6, 1, 0.5, 1, 1, 1, 2])[0]
    if name is None:
        kind = rng.choice(["identify", "alias", "page", "screen", "identify"])
    else:
        kind = "page" if name == PAGE and rng.random() < 0.7 else "track"
    props: Any = _properties(rng, name, deals)
    if rng.random() < 0.05:
        props = orjson.dumps(props).decode()  # stored as text: lookup_path decodes it
    e: dict[str, Any] = {
        "message_id": mid,
        "type": kind,
        "event": name,
        "anonymous_id": f"a-{user}",
        "user_id": None,
        "user_key": user,
        "timestamp": format_ms(ts),
        "event_time_ms": ts,
        "received_at": format_ms(ts + 40),
        "page_url": "https://shop.example/p/42",
        "page_host": "shop.example",
        "properties": props,
        "traits": {},
        "country": country,
        "is_bot": False,
    }
    utm = rng.choice([*UTM, _MISSING])
    if utm is not _MISSING:
        e["utm_source"] = utm
    shape = rng.random()
    if shape < 0.05:
        del e["event_time_ms"]  # the ISO timestamp gives the time
    elif shape < 0.07:
        del e["event_time_ms"]
        e["timestamp"] = format_ms(ts + 3_600_000)[:-1] + "+01:00"  # same instant
    elif shape < 0.09:
        e["event_time_ms"] = float(ts)  # not an int: the timestamp gives the time
    elif shape < 0.10:
        del e["event_time_ms"]
        e["timestamp"] = ts  # epoch ms
    elif shape < 0.11:
        del e["event_time_ms"]
        e["timestamp"] = format_ms(ts)[:-1] + "999Z"  # microseconds: floored
    return e


def _malformed(rng: random.Random, user: str, ts: int, mid: str) -> bytes:
    base = {"message_id": mid, "user_key": user, "event_time_ms": ts, "type": "track", "event": VIEW}
    choice = rng.randrange(9)
    if choice == 0:
        return orjson.dumps({k: v for k, v in base.items() if k != "message_id"})
    if choice == 1:
        return orjson.dumps({k: v for k, v in base.items() if k != "user_key"})
    if choice == 2:
        return orjson.dumps(base | {"message_id": "", "event": ADD})
    if choice == 3:
        return orjson.dumps(
            {k: v for k, v in base.items() if k != "event_time_ms"} | {"timestamp": "yesterday"}
        )
    if choice == 4:
        return rng.choice([b"[1, 2, 3]", b'"just text"', b"null", b"42"])
    if choice == 5:
        return b'{"message_id": "broken'
    if choice == 6:  # the event name is not a string: refused when names are checked, else no name
        return orjson.dumps(base | {"event": rng.choice([[VIEW], {"n": 1}])})
    if choice == 7:
        return orjson.dumps({k: v for k, v in base.items() if k != "event_time_ms"} | {"timestamp": True})
    return orjson.dumps(base | {"user_key": 5})


def _user_key(rng: random.Random, u: int) -> str:
    r = rng.random()
    if r < 0.94:
        return f"u{u:05d}"
    if r < 0.96:
        return f"ü{u}"
    if r < 0.98:
        return f"u{u}-\U0001f600"
    return f"用户{u}"


def generate_history(
    seed: int,
    users: int,
    *,
    setup: TriggerSetup | None = None,
    start_ms: int = START_MS,
    bursts: tuple[int, int] = (1, 4),
    out_of_orderness_ms: int = 5 * SEC,
    malformed_fraction: float = 0.005,
    watermark_every: int = 5,
) -> list[Op]:
    """A seeded history. Per user, bursts of events (seconds to two minutes apart) separated by absences
    of minutes to half an hour, so windows fill and expire, sequences are completed or not, users return
    after ``returning_after`` and after ``remember_for``; events arrive mostly in event-time order across
    users, some minutes late and some far behind the watermark, some twice (redelivered); watermarks
    every few events with occasional jumps ahead (an idle partition), rule records mid-history (see
    :func:`_updates`) and a final MAX watermark."""
    rng = random.Random(seed)
    setup = setup if setup is not None else default_setup()
    arrivals: list[tuple[int, int, str, bytes]] = []
    n = 0
    for u in range(users):
        user = _user_key(rng, u)
        deals = rng.sample(DEALS, 3)
        country = rng.choice(["DE", "DE", "FR", None])
        ts = start_ms + rng.randrange(0, 90 * MIN)
        for b in range(rng.randint(*bursts)):
            if b:
                ts += rng.choice(
                    [
                        rng.randrange(MIN, 4 * MIN),
                        rng.randrange(5 * MIN, 8 * MIN),
                        rng.randrange(12 * MIN, 30 * MIN),
                    ]
                )
            for _ in range(rng.choices([rng.randint(1, 3), rng.randint(4, 12)], [1, 2])[0]):
                gap = [
                    rng.randrange(0, 5 * SEC),
                    rng.randrange(5 * SEC, 40 * SEC),
                    rng.randrange(40 * SEC, 2 * MIN),
                ]
                ts += rng.choices(gap, [4, 4, 1])[0]
                n += 1
                mid = rng.choice([f"m{n:07d}", f"m{n:07d}", f"m{n:07d}-\uffff", f"m{n:07d}-\U00010000"])
                r = rng.random()
                if r < 0.75:
                    delay = rng.randrange(0, 3 * SEC)
                elif r < 0.90:
                    delay = rng.randrange(0, 2 * MIN)
                elif r < 0.97:
                    delay = rng.randrange(2 * MIN, 8 * MIN)
                else:
                    delay = rng.randrange(20 * MIN, 60 * MIN)  # far behind the watermark
                if rng.random() < malformed_fraction:
                    value = _malformed(rng, user, ts, f"m{n:07d}")
                else:
                    value = orjson.dumps(_event(rng, user, ts, mid, deals, country))
                arrivals.append((ts + delay, n, user, value))
                if rng.random() < 0.03:  # redelivered, a little (or a lot) later
                    arrivals.append((ts + delay + rng.randrange(0, 15 * MIN), n, user, value))
    arrivals.sort(key=lambda a: (a[0], a[1]))
    updates = _updates()
    ops: list[Op] = [("config", setup)]
    now = start_ms + 4 * 3_600_000 + 123
    newest: int | None = None
    wm = -(2**63)
    for i, (arrive, _, user, value) in enumerate(arrivals):
        while updates and updates[0][0] * len(arrivals) <= i:
            _, rule_id, record = updates.pop(0)
            ops.append(("r", rule_id, record))
        now += rng.randrange(0, 40)
        ops.append(("e", user, value.decode(), now))
        newest = arrive if newest is None else max(newest, arrive)
        if i % watermark_every == 0 and newest - out_of_orderness_ms > wm:
            wm = newest - out_of_orderness_ms
            ops.append(("w", wm, now))
        if rng.random() < 0.0005:  # the watermark jumps ahead (an idle partition, a future-dated event)
            wm = max(wm, newest + rng.randrange(MIN, 15 * MIN))
            ops.append(("w", wm, now))
    ops.append(("w", WM_MAX, now + 1))
    return ops


# ----------------------------------------------------------------------------------------- replays


class _Counter:
    def inc(self, n: int = 1) -> None:
        pass


class _Metrics:
    def add_group(self, name: str) -> _Metrics:
        return self

    def counter(self, name: str) -> _Counter:
        return _Counter()


@dataclass
class _Flink:
    """What a ``KeyedBroadcastProcessFunction`` of one subtask sees of Flink: the current key, its
    ``ValueState`` (every key's value in ``values``), the broadcast ``MapState`` and the event-time timer
    service (one timer per (key, time), a heap in (time, key) order)."""

    key: str = ""
    values: dict[str, str] = field(default_factory=dict)
    broadcast: dict[str, str] = field(default_factory=dict)
    timers: list[tuple[int, str]] = field(default_factory=list)
    registered: set[tuple[int, str]] = field(default_factory=set)
    per_key: Counter[str] = field(default_factory=Counter)
    most: int = 0
    """The most timers one key had registered at once."""

    # runtime context
    def get_state(self, descriptor: Any) -> _Flink:
        return self

    def get_metrics_group(self) -> _Metrics:
        return _Metrics()

    def get_index_of_this_subtask(self) -> int:
        return 0

    # ValueState of the current key
    def value(self) -> str | None:
        return self.values.get(self.key)

    def update(self, value: str) -> None:
        self.values[self.key] = value

    def clear(self) -> None:
        self.values.pop(self.key, None)

    # context of the callbacks
    def get_current_key(self) -> str:
        return self.key

    def get_broadcast_state(self, descriptor: Any) -> _Broadcast:
        return _Broadcast(self.broadcast)

    def timer_service(self) -> _Flink:
        return self

    def register_event_time_timer(self, t: int) -> None:
        if (t, self.key) not in self.registered:
            self.registered.add((t, self.key))
            heapq.heappush(self.timers, (t, self.key))
            self.per_key[self.key] += 1
            self.most = max(self.most, self.per_key[self.key])

    def due(self, watermark: int) -> Iterator[tuple[int, str]]:
        """Pop the timers at or before ``watermark`` in (time, key) order, including ones registered
        while they fire."""
        while self.timers and self.timers[0][0] <= watermark:
            t, key = heapq.heappop(self.timers)
            self.registered.discard((t, key))
            self.per_key[key] -= 1
            self.key = key
            yield t, key


class _Broadcast:
    def __init__(self, data: dict[str, str]) -> None:
        self.data = data

    def put(self, key: str, value: str) -> None:
        self.data[key] = value

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(list(self.data.items()))


class _Clock:
    """Stands in for the ``time`` module in ``jobs.triggers``: ``time()`` is the op's wall clock, as a
    float that ``int(time() * 1000)`` turns back into exactly ``now_ms``."""

    def __init__(self) -> None:
        self.now = 0.0

    def set(self, now_ms: int) -> None:
        f = now_ms / 1000
        while int(f * 1000) < now_ms:
            f = math.nextafter(f, math.inf)
        while int(f * 1000) > now_ms:
            f = math.nextafter(f, -math.inf)
        self.now = f

    def time(self) -> float:
        return self.now


def replay_python(ops: list[Op], *, state_ttl_ms: int = 0) -> Replay:
    """Run ``ops`` through ``jobs.triggers.TriggerFunction`` (the production operator code: rule book,
    skip, malformed counting, reducer, state codec, timer cache, counters) over in-process stand-ins for
    Flink; ``fired_at`` is each op's ``now_ms``."""
    from jobs import triggers

    setup = ops[0][1]
    assert ops[0][0] == "config" and isinstance(setup, TriggerSetup)
    config = triggers.FunctionConfig(
        file_rules=setup.file_rules,
        snapshot=tuple((rid, r.partition, r.offset, r.value) for rid, r in setup.snapshot),
        allowlist=setup.allowlist,
        event_filter=setup.event_filter,
        state_ttl_ms=state_ttl_ms,
        log_interval_s=3600.0,
        engine=triggers.TriggersEngine.PYTHON,
    )
    out = Replay()
    lines = out.lines
    flink = _Flink()
    clock = _Clock()
    fn = triggers.TriggerFunction(config)

    def emit(rows: Iterator[Any]) -> None:
        for row in rows:
            lines.append(["a", row[0], orjson.loads(row[1])])

    with mock.patch.object(triggers, "time", clock):
        start = time.thread_time_ns()
        fn.open(flink)
        for op in ops[1:]:
            kind = op[0]
            if kind == "e":
                flink.key = op[1]
                clock.set(op[3])
                emit(fn.process_element(op[2].encode(), flink))
            elif kind == "w":
                clock.set(op[2])
                for t, _ in flink.due(op[1]):
                    emit(fn.on_timer(t, flink))
            elif kind == "t":
                flink.key = op[1]
                flink.register_event_time_timer(op[2])
            else:
                rule_id, rec = op[1], op[2]
                for _ in fn.process_broadcast_element((rule_id, rec.value, rec.partition, rec.offset), flink):
                    pass
        fn.counters.close()
        out.busy_s = (time.thread_time_ns() - start) / 1e9
    out.flink_timers = flink.most
    for key in sorted(flink.values):
        lines.append(["state", key, orjson.loads(flink.values[key])])
    lines.append(["counts", {name: fn.totals[name] for name in triggers.COUNTERS}])
    return out


def encode_java_history(ops: list[Op]) -> bytes:
    """The history as the JSON lines ``TriggerReplay`` reads (rule records compiled as the driver does)."""
    setup = ops[0][1]
    assert ops[0][0] == "config" and isinstance(setup, TriggerSetup)
    lines: list[Op] = [("config", setup.java_config())]
    for op in ops[1:]:
        if op[0] == "r":
            lines.append(("r", op[1], setup.compile(op[1], op[2])))
        else:
            lines.append(op)
    return encode_history(lines)


def replay_java(ops: list[Op], *, timeout_s: float = 600, passes: int = 1) -> Replay:
    """Run ``ops`` through the Java operator logic (``TriggerReplay``, a JVM subprocess); with ``passes``
    > 1 the JVM replays them that many times (JIT warm-up) and times and reports the last pass."""
    return run_java_replay(REPLAY_CLASS, [str(passes)], encode_java_history(ops), timeout_s)
