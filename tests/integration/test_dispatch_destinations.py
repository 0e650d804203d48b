"""An action cannot choose where it goes or how it is signed: only the rule book decides.

The dispatch loop runs against the real local Kafka (its own contract topics) and real HTTP receivers:
one at the rule's URL, one at the URL a forged action names. Actions naming an unknown rule, carrying
their own ``url``/``secret``/``headers``/``webhook``, or naming a rule from the ``rules`` topic that
wants its HMAC keyed with ``CLICKHOUSE_URL`` reach no one except as ``actions.dlq`` records; an action
of a known rule that carries such fields goes to the rule's webhook only, signed with the rule's secret.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from connectors.actions import ActionDispatch, DispatchConfig
from connectors.webhook import RetryPolicy, verify_signature, verify_standard_signature
from udfs.rules import parse_rule

pytestmark = [pytest.mark.integration, pytest.mark.fault]

SECRET = "dispatch-destinations-secret-\u2713"
CLICKHOUSE_URL = "http://default:ch-password@127.0.0.1:8123"


@dataclass
class Receiver:
    """A real HTTP server recording every request (body, headers, whether both signatures verify)."""

    server: HTTPServer
    hits: list[tuple[str, dict[str, Any], dict[str, str], bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, request: Request) -> Response:
        body = request.get_data()
        h = request.headers
        signed = verify_signature(
            SECRET, body, h.get("X-Clickpulse-Signature")
        ) and verify_standard_signature(
            SECRET, body, h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
        )
        with self.lock:
            self.hits.append((request.path, orjson.loads(body), dict(h), signed))
        return Response("{}", status=200, content_type="application/json")


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    made = []
    for _ in range(2):
        server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        rec = Receiver(server)
        server.expect_request("", method="POST").respond_with_handler(rec.handle)
        server.start()
        made.append(rec)
    yield made[0], made[1]
    for rec in made:
        rec.server.clear()
        if rec.server.is_running():
            rec.server.stop()


def read_all(bootstrap: str, topic: str) -> list[Any]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
    )
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or set()])
    out = list(consumer)
    consumer.close()
    return out


def test_actions_reach_only_their_rules_webhook_or_the_dlq(
    job_env: dict[str, str], receivers: tuple[Receiver, Receiver]
) -> None:
    rule_rx, evil_rx = receivers
    bootstrap = job_env["KAFKA_BOOTSTRAP_SERVERS"]
    prefix = job_env["CLICKPULSE_TOPIC_PREFIX"]
    evil_url = evil_rx.server.url_for("/stolen")
    known = parse_rule(
        {
            "id": "known",
            "when": {"event": "X"},
            "action": {"webhook": {"url": rule_rx.server.url_for("/known")}},
        }
    )
    # a rule published on the topic that wants its HMAC keyed with CLICKHOUSE_URL's value
    greedy = {
        "id": "greedy",
        "when": {"event": "X"},
        "action": {"webhook": {"url": rule_rx.server.url_for("/greedy"), "secret_env": "CLICKHOUSE_URL"}},
    }
    own_destination = {
        "url": evil_url,
        "secret": "attacker-secret",
        "headers": {"X-Evil": "1", "Authorization": "Bearer stolen"},
        "webhook": {"url": evil_url, "secret_env": "CLICKPULSE_WEBHOOK_SECRET"},
        "action": {"webhook": {"url": evil_url}},
    }
    actions: dict[str, dict[str, Any]] = {
        "a" * 64: {"rule_id": "nope"},
        "b" * 64: {"rule_id": "nope", **own_destination},
        "c" * 64: {"rule_id": "greedy"},
        "d" * 64: {"rule_id": "greedy", **own_destination},
        "e" * 64: {"rule_id": "known", **own_destination},
        "f" * 64: {"rule_id": "known"},
    }
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    producer.send(f"{prefix}rules", key=b"greedy", value=orjson.dumps(greedy))
    for action_id, extra in actions.items():
        record = {"action_id": action_id, "user_key": "u1", "fired_at": "2026-11-22T20:00:01.000Z", **extra}
        producer.send(f"{prefix}actions", key=b"u1", value=orjson.dumps(record))
    producer.flush()
    producer.close()

    config = DispatchConfig(
        bootstrap=bootstrap,
        actions_topic=f"{prefix}actions",
        dlq_topic=f"{prefix}actions.dlq",
        rules_topic=f"{prefix}rules",
        group_id="t-dispatch-destinations",
        policy=RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.05),
        rules_wait_s=0.5,
        log_interval_s=60,
    )
    environ = {"CLICKPULSE_WEBHOOK_SECRET": SECRET, "CLICKHOUSE_URL": CLICKHOUSE_URL}
    dispatch = ActionDispatch(config, [known], environ)
    stop, caught_up = threading.Event(), threading.Event()
    caught_up.set()  # return once every action already in the topic is settled
    thread = threading.Thread(target=dispatch.run, args=(stop, caught_up), daemon=True)
    thread.start()
    thread.join(90)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()

    # everything is settled: whatever was to be sent has been
    assert evil_rx.hits == []
    # only the plain action of a known rule reaches its rule's webhook, signed with the rule's secret
    assert [(path, a["action_id"], signed) for path, a, _, signed in rule_rx.hits] == [
        ("/known", "f" * 64, True)
    ]

    dlq = {m.key.decode(): orjson.loads(m.value) for m in read_all(bootstrap, f"{prefix}actions.dlq")}
    assert sorted(dlq) == ["a" * 64, "b" * 64, "c" * 64, "d" * 64, "e" * 64]
    for action_id, record in dlq.items():
        assert record["attempts"] == 0
        if action_id == "e" * 64:  # a known rule, but the record tries to steer its own delivery
            assert record["last_error"].startswith("action carries destination fields of its own")
        else:
            assert record["last_error"].startswith(f"unknown rule {actions[action_id]['rule_id']!r}")
        assert {k: record[k] for k in actions[action_id]} == actions[action_id]  # the original action
        assert CLICKHOUSE_URL not in orjson.dumps(record).decode()
    summary = dispatch.summary()
    assert summary["delivered"] == 1 and summary["dead_lettered"] == 5 and summary["unknown_rule"] == 4
    assert summary["foreign_destination"] == 1
    assert summary["poll_errors"] == summary["rules_poll_errors"] == 0  # Kafka was there all along
