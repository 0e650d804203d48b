"""The trigger reducer: every rule form, cooldown/once, rule updates, expiry and determinism."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import pytest

from tests.support import DEAL_PROMO_WHEN
from udfs.rules import (
    CountState,
    Event,
    EventError,
    Fire,
    Rule,
    Rules,
    Timer,
    UserState,
    dump_state,
    evaluate,
    load_state,
    on_timer,
    parse_rule,
    step,
)
from udfs.timeutil import format_ms, parse_timestamp_ms

pytestmark = pytest.mark.unit

T0 = parse_timestamp_ms("2026-11-22T20:00:00.000Z")
SEC = 1_000
MIN = 60 * SEC
HOUR = 60 * MIN
DAY = 24 * HOUR
NOW = T0 + 10 * 365 * DAY  # wall clock: only used for fired_at
HOOK = {"webhook": {"url": "http://127.0.0.1:8099/hooks"}}


def rule(rid: str, when: dict[str, Any], **extra: Any) -> Rule:
    return parse_rule({"id": rid, "when": when, "action": HOOK, **extra})


DEAL = rule("deal_promo", DEAL_PROMO_WHEN, cooldown="24h")
CART = rule(
    "cart_abandoned", {"sequence": {"first": "Product Added", "then_not": "Order Completed", "within": "30m"}}
)
BACK = rule("returning_visitor", {"returning_after": "7d"})

_counter = iter(range(1_000_000))


def ev(
    name: str | None, at_ms: int, user: str = "u1", msg: str | None = None, type_: str = "track", **props: Any
) -> Event:
    record = {
        "message_id": msg or f"m{next(_counter)}",
        "type": type_,
        "event": name,
        "user_key": user,
        "timestamp": format_ms(at_ms),
        "properties": props,
        "country": "US",
    }
    return Event.from_record(record)


def view(at_ms: int, deal: str = "LAS-DEC", **kw: Any) -> Event:
    return ev("Product Viewed", at_ms, deal_id=deal, **kw)


class Run:
    """Feeds events and timers through the reducer, collecting fires and registered timers."""

    def __init__(self, *rules: Rule) -> None:
        self.rules = Rules.of(rules)
        self.state = UserState()
        self.fires: list[Fire] = []
        self.timers: set[int] = set()
        self.suppressed: list[str] = []  # rule ids whose condition held during a cooldown / after once

    def events(self, events: Iterable[Event]) -> list[Fire]:
        new: list[Fire] = []
        for e in events:
            self.state, fires, timers = step(self.state, e, self.rules, NOW, suppressed=self.suppressed)
            new += fires
            self.timers |= {t.at_ms for t in timers}
        self.fires += new
        return new

    def watermark(self, at_ms: int) -> list[Fire]:
        """Fire every registered timer up to ``at_ms`` in order, as Flink would."""
        new: list[Fire] = []
        while due := sorted(t for t in self.timers if t <= at_ms):
            t = due[0]
            self.timers.discard(t)
            self.state, fires, timers = on_timer(
                self.state, Timer(t), self.rules, NOW, suppressed=self.suppressed
            )
            new += fires
            self.timers |= {x.at_ms for x in timers}
        self.fires += new
        return new

    def roundtrip(self) -> None:
        self.state = load_state(dump_state(self.state))


# ---------------------------------------------------------------------------------------------- count


def test_airline_fires_exactly_once_on_fourth_view() -> None:
    run = Run(DEAL)
    views = [view(T0 + i * 5 * MIN) for i in range(6)]
    assert run.events(views[:3]) == []
    fires = run.events(views[3:4])
    assert len(fires) == 1
    action = fires[0].to_action()
    assert action["rule_id"] == "deal_promo" and action["user_key"] == "u1"
    assert [e["message_id"] for e in action["events"]] == [v.message_id for v in views[:4]]
    assert action["events"][0] == {
        "message_id": views[0].message_id,
        "event": "Product Viewed",
        "timestamp": "2026-11-22T20:00:00.000Z",
        "properties": {"deal_id": "LAS-DEC"},
    }
    assert action["event_time"] == format_ms(T0 + 15 * MIN)
    assert action["fired_at"] == format_ms(NOW)
    assert action["details"]["group"] == {"properties.deal_id": "LAS-DEC"}
    assert run.events(views[4:]) == []  # cooldown


def test_window_is_sliding() -> None:
    run = Run(DEAL)
    # 0, 10, 20, 31: no 30-minute span holds four views
    assert run.events([view(T0 + m * MIN) for m in (0, 10, 20, 31)]) == []
    # 35: 10, 20, 31, 35 lie within 25 minutes
    fires = run.events([view(T0 + 35 * MIN)])
    assert len(fires) == 1
    assert [e["timestamp"] for e in fires[0].to_action()["events"]] == [
        format_ms(T0 + m * MIN) for m in (10, 20, 31, 35)
    ]


def test_window_bounds_are_inclusive() -> None:
    run = Run(DEAL)
    assert len(run.events([view(T0 + m * MIN) for m in (0, 10, 20, 30)])) == 1


def test_views_of_different_deals_do_not_add_up() -> None:
    run = Run(DEAL)
    assert run.events([view(T0 + i * MIN, deal=f"D{i}") for i in range(4)]) == []
    # interleaved: each deal reaches four views on its own
    fires = run.events([view(T0 + (10 + i) * MIN, deal=("A" if i % 2 else "B")) for i in range(8)])
    assert sorted(f.to_action()["details"]["group"]["properties.deal_id"] for f in fires) == ["A", "B"]


def test_events_without_the_group_path_are_ignored() -> None:
    run = Run(DEAL)
    assert run.events([ev("Product Viewed", T0 + i * MIN) for i in range(5)]) == []
    assert run.state.is_empty()


def test_where_filters() -> None:
    r = rule(
        "lv",
        {
            "event": "Product Viewed",
            "where": {"properties.dest": "LAS", "country": "US"},
            "count_at_least": 2,
            "within": "1h",
        },
    )
    run = Run(r)
    assert (
        run.events([ev("Product Viewed", T0, dest="NYC"), ev("Product Viewed", T0 + MIN, dest="NYC")]) == []
    )
    assert run.events([ev("Product Added", T0 + 2 * MIN, dest="LAS")]) == []
    assert run.events([ev("Product Viewed", T0 + 3 * MIN, dest="LAS")]) == []
    fires = run.events([ev("Product Viewed", T0 + 4 * MIN, dest="LAS")])
    assert len(fires) == 1
    assert fires[0].events[0]["properties"] == {"dest": "LAS"}
    assert fires[0].events[0]["fields"] == {"country": "US"}


def test_cooldown_suppresses_then_allows() -> None:
    run = Run(DEAL)
    assert len(run.events([view(T0 + i * MIN) for i in range(4)])) == 1
    # four more views an hour later: inside the 24h cooldown; the 4th completes a window (suppressed)
    assert run.events([view(T0 + HOUR + i * MIN) for i in range(4)]) == []
    assert run.suppressed == ["deal_promo"]
    # keeps only count_at_least - 1 entries while suppressed
    group = next(iter(run.state.rules["deal_promo"].groups.values()))  # type: ignore[union-attr]
    assert len(group.hits) == 3
    # 24h after the fire (event time of the 4th view = T0+3m): three recent views, then the one that fires
    base = T0 + 3 * MIN + DAY
    assert run.events([view(base - 10 * MIN), view(base - 5 * MIN), view(base - 1)]) == []
    assert len(run.events([view(base)])) == 1


def test_cooldown_is_per_group() -> None:
    run = Run(DEAL)
    assert len(run.events([view(T0 + i * MIN, deal="A") for i in range(4)])) == 1
    assert len(run.events([view(T0 + (5 + i) * MIN, deal="B") for i in range(4)])) == 1


def test_no_cooldown_fires_again_after_n_more() -> None:
    r = rule("c", {"event": "Product Viewed", "count_at_least": 2, "within": "10m"})
    run = Run(r)
    fires = run.events([ev("Product Viewed", T0 + i * MIN) for i in range(5)])
    assert len(fires) == 2  # 2nd and 4th: the window restarts after a fire
    assert run.state.is_empty() is False


def test_once_ever_per_group() -> None:
    r = rule(
        "once",
        {"event": "Product Viewed", "group_by": ["properties.deal_id"], "count_at_least": 2, "within": "1h"},
        once=True,
    )
    run = Run(r)
    assert len(run.events([view(T0), view(T0 + MIN)])) == 1
    assert run.events([view(T0 + 2 * MIN), view(T0 + 3 * MIN)]) == []
    assert run.suppressed == ["once"]
    run.watermark(T0 + 400 * DAY)
    run.roundtrip()
    assert run.events([view(T0 + 400 * DAY + i) for i in range(3)]) == []
    assert len(run.events([view(T0 + 401 * DAY, deal="B"), view(T0 + 401 * DAY + 1, deal="B")])) == 1


def test_single_event_rule_without_within() -> None:
    r = rule("order", {"event": "Order Completed", "where": {"utm_source": "google"}}, once=True)
    run = Run(r)
    e = Event.from_record(
        {
            "message_id": "o1",
            "event": "Order Completed",
            "user_key": "u1",
            "timestamp": T0,
            "utm_source": "google",
        }
    )
    assert len(run.events([e])) == 1
    assert run.events([ev("Order Completed", T0 + MIN)]) == []


def test_redelivered_event_is_not_counted_twice() -> None:
    run = Run(DEAL)
    dup = view(T0, msg="same")
    assert run.events([dup, dup, dup, view(T0 + MIN)]) == []
    assert len(run.events([view(T0 + 2 * MIN), view(T0 + 3 * MIN)])) == 1


def test_out_of_order_within_window_counts_and_too_late_is_ignored() -> None:
    run = Run(DEAL)
    assert run.events([view(T0 + 60 * MIN), view(T0 + 50 * MIN), view(T0 + 10 * MIN)]) == []  # 10 is too late
    assert run.events([view(T0 + 20 * MIN)]) == []  # 20 is before 60 - 30
    assert run.events([view(T0 + 40 * MIN)]) == []
    fires = run.events([view(T0 + 35 * MIN)])
    assert [e["timestamp"] for e in fires[0].to_action()["events"]] == [
        format_ms(T0 + m * MIN) for m in (35, 40, 50, 60)
    ]


# ------------------------------------------------------------------------------------------- sequence


def test_sequence_fires_on_timer_when_no_b_came() -> None:
    run = Run(CART)
    a = ev("Product Added", T0)
    assert run.events([a, ev("Product Viewed", T0 + MIN)]) == []
    assert T0 + 30 * MIN in run.timers
    assert run.watermark(T0 + 30 * MIN - 1) == []
    fires = run.watermark(T0 + 30 * MIN)
    assert len(fires) == 1
    action = fires[0].to_action()
    assert action["events"][0]["message_id"] == a.message_id
    assert action["event_time"] == format_ms(T0 + 30 * MIN)
    assert action["details"]["missing"] == "Order Completed"
    assert run.state.is_empty()
    # a timer firing again changes nothing
    assert on_timer(run.state, Timer(T0 + 30 * MIN), run.rules, NOW)[1] == []


def test_sequence_b_cancels() -> None:
    run = Run(CART)
    run.events([ev("Product Added", T0), ev("Order Completed", T0 + 29 * MIN)])
    assert run.watermark(T0 + DAY) == []
    assert run.state.is_empty()


def test_sequence_b_too_late_or_before_a_does_not_cancel() -> None:
    run = Run(CART)
    run.events(
        [ev("Order Completed", T0 - MIN), ev("Product Added", T0), ev("Order Completed", T0 + 31 * MIN)]
    )
    assert len(run.watermark(T0 + 31 * MIN)) == 1


def test_sequence_keeps_first_pending_and_rearms_after_resolution() -> None:
    run = Run(CART)
    first = ev("Product Added", T0)
    run.events([first, ev("Product Added", T0 + 10 * MIN)])
    fires = run.watermark(T0 + 30 * MIN)
    assert [f.events[0]["message_id"] for f in fires] == [first.message_id]
    run.events([ev("Product Added", T0 + 40 * MIN)])
    assert len(run.watermark(T0 + 70 * MIN)) == 1


def test_sequence_cooldown() -> None:
    r = rule(
        "cart",
        {"sequence": {"first": "Product Added", "then_not": "Order Completed", "within": "30m"}},
        cooldown="6h",
    )
    run = Run(r)
    run.events([ev("Product Added", T0)])
    assert len(run.watermark(T0 + HOUR)) == 1
    run.events([ev("Product Added", T0 + 2 * HOUR)])
    assert run.watermark(T0 + 3 * HOUR) == []
    assert run.suppressed == ["cart"]
    run.events([ev("Product Added", T0 + 7 * HOUR)])
    assert len(run.watermark(T0 + 8 * HOUR)) == 1
    run.watermark(T0 + 2 * DAY)
    assert run.state.is_empty()


# ------------------------------------------------------------------------------------------ returning


def test_returning_after_absence() -> None:
    run = Run(BACK)
    assert run.events([ev(None, T0, type_="page")]) == []  # first visit ever: not "returning"
    assert run.events([ev("Product Viewed", T0 + 3 * DAY)]) == []
    assert run.events([ev(None, T0 + 6 * DAY, type_="identify")]) == []  # not activity
    back = ev("Product Viewed", T0 + 10 * DAY + 1)
    fires = run.events([back])
    assert len(fires) == 1
    assert fires[0].events[0]["message_id"] == back.message_id
    assert fires[0].details["previous_seen"] == format_ms(T0 + 3 * DAY)
    assert run.events([ev("Product Viewed", T0 + 10 * DAY + HOUR)]) == []
    assert run.suppressed == []  # back within the day: not a return at all, nothing held back


def test_returning_forgets_after_remember_for() -> None:
    run = Run(BACK)
    run.events([ev("Page", T0)])
    run.watermark(T0 + 91 * DAY)
    assert run.state.is_empty()
    assert run.events([ev("Page", T0 + 92 * DAY)]) == []


# --------------------------------------------------------------------------------------- rule changes


def test_rule_change_drops_state_but_webhook_change_keeps_it() -> None:
    run = Run(DEAL)
    run.events([view(T0 + i * MIN) for i in range(3)])
    moved = parse_rule(
        {
            "id": "deal_promo",
            "when": DEAL_PROMO_WHEN,
            "cooldown": "12h",
            "action": {"webhook": {"url": "http://127.0.0.1:9000/other"}},
        }
    )
    run.rules = Rules.of([moved])
    assert len(run.events([view(T0 + 3 * MIN)])) == 1

    run = Run(DEAL)
    run.events([view(T0 + i * MIN) for i in range(3)])
    five = rule(
        "deal_promo",
        {"event": "Product Viewed", "group_by": ["properties.deal_id"], "count_at_least": 5, "within": "30m"},
    )
    run.rules = Rules.of([five])
    assert run.events([view(T0 + 3 * MIN)]) == []  # old views were dropped with the old condition
    assert run.events([view(T0 + (4 + i) * MIN) for i in range(3)]) == []
    assert len(run.events([view(T0 + 8 * MIN)])) == 1


def test_rule_removal_and_disable_drop_state_mid_stream() -> None:
    run = Run(DEAL, CART)
    run.events([view(T0), view(T0 + MIN), ev("Product Added", T0 + 2 * MIN)])
    assert set(run.state.rules) == {"deal_promo", "cart_abandoned"}
    run.rules = run.rules.without("cart_abandoned")
    run.events([view(T0 + 3 * MIN, deal="other")])
    assert set(run.state.rules) == {"deal_promo"}
    assert run.watermark(T0 + HOUR) == []  # the removed rule never fires

    run = Run(DEAL)
    run.events([view(T0), view(T0 + MIN), view(T0 + 2 * MIN)])
    run.rules = run.rules.with_rule(
        parse_rule({"id": DEAL.id, "enabled": False, "when": {"event": "X"}, "action": HOOK})
    )
    assert run.events([view(T0 + 3 * MIN)]) == []
    assert run.state.is_empty()
    state, fires, _ = on_timer(
        UserState("u1", {"ghost": CountState("f", {})}), Timer(T0), Rules.of([DEAL]), NOW
    )
    assert state.is_empty() and fires == []


# ------------------------------------------------------------------------------------ state and ids


def test_state_bounded_and_cleared_after_expiry() -> None:
    run = Run(DEAL, CART, BACK)
    for i in range(200):
        run.events([view(T0 + i * 20 * SEC, deal=f"D{i % 7}"), ev("Product Added", T0 + i * 20 * SEC)])
    deal_state = run.state.rules["deal_promo"]
    assert isinstance(deal_state, CountState)
    assert all(len(g.hits) <= DEAL.when.count_at_least - 1 for g in deal_state.groups.values())  # type: ignore[union-attr]
    assert len(dump_state(run.state)) < 2_000
    run.watermark(T0 + 200 * DAY)
    assert run.state.is_empty()
    assert dump_state(run.state) == b""
    assert run.timers == set()


def test_groups_per_rule_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate, "MAX_GROUPS_PER_RULE", 10)
    run = Run(DEAL)
    run.events([view(T0 + i * SEC, deal=f"D{i}") for i in range(50)])
    deal_state = run.state.rules["deal_promo"]
    assert isinstance(deal_state, CountState)
    assert len(deal_state.groups) == 10
    assert {orjson.loads(k)[0] for k in deal_state.groups} == {f"D{i}" for i in range(40, 50)}


def test_timers_are_coarse_for_cleanup_and_exact_for_deadlines() -> None:
    rules = Rules.of([DEAL, CART])
    _, _, timers = step(UserState(), view(T0 + 7 * SEC), rules, NOW)
    assert timers == [Timer(T0 + 31 * MIN)]  # rounded up to the minute
    _, _, timers = step(UserState(), ev("Product Added", T0 + 7 * SEC), rules, NOW)
    assert timers == [Timer(T0 + 7 * SEC + 30 * MIN)]


def test_state_roundtrip() -> None:
    run = Run(DEAL, CART, BACK)
    run.events([view(T0), view(T0 + MIN, deal="B"), ev("Product Added", T0), ev("Page", T0 + 2 * MIN)])
    run.events([view(T0 + i * MIN, deal="C") for i in range(4)])
    data = dump_state(run.state)
    assert load_state(data) == run.state
    assert load_state(b"") == UserState() and load_state(None) == UserState()
    with pytest.raises(ValueError, match="version"):
        load_state(orjson.dumps({"v": 99, "r": {}}))


def test_action_ids_are_deterministic_across_replay_and_restore() -> None:
    script = [view(T0 + i * MIN, msg=f"v{i}") for i in range(4)] + [
        ev("Product Added", T0 + 5 * MIN, msg="a1")
    ]
    script += [ev("Page", T0 + 20 * DAY, msg="p1")]

    def play(restore_after: int | None) -> list[str]:
        run = Run(DEAL, CART, BACK)
        for i, e in enumerate(script):
            run.events([e])
            if restore_after == i:
                run.roundtrip()
        run.watermark(T0 + 40 * DAY)
        return [f.action_id for f in run.fires]

    first = play(None)
    assert len(first) == 3 and len(set(first)) == 3
    assert play(None) == first
    assert play(2) == first
    other_user = Run(DEAL)
    other_user.events([view(T0 + i * MIN, msg=f"w{i}", user="u2") for i in range(4)])
    assert other_user.fires[0].action_id != first[0]
    assert all(len(a) == 64 for a in first)


def test_action_ids_do_not_depend_on_the_user_key_an_event_was_resolved_to() -> None:
    """A replay that resolves the same events to another user_key (an identity lookup that failed open
    during the first run and succeeds on the replay) fires with the same ids, so receivers deduplicate."""

    def play(user: str) -> list[Fire]:
        run = Run(DEAL, CART, BACK)
        run.events([view(T0 + i * MIN, msg=f"v{i}", user=user) for i in range(4)])
        run.events([ev("Product Added", T0 + 5 * MIN, msg="a1", user=user)])
        run.events([ev("Page", T0 + 20 * DAY, msg="p1", user=user)])
        run.watermark(T0 + 40 * DAY)
        return run.fires

    fell_back, resolved = play("anon-7"), play("user-7")
    assert [f.rule_id for f in fell_back] == [f.rule_id for f in resolved] and len(resolved) == 3
    assert [f.action_id for f in fell_back] == [f.action_id for f in resolved]
    assert {f.user_key for f in fell_back} == {"anon-7"} and {f.user_key for f in resolved} == {"user-7"}


def test_event_from_record_validation() -> None:
    ok = Event.from_record(
        {"message_id": "m", "user_key": "u", "timestamp": "2026-11-22T20:00:00Z", "event": "E"}
    )
    assert ok.ts_ms == T0 and ok.name == "E"
    assert Event.from_record({"message_id": "m", "user_key": "u", "timestamp": T0}).ts_ms == T0
    fast = {"message_id": "m", "user_key": "u", "timestamp": "2026-11-22T20:00:00Z", "event_time_ms": T0 + 1}
    assert Event.from_record(fast).ts_ms == T0 + 1  # the enricher's epoch-ms field wins
    for bad in (
        {"user_key": "u", "timestamp": T0},
        {"message_id": "m", "timestamp": T0},
        {"message_id": "m", "user_key": "u", "timestamp": "yesterday"},
    ):
        with pytest.raises(EventError):
            Event.from_record(bad)
