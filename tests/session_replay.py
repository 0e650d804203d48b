"""Replays of recorded histories through both session implementations, for the differential test and the
bench: :func:`generate_history` makes a seeded history (events and watermarks, as one sessions operator
would see them), :func:`replay_python` runs it through :mod:`udfs.sessions` the way
``jobs.sessionize.SessionizeFunction`` does, :func:`replay_java` through the Java reducer
(``dev.clickpulse.operators.sessions.SessionReplay`` in ``clickpulse-operators.jar``), without Flink.

Both write the same transcript: ``["s", key, session_id, record]`` per session record, ``["l", key,
event JSON]`` per too-late or malformed event, then ``["state", key, dump_state JSON]`` per key still
holding state (sorted by key) and ``["counts", {name: total}]``. Timers behave as Flink's: one per (key,
time), fired in (time, key) order when a watermark reaches them, including ones registered while firing.
"""

from __future__ import annotations

import heapq
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from udfs import sessions as reducer
from udfs.timeutil import format_ms

REPO = Path(__file__).resolve().parents[1]
REPLAY_CLASS = "dev.clickpulse.operators.sessions.SessionReplay"
MIN = 60_000
WM_MAX = 2**63 - 1

Op = tuple[Any, ...]
COUNTERS = ("events", *reducer.Counts.__dataclass_fields__, "malformed")


@dataclass
class Replay:
    """A transcript (see the module docstring) and the CPU seconds of the replaying thread (the bench's
    measure: unlike wall time, it does not grow with the load of a shared box)."""

    lines: list[list[Any]] = field(default_factory=list)
    busy_s: float = 0.0
    flink_timers: int = 0
    """The most event-time timers one key had registered at once (a Java trigger replay's
    ``flink_timers`` line; 0 when not reported)."""

    @property
    def counts(self) -> dict[str, int]:
        """The ``counts`` line."""
        return next(line[1] for line in self.lines if line[0] == "counts")


def java_classpath() -> str:
    """The operators jar (``make jars``) and PyFlink's lib (Flink, its shaded Jackson, logging)."""
    import pyflink

    jar = REPO / ".clickpulse" / "jars" / "flink" / "clickpulse-operators.jar"
    if not jar.exists():
        raise FileNotFoundError(f"{jar} is missing: run `make jars`")
    lib = Path(pyflink.__file__).parent / "lib"
    return f"{jar}:{lib}/*"


# ------------------------------------------------------------------------------------------ input


def _event(rng: random.Random, user: str, ts: int, mid: str) -> dict[str, Any]:
    kind = rng.choices(["page", "track", "identify"], [6, 4, 1])[0]
    name = None
    props: dict[str, Any] = {}
    if kind == "track":
        name = rng.choice(["Product Viewed", "Product Added", "Order Completed", "Order Completed"])
        if name == "Order Completed":
            props = {
                "revenue": rng.choice([19.99, 0.1, 129, 2.675, 1e-7, 0, True, "12", None, 1234567.891]),
                "currency": rng.choice(["EUR", "EUR", "USD", None, ""]),
            }
    page = rng.random() < 0.8
    path = rng.choice(["/", "/p/1", "/p/2", "/cart", "/checkout", "/ü/ß", ""])
    e: dict[str, Any] = {
        "message_id": mid,
        "type": kind,
        "event": name,
        "anonymous_id": rng.choice([f"anon-{user}", None, ""]),
        "user_id": None,
        "user_key": user,
        "timestamp": format_ms(ts),
        "event_time_ms": ts,
        "page_url": rng.choice([f"https://shop.example{path}", "", None, 0, 1, [], ["x"]]) if page else None,
        "page_path": path if rng.random() < 0.95 else None,
        "referrer_type": rng.choice(["direct", "search", "email", None]),
        "country": rng.choice(["DE", "FR", "US", None]),
        "device_type": rng.choice(["desktop", "mobile", None]),
        "utm_source": rng.choice([None, None, "google", "newsletter", ""]),
        "utm_medium": rng.choice([None, "cpc", "email"]),
        "utm_campaign": rng.choice([None, "xmas"]),
        "utm_term": None,
        "utm_content": rng.choice([None, "a"]),
        "is_bot": False,
        "properties": props,
        "nested": {"deep": [1, {"x": [2, 3]}], "properties": {"revenue": 5}},
    }
    shape = rng.random()
    if shape < 0.01:
        del e["event_time_ms"]  # the timestamp then gives the time
    elif shape < 0.015:
        e["event_time_ms"] = float(ts)  # not an int: the timestamp gives the time
    elif shape < 0.02:
        del e["event_time_ms"]
        e["timestamp"] = ts  # epoch ms
    return e


def _malformed(rng: random.Random, user: str, ts: int, mid: str) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:
        return b'{"message_id": "broken'
    if choice == 1:
        return orjson.dumps({"message_id": mid, "event_time_ms": ts})  # no user_key
    if choice == 2:
        return orjson.dumps({"message_id": "", "user_key": user, "event_time_ms": ts})
    if choice == 3:
        return orjson.dumps({"message_id": mid, "user_key": user, "timestamp": "yesterday"})
    if choice == 4:
        return b"[1, 2, 3]"
    return orjson.dumps({"message_id": mid, "user_key": user, "timestamp": True})


def generate_history(
    seed: int,
    users: int,
    *,
    cfg: reducer.SessionConfig,
    start_ms: int = 1_795_000_000_000,
    events_per_user: tuple[int, int] = (1, 25),
    malformed_fraction: float = 0.003,
    watermark_every: int = 7,
) -> list[Op]:
    """A seeded history: per user, runs of events with gaps around and far above ``gap`` (and some users
    active for longer than ``max``), delivered mostly in event-time order across users with some events
    out of order (within the allowed lateness), some too late, duplicates, ids that tie on time, non-ASCII
    ids; watermarks (the newest event time seen minus the out-of-orderness bound) every few events, some
    jumps far ahead (closes and purges while data is still coming), and a final MAX watermark."""
    rng = random.Random(seed)
    arrivals: list[tuple[int, int, str, bytes]] = []
    n = 0
    for u in range(users):
        user = f"u{u:05d}" if rng.random() < 0.97 else f"u{u}-\U0001f600"
        ts = start_ms + rng.randrange(0, 6 * 3_600_000)
        marathon = rng.random() < 0.03
        for _ in range(rng.randint(*events_per_user) * (6 if marathon else 1)):
            step = rng.choices(
                [rng.randrange(0, 5_000), rng.randrange(5_000, cfg.gap_ms), cfg.gap_ms - 1, cfg.gap_ms,
                 rng.randrange(cfg.gap_ms, 3 * cfg.gap_ms), rng.randrange(0, cfg.gap_ms // 2)],
                [3, 5, 1, 1, 2, 6 if marathon else 0],
            )[0]  # fmt: skip
            ts += step
            n += 1
            mid = rng.choice([f"m{n:07d}", f"m{n:07d}-\uffff", f"m{n:07d}-\U00010000", f"m{n:07d}"])
            delay_kind = rng.random()
            if delay_kind < 0.80:
                delay = rng.randrange(0, cfg.out_of_orderness_ms)
            elif delay_kind < 0.95:
                delay = rng.randrange(0, cfg.allowed_lateness_ms + cfg.gap_ms)
            else:
                delay = rng.randrange(cfg.allowed_lateness_ms, 3 * cfg.allowed_lateness_ms + cfg.max_ms)
            if rng.random() < malformed_fraction:
                value = _malformed(rng, user, ts, f"m{n:07d}")
            else:
                value = orjson.dumps(_event(rng, user, ts, mid))
            arrivals.append((ts + delay, n, user, value))
            if rng.random() < 0.01:  # a duplicate, a little later
                arrivals.append((ts + delay + rng.randrange(0, 10 * MIN), n, user, value))
            if rng.random() < 0.02:  # another event at the same time, an id sorting first
                e = _event(rng, user, ts, f"a{n:07d}")
                arrivals.append((ts + delay, n, user, orjson.dumps(e)))
    arrivals.sort(key=lambda a: (a[0], a[1]))
    ops: list[Op] = []
    newest = None
    for i, (arrive, _, user, value) in enumerate(arrivals):
        ops.append(("e", user, value.decode()))
        newest = arrive if newest is None else max(newest, arrive)
        if i % watermark_every == 0:
            ops.append(("w", newest - cfg.out_of_orderness_ms - 1))
        if rng.random() < 0.0002:  # the watermark jumps ahead (an idle source, a future-dated event)
            ops.append(("w", newest + rng.randrange(0, cfg.allowed_lateness_ms + cfg.gap_ms)))
    ops.append(("w", WM_MAX))
    return ops


def encode_history(ops: list[Op]) -> bytes:
    """The history as the JSON lines :func:`replay_java` reads."""
    return b"".join(orjson.dumps(list(op)) + b"\n" for op in ops)


# ----------------------------------------------------------------------------------------- replays


def replay_python(ops: list[Op], cfg: reducer.SessionConfig) -> Replay:
    """Run ``ops`` through :mod:`udfs.sessions` as the Python operator does (JSON parse, state codec)."""
    out = Replay()
    states: dict[str, bytes] = {}
    timers: list[tuple[int, str]] = []
    registered: set[tuple[int, str]] = set()
    totals = dict.fromkeys(COUNTERS, 0)
    wm = -(2**63)
    lines = out.lines

    def apply(key: str, before: reducer.KeyState, res: reducer.StepResult, value: str | None) -> None:
        if res.state is not before:
            if res.state.is_empty():
                states.pop(key, None)
            else:
                states[key] = reducer.dump_state(res.state)
        for t in res.timers:
            if (t, key) not in registered:
                registered.add((t, key))
                heapq.heappush(timers, (t, key))
        for e in res.emits:
            if isinstance(e, reducer.SessionRecord):
                lines.append(["s", key, e.session_id, orjson.loads(e.to_json())])
            else:
                lines.append(["l", e.user_key, value])
        for name in reducer.Counts.__dataclass_fields__:
            totals[name] += getattr(res.counts, name)

    start = time.thread_time()
    for op in ops:
        if op[0] == "e":
            key, value = op[1], op[2]
            try:
                ev = reducer.Event.from_record(orjson.loads(value))
            except (orjson.JSONDecodeError, reducer.EventError, TypeError, AttributeError):
                totals["malformed"] += 1
                lines.append(["l", key, value])
                continue
            totals["events"] += 1
            before = reducer.load_state(states.get(key))
            apply(key, before, reducer.step(before, ev, wm, cfg), value)
        else:
            wm = max(wm, op[1])
            while timers and timers[0][0] <= wm:
                t, key = heapq.heappop(timers)
                registered.discard((t, key))
                before = reducer.load_state(states.get(key))
                apply(key, before, reducer.on_timer(before, t, cfg), None)
    out.busy_s = time.thread_time() - start
    for key in sorted(states):
        lines.append(["state", key, orjson.loads(states[key])])
    lines.append(["counts", totals])
    return out


def run_java_replay(main_class: str, args: list[str], history: bytes, timeout_s: float = 600) -> Replay:
    """Run a replay class of ``clickpulse-operators.jar`` on ``history`` (JSON lines on stdin) and read its
    transcript (JSON lines, the last one ``["busy_ns", n]``). Its log4j2 logging is off: without a
    configuration it would log to stdout, into the transcript."""
    res = subprocess.run(
        ["java", "-Dorg.apache.logging.log4j.level=OFF", "-cp", java_classpath(), main_class, *args],
        input=history,
        capture_output=True,
        timeout=timeout_s,
        check=False,
    )
    if res.returncode != 0:
        name = main_class.rsplit(".", 1)[-1]
        raise RuntimeError(f"{name} failed ({res.returncode}):\n{res.stderr.decode()[-3000:]}")
    out = Replay()
    for raw in res.stdout.splitlines():
        line = orjson.loads(raw)
        if line[0] == "busy_ns":
            out.busy_s = line[1] / 1e9
        elif line[0] == "flink_timers":
            out.flink_timers = line[1]
        else:
            out.lines.append(line)
    return out


def replay_java(ops: list[Op], cfg: reducer.SessionConfig, timeout_s: float = 600, passes: int = 1) -> Replay:
    """Run ``ops`` through the Java reducer (``SessionReplay``, a JVM subprocess); with ``passes`` > 1 the
    JVM replays them that many times (JIT warm-up) and times and reports the last pass."""
    args = [
        str(v) for v in (cfg.gap_ms, cfg.max_ms, cfg.allowed_lateness_ms, cfg.out_of_orderness_ms, passes)
    ]
    return run_java_replay(REPLAY_CLASS, args, encode_history(ops), timeout_s)
