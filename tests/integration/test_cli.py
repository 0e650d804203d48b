"""The CLI against the real stack: migrate (twice), query in every format, saved queries, simulate."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from connectors.clickhouse import client_from_url
from devstack.stack import Stack
from tests.support import run_job

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
