"""The local stack: real broker, real Redis, embedded ClickHouse endpoint; up/down/status behaviour."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, TopicPartition

from connectors import kafka as kafka_io
from connectors.settings import CONTRACT_TOPICS, Connections
from devstack.stack import SERVICES, Stack, StackError, StackSettings, pid_alive

pytestmark = pytest.mark.integration


def test_status_reports_every_service_healthy(stack: Stack) -> None:
    rows = {r["service"]: r for r in stack.status()}
    assert set(rows) == set(SERVICES)
    assert all(r["healthy"] for r in rows.values()), rows


def test_stack_env_has_the_contract_lines(stack: Stack) -> None:
    env = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines())
    assert env["KAFKA_BOOTSTRAP_SERVERS"].startswith("127.0.0.1:")
    assert env["REDIS_URL"].startswith("redis://127.0.0.1:")
    assert env["CLICKHOUSE_URL"].startswith("http://127.0.0.1:")


def test_up_twice_is_harmless(stack: Stack) -> None:
    before = stack.load_state()
    after = stack.up()
    for name in SERVICES:
        assert after[name].pid == before[name].pid
        assert after[name].url == before[name].url
        assert pid_alive(after[name].pid, after[name].marker)


def test_contract_topics_exist_and_rules_is_compacted(connections: Connections) -> None:
    client = kafka_io.admin(connections.kafka_bootstrap_servers)
    try:
        topics = set(client.list_topics())
        assert {connections.topic(t) for t in CONTRACT_TOPICS} <= topics
        from kafka.admin import ConfigResource, ConfigResourceType

        res = client.describe_configs([ConfigResource(ConfigResourceType.TOPIC, connections.topic("rules"))])
        text = repr(res)
        assert "cleanup.policy" in text and "compact" in text
    finally:
        client.close()


def test_kafka_produce_and_consume_roundtrip(connections: Connections, topic_factory) -> None:
    topic = topic_factory("roundtrip", partitions=4)
    prod = kafka_io.producer(connections.kafka_bootstrap_servers)
    sent = {}
    for i in range(2000):
        key = f"user-{i % 37}".encode()
        value = f'{{"n": {i}}}'.encode()
        prod.send(topic, key=key, value=value, timestamp_ms=1_795_000_000_000 + i)
        sent.setdefault(key, []).append(value)
    prod.flush()
    prod.close()

    consumer = KafkaConsumer(
        bootstrap_servers=connections.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    consumer.assign([TopicPartition(topic, p) for p in range(4)])
    got: dict[bytes, list[bytes]] = {}
    partitions_of: dict[bytes, set[int]] = {}
    for msg in consumer:
        got.setdefault(msg.key, []).append(msg.value)
        partitions_of.setdefault(msg.key, set()).add(msg.partition)
        assert msg.timestamp >= 1_795_000_000_000
    consumer.close()
    assert got == sent  # every record, per-key order kept
    assert all(len(p) == 1 for p in partitions_of.values())  # a key stays on one partition
    assert len({p for ps in partitions_of.values() for p in ps}) > 1  # and keys are spread


def test_redis_roundtrip(connections: Connections) -> None:
    r = redis.Redis.from_url(connections.redis_url.get_secret_value())
    key = f"test:profile:{uuid.uuid4().hex}"
    r.hset(key, mapping={"plan": "pro", "country": "DE"})
    assert r.hgetall(key) == {b"plan": b"pro", b"country": b"DE"}
    r.delete(key)
    assert r.exists(key) == 0


def test_external_services_are_used_not_started(stack: Stack, tmp_path: Path) -> None:
    env = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines())
    other = Stack(StackSettings(home=tmp_path / "ext"), environ=env)
    state = other.up()
    assert all(svc.external and svc.pid is None for svc in state.values())
    assert other.env_file.read_text() == stack.env_file.read_text()
    assert other.down() == []


def test_taken_port_gives_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        st = Stack(StackSettings(home=tmp_path / "h", redis_port=port), environ={})
        with pytest.raises(StackError, match=rf"port {port} is taken.*CLICKPULSE_REDIS_PORT"):
            st._start_redis(None)


def test_missing_java_gives_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    st = Stack(StackSettings(home=tmp_path / "h"), environ={})
    with pytest.raises(StackError, match="java not found"):
        st._start_kafka(None)


def test_cli_up_down_leaves_no_process_behind(tmp_path: Path) -> None:
    """A second, independent stack through the real CLI: up twice, status, down, nothing left running."""
    home = tmp_path / "cli-home"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "CLICKHOUSE_URL")
    }
    env["CLICKPULSE_HOME"] = str(home)
    cli = [sys.executable, "-m", "jobs.cli", "stack"]
    up = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    state = Stack(StackSettings(home=home), environ={}).load_state()
    pids = {n: (s.pid, s.marker) for n, s in state.items()}
    assert all(pid_alive(pid, marker) for pid, marker in pids.values())

    again = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr

    down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(pid, marker) for pid, marker in pids.values())
    assert not (home / "stack.env").exists()
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 1
