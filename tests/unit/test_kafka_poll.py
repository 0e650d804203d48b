"""``connectors.kafka``'s consumer-loop helpers: ``TolerantPoll`` rides out a broker restart, and says so;
``GroupJoin`` joins the group again while the consumer is left without partitions.

kafka-python 3 raises ``KafkaConnectionError`` from ``poll`` while the broker is away (seen when the chaos
test restarted Kafka: the dispatch process exited with it). The helper turns retriable errors into an
empty round, counted and logged; anything else still raises.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from connectors.kafka import GroupJoin, TolerantPoll, await_topic_metadata

pytestmark = pytest.mark.unit


class _Consumer:
    """Answers each ``poll`` with the next scripted outcome (an exception is raised)."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[dict[str, Any]] = []

    def poll(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def test_a_broker_outage_is_an_empty_round_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    records = {"tp": ["r1", "r2"]}
    consumer = _Consumer(
        KafkaConnectionError("111 ECONNREFUSED"), KafkaConnectionError("111 ECONNREFUSED"), records
    )
    poll = TolerantPoll("dispatch", backoff_s=0.0)
    with caplog.at_level(logging.INFO, logger="connectors.kafka"):
        assert poll(consumer, 100) == {}
        assert poll(consumer, 100) == {}
        assert poll(consumer, 100, max_records=5) == records
    assert poll.errors == 2
    assert consumer.calls[-1] == {"timeout_ms": 100, "max_records": 5}
    messages = [r.getMessage() for r in caplog.records]
    # one warning for the outage (rate-limited), one line when it is over
    assert sum("Kafka unavailable" in m for m in messages) == 1
    assert any("dispatch" in m and "reachable again after 2 failed polls" in m for m in messages)


def test_an_error_that_retrying_cannot_fix_still_raises() -> None:
    consumer = _Consumer(TopicAuthorizationFailedError("denied"))
    poll = TolerantPoll("loader", backoff_s=0.0)
    with pytest.raises(TopicAuthorizationFailedError):
        poll(consumer, 100)
    assert poll.errors == 0


class _GroupConsumer:
    """Knows the metadata of ``known`` topics; records subscribe/unsubscribe calls."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {0} if topic in self.known else None

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        self.calls.append(("subscribe", tuple(topics)))

    def unsubscribe(self) -> None:
        self.calls.append(("unsubscribe", ()))


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_consumer_left_unassigned_joins_again_less_and_less_often(caplog: pytest.LogCaptureFixture) -> None:
    consumer = _GroupConsumer({"actions", "actions.retry"})
    clock = _Clock()
    topics = ("actions", "actions.retry")
    join = GroupJoin(consumer, list(topics), rejoin_after_s=10.0, max_wait_s=30.0, clock=clock)
    join.subscribe()
    assert consumer.calls == [("subscribe", topics)]
    with caplog.at_level(logging.WARNING, logger="connectors.kafka"):
        clock.now += 10.0
        assert join.check(assigned=False) is False  # not longer than the wait yet
        clock.now += 0.5
        assert join.check(assigned=False) is True  # unassigned for 10.5 s since subscribing
        clock.now += 15.0
        assert join.check(assigned=False) is False  # the wait doubled to 20 s
        clock.now += 5.5
        assert join.check(assigned=False) is True
        for _ in range(3):  # then every 30 s at most (max_wait_s)
            clock.now += 30.0
            assert join.check(assigned=False) is False
            clock.now += 0.5
            assert join.check(assigned=False) is True
    assert join.rejoins == 5
    assert consumer.calls == [("subscribe", topics)] + [("unsubscribe", ()), ("subscribe", topics)] * 5
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 5 and all("joining the group again" in m for m in warnings)


def test_a_revoked_assignment_that_does_not_come_back_is_asked_for_again() -> None:
    consumer = _GroupConsumer({"events.enriched"})
    clock = _Clock()
    join = GroupJoin(consumer, ["events.enriched"], rejoin_after_s=10.0, clock=clock)
    join.subscribe()
    clock.now += 1.0
    assert join.check(assigned=True) is False
    clock.now += 600.0  # held partitions for ten minutes, then a rebalance took them all
    assert join.check(assigned=False) is False  # the clock starts now, not at subscribe time
    clock.now += 9.0
    assert join.check(assigned=True) is False  # a normal rebalance: back within the wait
    clock.now += 1.0
    assert join.check(assigned=False) is False
    clock.now += 10.5
    assert join.check(assigned=False) is True
    assert join.rejoins == 1
    clock.now += 1.0
    assert join.check(assigned=True) is False  # assigned again: the wait is back to 10 s
    assert join.check(assigned=False) is False
    clock.now += 10.5
    assert join.check(assigned=False) is True


def test_a_missing_topic_delays_the_subscription_by_the_metadata_timeout_only() -> None:
    consumer = _GroupConsumer({"events.enriched"})
    assert await_topic_metadata(consumer, ["events.enriched", "sessions"], timeout_s=0.3) == ["sessions"]
    join = GroupJoin(consumer, ["events.enriched", "sessions"], metadata_timeout_s=0.3)
    join.subscribe()
    assert consumer.calls == [("subscribe", ("events.enriched", "sessions"))]
    assert join.check(assigned=False) is False  # REJOIN_AFTER_S has not passed
