"""``connectors.kafka``'s consumer-loop helpers: ``TolerantPoll`` rides out a broker restart, and says so;
``GroupJoin`` joins the group once more when the first join assigned nothing.

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


def test_a_consumer_left_unassigned_joins_once_more_and_only_once(caplog: pytest.LogCaptureFixture) -> None:
    consumer = _GroupConsumer({"actions", "actions.retry"})
    join = GroupJoin(consumer, ["actions", "actions.retry"], rejoin_after_s=0.0)
    join.subscribe()
    assert join.check(assigned=True) is False  # assigned: nothing to do
    with caplog.at_level(logging.WARNING, logger="connectors.kafka"):
        assert join.check(assigned=False) is True
        assert join.check(assigned=False) is False  # an empty assignment after that is legitimate
    assert join.rejoins == 1
    topics = ("actions", "actions.retry")
    assert consumer.calls == [("subscribe", topics), ("unsubscribe", ()), ("subscribe", topics)]
    assert any("joining the group again" in r.getMessage() for r in caplog.records)


def test_a_missing_topic_delays_the_subscription_by_the_metadata_timeout_only() -> None:
    consumer = _GroupConsumer({"events.enriched"})
    assert await_topic_metadata(consumer, ["events.enriched", "sessions"], timeout_s=0.3) == ["sessions"]
    join = GroupJoin(consumer, ["events.enriched", "sessions"], metadata_timeout_s=0.3)
    join.subscribe()
    assert consumer.calls == [("subscribe", ("events.enriched", "sessions"))]
    assert join.check(assigned=False) is False  # REJOIN_AFTER_S has not passed
