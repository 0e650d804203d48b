"""Shared fixtures: one real local stack per test session (Kafka, Redis, ClickHouse endpoint).

If ``KAFKA_BOOTSTRAP_SERVERS``, ``REDIS_URL`` and ``CLICKHOUSE_URL`` are all set, the tests use those
services instead and start nothing. Each test creates its own topics and ClickHouse databases.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors import kafka as kafka_io
from connectors.settings import Connections
from devstack.stack import SERVICES, Stack, StackSettings, pid_alive
from tests.support import blackhole_port


@pytest.fixture(scope="session")
def stack_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """State directory of the test session's stack."""
    return tmp_path_factory.mktemp("clickpulse-home")


@pytest.fixture(scope="session")
def stack(stack_home: Path) -> Iterator[Stack]:
    """The running stack (started here unless all three services are external)."""
    st = Stack(StackSettings(home=stack_home))
    state = st.up()
    yield st
    st.down()
    for name in SERVICES:
        svc = state[name]
        assert svc.external or not pid_alive(svc.pid, svc.marker), f"{name} still running after down"


@pytest.fixture(scope="session")
def connections(stack: Stack) -> Connections:
    """Connection settings pointing at the session's stack."""
    env = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line)
    return Connections.from_env(env)


@pytest.fixture()
def topic_factory(connections: Connections, request: pytest.FixtureRequest) -> Iterator:
    """Create uniquely named topics for one test and delete them afterwards."""
    made: list[str] = []

    def make(suffix: str = "t", partitions: int = 4, config: dict[str, str] | None = None) -> str:
        name = f"t_{request.node.name[:40]}_{suffix}_{uuid.uuid4().hex[:8]}".replace("[", "_").replace(
            "]", "_"
        )
        kafka_io.ensure_topics(
            connections.kafka_bootstrap_servers, {name: config or {}}, partitions=partitions
        )
        made.append(name)
        return name

    yield make
    if made and not os.environ.get("CLICKPULSE_KEEP_TOPICS"):
        kafka_io.delete_topics(connections.kafka_bootstrap_servers, made)


@pytest.fixture()
def job_env(connections: Connections, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for running a job as a subprocess on its own contract topics.

    A unique ``CLICKPULSE_TOPIC_PREFIX`` gives the test its own copy of every contract topic (created
    here, deleted afterwards), a unique Redis key prefix and its own ``CLICKPULSE_STATE_DIR`` (checkpoints).
    """
    from connectors.settings import CONTRACT_TOPICS, child_environment

    prefix = f"t{uuid.uuid4().hex[:8]}."
    topics = {f"{prefix}{t}": cfg for t, cfg in CONTRACT_TOPICS.items()}
    kafka_io.ensure_topics(connections.kafka_bootstrap_servers, topics, partitions=4)
    env = child_environment(connections)
    env.update(
        {
            "CLICKPULSE_TOPIC_PREFIX": prefix,
            "CLICKPULSE_REDIS_KEY_PREFIX": f"test:{prefix}",
            "CLICKPULSE_STATE_DIR": str(tmp_path / "home"),
            "CLICKPULSE_FLINK_CHECKPOINT_INTERVAL_MS": "2000",
            "CLICKPULSE_JOB_LOG_INTERVAL_MS": "2000",
        }
    )
    if os.environ.get("CLICKPULSE_MAVEN_JARS_DIR"):  # connector jars elsewhere than <repo>/.clickpulse/jars
        env["CLICKPULSE_MAVEN_JARS_DIR"] = os.environ["CLICKPULSE_MAVEN_JARS_DIR"]
    yield env
    if not os.environ.get("CLICKPULSE_KEEP_TOPICS"):
        kafka_io.delete_topics(connections.kafka_bootstrap_servers, list(topics))


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port that accepts TCP connections but never answers: a dead receiver."""
    with blackhole_port() as port:
        yield port


# ------------------------------------------------------------------------- fault run record
# Outcome of every `fault` test of a session whose -m expression names `fault` (`make chaos`), for
# README's "Faults and bad inputs tried" table (`python -m devstack.faultreport`).
_fault_tests: dict[str, dict[str, object]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record the outcome and duration of each phase of a ``fault`` test."""
    if "fault" not in report.keywords:
        return
    entry = _fault_tests.setdefault(report.nodeid, {"outcome": "passed", "duration_s": 0.0})
    entry["duration_s"] = round(float(entry["duration_s"]) + report.duration, 2)  # type: ignore[arg-type]
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write ``.clickpulse/faults/run.json`` after a run selected with ``-m`` naming ``fault``."""
    markexpr = str(session.config.getoption("markexpr") or "")
    if _fault_tests and "fault" in markexpr:
        from devstack.faultreport import write_run

        write_run(_fault_tests, markexpr)
