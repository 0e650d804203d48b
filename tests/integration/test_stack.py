"""The local stack: real broker, real Redis, embedded ClickHouse endpoint; up/down/status behaviour."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
    sent: dict[bytes, list[bytes]] = {}
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
    env["CLICKPULSE_STATE_DIR"] = str(home)
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


def _own_env(stack: Stack) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line)


@pytest.mark.fault
def test_status_reports_a_dead_service_and_up_restarts_it(stack: Stack, tmp_path: Path) -> None:
    """A second stack that runs its own ClickHouse endpoint (Kafka and Redis are the session's)."""
    env = {k: v for k, v in _own_env(stack).items() if k != "CLICKHOUSE_URL"}
    st = Stack(StackSettings(home=tmp_path / "dead"), environ=env)
    try:
        first = st.up()["clickhouse"]
        assert first.pid is not None
        os.killpg(first.pid, signal.SIGKILL)  # the process group `up` started (see devstack.stack._spawn)
        deadline = time.monotonic() + 30
        while pid_alive(first.pid, first.marker):
            assert time.monotonic() < deadline, "the killed endpoint did not go away"
            time.sleep(0.1)
        row = {r["service"]: r for r in st.status()}["clickhouse"]
        assert (row["state"], row["pid"], row["healthy"]) == ("dead", first.pid, False)

        again = st.up()["clickhouse"]
        assert again.pid != first.pid and pid_alive(again.pid, again.marker)
        row = {r["service"]: r for r in st.status()}["clickhouse"]
        assert (row["state"], row["healthy"]) == ("running", True)
    finally:
        st.down()


@pytest.mark.fault
def test_restart_brings_redis_back_on_its_port_with_its_data(stack: Stack, tmp_path: Path) -> None:
    """A second stack that runs its own Redis (Kafka and ClickHouse are the session's): what the chaos test
    does to every service. Before Redis kept its command line, the health wait right after the spawn took
    the starting server for a dead one ("redis exited during start-up")."""
    env = {k: v for k, v in _own_env(stack).items() if k != "REDIS_URL"}
    st = Stack(StackSettings(home=tmp_path / "restart"), environ=env)
    try:
        first = st.up()["redis"]
        redis.Redis.from_url(first.url).set("kept", "yes")
        again = st.restart("redis")
        assert (again.url, again.ports) == (first.url, first.ports) and again.pid != first.pid
        assert not pid_alive(first.pid, first.marker) and pid_alive(again.pid, again.marker)
        assert redis.Redis.from_url(again.url).get("kept") == b"yes"  # appendonly data survived
        assert {r["service"]: r for r in st.status()}["redis"]["state"] == "running"
        with pytest.raises(StackError, match="nothing to restart"):
            st.restart("kafka")  # external here
    finally:
        st.down()


def test_stack_never_prints_credentials_and_keeps_secrets_private(stack: Stack, tmp_path: Path) -> None:
    secret = "pw-" + uuid.uuid4().hex
    own = _own_env(stack)
    port = own["CLICKHOUSE_URL"].rsplit(":", 1)[1]
    home = tmp_path / "secret-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKPULSE_")}
    env.update(own)
    env["CLICKHOUSE_URL"] = f"http://loader:{secret}@127.0.0.1:{port}"  # the endpoint ignores credentials
    env["CLICKPULSE_STATE_DIR"] = str(home)
    env["COLUMNS"] = "200"  # rich: the status table's URL column uncut
    cli = [sys.executable, "-m", "jobs.cli", "stack"]
    outputs = []
    for action in ("up", "status"):
        run = subprocess.run([*cli, action], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        outputs.append(run.stdout + run.stderr)
    assert all(secret not in out for out in outputs), outputs
    assert "loader:***@127.0.0.1" in outputs[0] and "loader:***@127.0.0.1" in outputs[1]
    for name in ("stack.env", "stack.json"):
        path = home / name
        assert secret in path.read_text()  # it is the configuration the jobs read...
        assert path.stat().st_mode & 0o777 == 0o600, name  # ...so only its owner may read it
    down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and secret not in down.stdout + down.stderr
