"""``connectors.kafka.TolerantPoll``: a consumer loop rides out a broker restart, and says so.

kafka-python 3 raises ``KafkaConnectionError`` from ``poll`` while the broker is away (seen when the chaos
test restarted Kafka: the dispatch process exited with it). The helper turns retriable errors into an
empty round, counted and logged; anything else still raises.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from connectors.kafka import TolerantPoll

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
