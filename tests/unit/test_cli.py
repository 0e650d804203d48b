"""The command line without services: --version, one-line errors, status degrading part by part, the
status reader of Flink's REST API against a small fake JobManager."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from connectors.status import flink_jobs
from devstack.stack import SERVICES, free_port
from tests.support import REPO

pytestmark = pytest.mark.unit


@pytest.fixture()
def no_services(tmp_path: Path) -> dict[str, str]:
    """An environment whose Kafka, Redis and ClickHouse are closed loopback ports."""
    return {
        "PATH": "/usr/bin:/bin",
        "CLICKPULSE_STATE_DIR": str(tmp_path / "home"),
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "CLICKHOUSE_URL": f"http://127.0.0.1:{free_port()}",
    }


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    """The single ``error: ...`` line a failed command printed (asserting there is nothing else)."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert res.stdout == ""
    return lines[0]


def test_version_comes_from_the_package_metadata(no_services: dict[str, str]) -> None:
    res = cli(no_services, "--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"clickpulse {version('clickpulse')}"


def test_unknown_saved_query_lists_the_known_ones(no_services: dict[str, str]) -> None:
    res = cli(no_services, "query", "nope")
    assert res.returncode == 2
    line = one_error_line(res)
    assert "unknown saved query 'nope'" in line and "funnel" in line and "retention" in line


def test_missing_sql_file(no_services: dict[str, str]) -> None:
    res = cli(no_services, "query", "no/such/file.sql")
    assert res.returncode == 2 and "no such SQL file" in one_error_line(res)


@pytest.mark.parametrize(
    ("job", "content", "expected"),
    [
        ("triggers", "rules:\n  - id: x\n    when: {event: A, count_at_least: 2}\n", "action"),
        ("pipeline", "rules: [", "rules file"),
        ("triggers", None, "No such file"),
    ],
)
def test_invalid_rules_file_is_one_line_before_any_job_starts(
    no_services: dict[str, str], tmp_path: Path, job: str, content: str | None, expected: str
) -> None:
    rules = tmp_path / "bad.yaml"
    if content is not None:
        rules.write_text(content)
    res = cli(no_services, "run", job, "--rules", str(rules))
    assert res.returncode == 2
    line = one_error_line(res)
    assert line.startswith("error: rules file") and expected in line


def test_simulate_with_kafka_unreachable(no_services: dict[str, str]) -> None:
    res = cli(no_services, "simulate", "--events", "10")
    assert res.returncode == 1
    line = one_error_line(res)
    assert "Kafka at" in line and "not reachable" in line and "clickpulse stack up" in line


@pytest.mark.parametrize("command", [["query", "SELECT 1"], ["migrate"], ["query", "--json", "SELECT 1"]])
def test_clickhouse_unreachable(no_services: dict[str, str], command: list[str]) -> None:
    res = cli(no_services, *command)
    assert res.returncode == 1
    assert "ClickHouse is not reachable" in one_error_line(res)


def test_status_says_what_is_unavailable(no_services: dict[str, str]) -> None:
    res = cli(no_services, "status")
    assert res.returncode == 1  # services unhealthy
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stdout.count("unavailable:") == 3  # flink, consumer lag, dead letters
    assert "CLICKPULSE_FLINK_REST_URL" in res.stdout

    doc = json.loads(cli(no_services, "status", "--json").stdout)
    assert [s["service"] for s in doc["services"]["services"]] == list(SERVICES)
    assert not any(s["healthy"] for s in doc["services"]["services"])
    for part in ("flink", "consumer_lag", "dlq"):
        assert doc[part]["available"] is False and doc[part]["reason"]


def test_status_flink_rest_unreachable(no_services: dict[str, str]) -> None:
    env = {**no_services, "CLICKPULSE_FLINK_REST_URL": f"http://127.0.0.1:{free_port()}"}
    doc = json.loads(cli(env, "status", "--json").stdout)
    assert doc["flink"]["available"] is False and "Flink REST API at" in doc["flink"]["reason"]


# --------------------------------------------------------------------------- Flink REST, faked

OVERVIEW = {
    "jobs": [
        {"jid": "a1", "name": "clickpulse-pipeline", "state": "RUNNING", "start-time": 1796000000000},
        {"jid": "b2", "name": "old", "state": "CANCELED", "start-time": 1795000000000},
        {"jid": "c3", "name": "clickpulse-load", "state": "RUNNING", "start-time": 1796000001000},
    ]
}
CHECKPOINTS = {
    "a1": {
        "counts": {"completed": 7, "failed": 1},
        "latest": {
            "completed": {
                "id": 7,
                "latest_ack_timestamp": 1796000060000,
                "end_to_end_duration": 120,
                "checkpointed_size": 4096,
                "external_path": "file:/checkpoints/chk-7",
            }
        },
    },
    "c3": {"counts": {"completed": 0, "failed": 0}, "latest": {"completed": None}},
}


@pytest.fixture()
def fake_jobmanager() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body: Any
            if self.path == "/jobs/overview":
                body = OVERVIEW
            elif self.path.startswith("/jobs/") and self.path.endswith("/checkpoints"):
                body = CHECKPOINTS.get(self.path.split("/")[2])
            else:
                body = None
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_flink_jobs_lists_running_jobs_with_their_last_checkpoint(fake_jobmanager: str) -> None:
    jobs = flink_jobs(fake_jobmanager)
    assert [j["name"] for j in jobs] == ["clickpulse-load", "clickpulse-pipeline"]
    load, pipeline = jobs
    assert load["checkpoint"] is None
    assert pipeline["checkpoint"] == {
        "id": 7,
        "completed_at": "2026-11-30T00:54:20.000+00:00",
        "duration_ms": 120,
        "size_bytes": 4096,
        "path": "file:/checkpoints/chk-7",
        "completed_total": 7,
        "failed_total": 1,
    }
    assert pipeline["started_at"] == "2026-11-30T00:53:20.000+00:00"


def test_status_reads_the_configured_jobmanager(no_services: dict[str, str], fake_jobmanager: str) -> None:
    env = {**no_services, "CLICKPULSE_FLINK_REST_URL": fake_jobmanager}
    doc = json.loads(cli(env, "status", "--json").stdout)
    assert doc["flink"]["available"] is True
    assert {j["id"] for j in doc["flink"]["jobs"]} == {"a1", "c3"}
    text = cli(env, "status").stdout
    assert "clickpulse-pipeline" in text and "#7 at 2026-11-30T00:54:20" in text and "none yet" in text


def test_invalid_setting_names_its_variable(no_services: dict[str, str]) -> None:
    res = cli({**no_services, "CLICKPULSE_TOPIC_PARTITIONS": "four"}, "stack", "status")
    assert res.returncode == 2
    assert "invalid setting: CLICKPULSE_TOPIC_PARTITIONS" in one_error_line(res)


def test_services_without_the_local_stack_package_are_probed(
    no_services: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The production image has no ``devstack``: status probes the configured services itself."""
    from jobs import cli as cli_module

    for name, value in no_services.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli_module, "local_stack_installed", lambda: False)
    part = cli_module._services_part()
    assert part["available"] is True
    assert [(s["service"], s["healthy"]) for s in part["services"]] == [
        ("kafka", False),
        ("redis", False),
        ("clickhouse", False),
    ]
