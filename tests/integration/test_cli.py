"""The CLI against the real stack: migrate (twice), query in every format, saved queries, simulate; one-line
errors (bad SQL, a failing migration), Ctrl-C, ``status --json`` and ``query --json``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from connectors import kafka as kafka_io
from connectors.clickhouse import client_from_url
from devstack.stack import SERVICES, Stack, StackSettings, pid_alive
from tests.support import REPO, run_job, until

pytestmark = pytest.mark.integration


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "CLICKPULSE_STATE_DIR": str(stack.root)}
    return run_job("cli", env, *args, timeout=300)


def test_migrate_twice_then_query(stack: Stack) -> None:
    db = f"cp_cli_{uuid.uuid4().hex[:8]}"
    first = cli(stack, "migrate", "--database", db)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stderr
    second = cli(stack, "migrate", "--database", db)
    assert second.returncode == 0 and "up to date" in second.stderr

    res = cli(
        stack,
        "query",
        f"SELECT name FROM system.tables WHERE database = '{db}' ORDER BY name",
        "--format",
        "json",
    )
    assert res.returncode == 0, res.stderr
    names = {json.loads(line)["name"] for line in res.stdout.splitlines()}
    assert {"events", "sessions", "events_per_minute", "daily_active_users", "schema_migrations"} <= names

    csv = cli(stack, "query", f"SELECT count() AS n FROM {db}.events", "--format", "csv")
    assert csv.stdout.splitlines() == ["n", "0"]
    table = cli(stack, "query", "SELECT 1 AS one")
    assert "one" in table.stdout and "1 row" in table.stdout

    bad = cli(stack, "query", "SELECT * FROM no_such_table_here")
    assert bad.returncode == 1 and "UNKNOWN_TABLE" in bad.stderr
    url = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines())["CLICKHOUSE_URL"]
    client_from_url(url).command(f"DROP DATABASE {db}")


def test_saved_queries_run(stack: Stack) -> None:
    url = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines())["CLICKHOUSE_URL"]
    assert cli(stack, "migrate").returncode == 0  # saved queries read the `clickpulse` database
    for name in ("funnel", "retention"):
        res = cli(stack, "query", name, "--format", "csv")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines(), name  # at least the header
    assert client_from_url(url).query("SELECT 1").result_rows == [(1,)]
    steps = cli(stack, "query", "funnel", "--param", "steps=Product Viewed,Order Completed",
                "--param", "date_from=today-7", "--format", "csv")  # fmt: skip
    assert steps.returncode == 0, steps.stderr
    bad = cli(stack, "query", "funnel", "--param", "nope=1")
    assert bad.returncode == 2 and "unknown parameter nope" in bad.stderr
    typed = cli(stack, "query", "SELECT {n:UInt8} + 1 AS n", "--param", "n=41", "--format", "csv")
    assert typed.stdout.splitlines() == ["n", "42"], typed.stderr


def test_simulate_writes_truth(stack: Stack, tmp_path: Path, topic_factory) -> None:
    topic = topic_factory("sim")
    truth = tmp_path / "truth.json"
    res = cli(stack, "simulate", "--events", "500", "--seed", "3", "--topic", topic, "--truth", str(truth))
    assert res.returncode == 0, res.stderr
    doc = json.loads(truth.read_bytes())
    assert doc["records"] == 500 and doc["unique_valid"] > 400


# --------------------------------------------------------------------------- errors, Ctrl-C, status, --json


def assert_one_error_line(res: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    assert lines[0] == res.stderr.strip().splitlines()[-1]
    return lines[0]


def test_bad_sql_is_one_line(stack: Stack) -> None:
    res = cli(stack, "query", "SELEC nonsense")
    assert res.returncode == 1 and res.stdout == ""
    assert "SYNTAX_ERROR" in assert_one_error_line(res)


def test_failing_migration_names_the_file_and_why(stack: Stack, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    sql_dir.mkdir()
    table = "CREATE TABLE IF NOT EXISTS {db}.%s (a UInt8) ENGINE = Memory;\n"
    (sql_dir / "0001_fine.sql").write_text(table % "fine")
    (sql_dir / "0002_broken.sql").write_text(table % "other" + "SELECT * FROM {db}.no_such_table;\n")
    db = f"cp_cli_{uuid.uuid4().hex[:8]}"
    res = cli(stack, "migrate", "--database", db, "--sql-dir", str(sql_dir))
    assert res.returncode == 1
    line = assert_one_error_line(res)
    assert line.startswith("error: 0002_broken.sql: statement 2 of 2 failed:") and "UNKNOWN_TABLE" in line
    url = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines())["CLICKHOUSE_URL"]
    client = client_from_url(url)
    assert client.query(f"SELECT name FROM {db}.schema_migrations").result_rows == [("0001_fine",)]
    client.command(f"DROP DATABASE {db}")


def test_query_json_is_one_document(stack: Stack) -> None:
    res = cli(stack, "query", "--json", "SELECT number AS n, toString(number) AS s FROM numbers(3)")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == {
        "columns": ["n", "s"],
        "rows": [{"n": 0, "s": "0"}, {"n": 1, "s": "1"}, {"n": 2, "s": "2"}],
        "row_count": 3,
    }


def test_ctrl_c_stops_simulate_with_130(stack: Stack, connections, topic_factory) -> None:
    topic = topic_factory("sigint", partitions=1)
    env = {"PATH": "/usr/bin:/bin", "CLICKPULSE_STATE_DIR": str(stack.root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "simulate", "--events", "200000", "--rate", "500"]
        + ["--topic", topic],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        tp = TopicPartition(topic, 0)
        consumer = KafkaConsumer(bootstrap_servers=connections.kafka_bootstrap_servers)
        try:
            until(lambda: consumer.end_offsets([tp])[tp] > 0, 60, "simulate producing")
        finally:
            consumer.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert out == ""
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["error: interrupted"]


def test_status_json_reports_services_lag_and_dlq(stack: Stack, job_env: dict[str, str], connections) -> None:
    prefix = job_env["CLICKPULSE_TOPIC_PREFIX"]
    bootstrap = connections.kafka_bootstrap_servers
    producer = kafka_io.producer(bootstrap)
    for i in range(5):
        producer.send(f"{prefix}events.dlq", key=b"k", value=b'{"error_code": "x"}', partition=i % 2)
    for _ in range(2):
        producer.send(f"{prefix}actions.dlq", key=b"a", value=b"{}", partition=0)
    for _ in range(7):
        producer.send(f"{prefix}events.enriched", key=b"u", value=b"{}", partition=1)
    producer.flush()
    producer.close()
    group = f"cp-status-{uuid.uuid4().hex[:8]}"
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    consumer.commit({TopicPartition(f"{prefix}events.enriched", 1): OffsetAndMetadata(3, "", -1)})
    consumer.close()

    # the session stack's services (the dashboard, the collector) as external ones, beside the job's topics
    stack_env = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line)
    env = {**job_env, **{k: v for k, v in stack_env.items() if k.endswith("_URL") and k not in job_env}}
    res = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "status", "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)  # stdout holds the one document and nothing else
    assert doc["topic_prefix"] == prefix
    services = {s["service"]: s for s in doc["services"]["services"]}
    assert set(services) == set(SERVICES) and all(s["healthy"] for s in services.values()), services
    assert doc["flink"]["available"] is False  # no CLICKPULSE_FLINK_REST_URL
    lag = doc["consumer_lag"]["groups"][group]
    assert lag == {"lag": 4, "topics": {f"{prefix}events.enriched": {"committed": 3, "end": 7, "lag": 4}}}
    assert doc["dlq"] == {"available": True, "topics": {f"{prefix}events.dlq": 5, f"{prefix}actions.dlq": 2}}

    text = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "status"], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert text.returncode == 0 and "Traceback" not in text.stderr
    assert group in text.stdout and f"{prefix}events.dlq" in text.stdout


def test_ctrl_c_during_stack_up_stops_what_it_started(tmp_path: Path, blackhole: int) -> None:
    """``stack up`` of a second stack whose (external) ClickHouse never answers, so ``up`` is still waiting
    when Ctrl-C comes: the Kafka and Redis it started are stopped, exit 130, one line."""
    home = tmp_path / "h"
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")}
    env.update(CLICKPULSE_STATE_DIR=str(home), CLICKHOUSE_URL=f"http://127.0.0.1:{blackhole}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "stack", "up"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def started() -> dict[str, tuple[int, str]]:
            state = Stack(StackSettings(home=home), environ={}).load_state()
            pids = {n: (s.pid, s.marker) for n, s in state.items() if not s.external and s.pid}
            return pids if {"kafka", "redis"} <= set(pids) else {}

        pids = until(started, 120, "stack up starting kafka and redis")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: interrupted"
    assert not any(pid_alive(pid, marker) for pid, marker in pids.values())


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def test_status_of_a_running_job_then_ctrl_c_stops_it_and_its_jvm(
    job_env: dict[str, str], tmp_path: Path
) -> None:
    """``run ingest`` on its mini-cluster: ``status`` pointed at the REST URL the job logs lists it with its
    last checkpoint; then Ctrl-C: exit 130, one line, the JVM gone."""
    log_file = tmp_path / "run.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "run", "ingest", "--group-id", f"g-{uuid.uuid4().hex[:8]}"],
            env=job_env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        until(lambda: "Flink REST API" in log_file.read_text() or proc.poll() is not None, 180, "the job")
        assert proc.poll() is None, log_file.read_text()
        jvm = _children(proc.pid)
        assert jvm, "the PyFlink gateway JVM is a child of the job"
        rest_url = re.search(r"Flink REST API \(metrics, job status\) at (\S+)", log_file.read_text())
        assert rest_url, log_file.read_text()
        env = {**job_env, "CLICKPULSE_FLINK_REST_URL": rest_url.group(1)}

        def checkpointed() -> list[dict]:
            res = subprocess.run(
                [sys.executable, "-m", "jobs.cli", "status", "--json"],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            flink = json.loads(res.stdout)["flink"]
            assert flink["available"], flink
            return [j for j in flink["jobs"] if j["checkpoint"] is not None]

        (job,) = until(checkpointed, 120, "a completed checkpoint in status")
        assert job["state"] == "RUNNING" and job["checkpoint"]["id"] >= 1
        assert job["checkpoint"]["completed_at"].startswith("20")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log_file.read_text()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: interrupted"
    until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in jvm), 30, "the JVM to exit")
