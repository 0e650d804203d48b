"""Differential test: the JVM trigger operator (``connectors/jvm``, package
``dev.clickpulse.operators.triggers``) against the production Python operator
``jobs.triggers.TriggerFunction`` over the specification, the pure reducer ``udfs/rules/evaluate.py``.

Seeded histories (thousands of keys, non-ASCII and astral ones among them; every rule form: counts with
and without ``group_by`` over strings, ints, floats, booleans, lists, objects and missing values, ``where``
filters on strings, numbers, booleans and null, nested paths and ``properties`` stored as JSON text;
sequences with and without ``where``; ``returning_after`` with and without ``event``; cooldowns,
``once``, a disabled rule; events out of order, late, far behind the watermark, redelivered, malformed,
and events no rule uses; watermark jumps that expire windows, cooldowns and ``remember_for``; rule
records mid-history: a changed condition, a changed cooldown, a tombstone, invalid records, an older
offset, a redelivered record, a partition change; one setup with an event pre-filter) are replayed through
both without Flink (:mod:`tests.trigger_replay`), and the transcripts must be identical: every action (all
fields, ``fired_at`` included) in the same order per key, the same state left per key, the same counters.
Per key, because the JVM operator runs all of a key's due timers at its one wake-up timer
(``TriggerLogic``), so within one watermark advance keys take turns differently than with one Flink timer
per (key, time); nothing downstream sees an order across keys (actions are keyed by user).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import orjson
import pytest

from tests.support import enriched_event
from tests.trigger_replay import (
    ADD,
    ALLOWLIST,
    CART_ABANDON,
    MIN,
    ORDER,
    START_MS,
    WM_MAX,
    Op,
    Replay,
    TriggerSetup,
    default_setup,
    generate_history,
    replay_java,
    replay_python,
)
from udfs.rules import Allowlist, parse_rule

pytestmark = pytest.mark.job

#: every rule that must have fired (rules outside the pre-filter cannot, with one)
FIRING = {
    "views_by_deal", "add_eur", "order_pair", "premium_price", "page_no_ref", "order_total",
    "cart_abandon", "deal_seq", "welcome_back", "topic_return",
}  # fmt: skip
FIRING_UNFILTERED = {"any_return", "gift", "new_gift", "bad_host"}


def texts(r: Replay) -> list[str]:
    """The transcript as orjson writes it: unlike ``==`` on parsed JSON, this tells 7 from 7.0, -0.0 from
    0.0 and true from 1, and sees the order of keys. Actions come first, grouped by key (a stable sort:
    each key's in their order)."""
    actions = sorted((line for line in r.lines if line[0] == "a"), key=lambda line: line[1])
    rest = [line for line in r.lines if line[0] != "a"]
    return [orjson.dumps(line).decode() for line in actions + rest]


def assert_same(py: Replay, java: Replay) -> None:
    a, b = texts(py), texts(java)
    if a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        pytest.fail(
            f"first difference at line {i} (python {len(a)} lines, java {len(b)}):\n"
            f" python: {a[i] if i < len(a) else '(none)'}\n java:   {b[i] if i < len(b) else '(none)'}"
        )


def check_coverage(py: Replay, users: int, filtered: bool) -> None:
    """The history exercised what it is meant to."""
    counts = py.counts
    assert counts["events"] > 10 * users
    for name, least in [
        ("fires", 20 * users // 10),
        ("suppressed", 100),
        ("timers_fired", 5 * users),
        ("malformed", 50),
        ("skipped", 500),
    ]:
        assert counts[name] > least, (name, counts)
    assert counts["rule_updates"] == 13, counts  # 15 records: one older offset, one redelivered
    assert counts["rules_invalid"] == 3, counts  # a bad host in the snapshot, a bad count, a bad id
    # with the pre-filter: gift (at start), any_return, new_gift, bad_host (when they arrive)
    assert counts["rules_outside_filter"] == (4 if filtered else 0), counts
    fired = Counter(line[2]["rule_id"] for line in py.lines if line[0] == "a")
    expected = FIRING | (set() if filtered else FIRING_UNFILTERED)
    assert set(fired) == expected, fired
    assert all(fired[r] >= 5 for r in expected), fired
    assert any(line[0] == "state" for line in py.lines), "once: true keeps state after the end"


@pytest.mark.parametrize(
    ("seed", "users", "filtered", "options"),
    [
        (1, 4000, False, {}),
        (2, 3000, True, {}),
        # a slow watermark after every event, longer activity: more late-but-counted events, more state
        (3, 2000, False, {"out_of_orderness_ms": 2 * MIN, "watermark_every": 1, "bursts": (2, 6)}),
    ],
    ids=["4000-keys", "3000-keys-event-filter", "2000-keys-slow-watermark"],
)
def test_java_reducer_matches_python_reducer(
    seed: int, users: int, filtered: bool, options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="clickpulse.triggers")  # not a warning per malformed event
    ops = generate_history(seed, users, setup=default_setup(event_filter=filtered), **options)
    py = replay_python(ops)
    check_coverage(py, users, filtered)
    started = time.monotonic()
    java = replay_java(ops)
    print(
        f"python {py.busy_s:.2f}s busy, java {java.busy_s:.2f}s busy ({time.monotonic() - started:.1f}s wall)"
    )
    assert_same(py, java)
    # the JVM operator keeps one Flink timer per key; one per (key, time) gave several
    assert java.flink_timers == 1 < py.flink_timers, (java.flink_timers, py.flink_timers)


def test_timers_restored_from_a_checkpoint_of_one_timer_per_time() -> None:
    """A checkpoint taken before the JVM operator kept one timer per key restores a key's timers one per
    time, none of them in the key's kept timers: each runs as one more kept timer (at a time the key also
    keeps or not, before or after the key's own wake-up timer), with the transcript of the Python
    operator, which fires every one of them."""
    ops = generate_history(5, 300)
    restored: list[Op] = []
    watermark, n = START_MS, 0
    for op in ops:
        restored.append(op)
        if op[0] == "w":
            watermark = op[1]
        elif op[0] == "e":
            n += 1
            if n % 7 == 0:  # on a clean-up minute (as the old timers were), or between two
                at = -(-watermark // MIN) * MIN + (n % 5) * MIN + (0 if n % 2 else 17)
                restored.append(("t", op[1], at))
    py, java = replay_python(restored), replay_java(restored)
    assert_same(py, java)
    assert py.counts["timers_fired"] > replay_python(ops).counts["timers_fired"]


def test_python_replay_is_deterministic() -> None:
    """The harness itself: the same history gives the same transcript (wall clock pinned per op)."""
    ops = generate_history(4, 300)
    assert replay_python(ops).lines == replay_python(ops).lines


def test_a_deadline_registered_again_after_its_timer_fired_on_an_empty_state() -> None:
    """A sequence is cancelled (state empty), its deadline timer fires on the empty state, then the first
    event is redelivered: the same (user, deadline) timer is asked for again and must fire (the spec,
    ``udfs.rules.on_timer``: the deadline has passed, the rule fires)."""
    setup = TriggerSetup(file_rules=(parse_rule(CART_ABANDON, Allowlist.parse(ALLOWLIST)),), snapshot=())
    added = enriched_event("u1", ADD, START_MS) | {"message_id": "m1"}
    ordered = enriched_event("u1", ORDER, START_MS + MIN) | {"message_id": "m2"}
    now = START_MS + 3_600_000
    ops: list[Op] = [
        ("config", setup),
        ("e", "u1", orjson.dumps(added).decode(), now),
        ("e", "u1", orjson.dumps(ordered).decode(), now + 1),  # cancels: no state left
        ("w", START_MS + 4 * MIN, now + 2),  # the deadline timer fires on the empty state
        ("e", "u1", orjson.dumps(added).decode(), now + 3),  # redelivered: pending again, same deadline
        ("w", WM_MAX, now + 4),
    ]
    py, java = replay_python(ops), replay_java(ops)
    assert [line[2]["rule_id"] for line in java.lines if line[0] == "a"] == ["cart_abandon"]
    assert_same(py, java)
