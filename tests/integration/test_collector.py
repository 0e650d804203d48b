"""The collector against the real broker: each endpoint lands exactly the right records in ``events.raw``,
Segment's own Python library talks to it, and the faults (bad key, oversize, bad JSON, Kafka down) are
answered as documented with nothing acknowledged lost.

Each test runs its own collector process (``python -m connectors.collector``) on its own topic prefix.
"""

from __future__ import annotations

import base64
import gzip
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from connectors import kafka as kafka_io
from connectors.settings import Connections, child_environment
from devstack.stack import Stack, StackSettings, free_port, port_free, stop_pid
from tests.support import REPO, read_topic, until

pytestmark = pytest.mark.integration

KEY = "wk_" + uuid.uuid4().hex


@dataclass
class RunningCollector:
    url: str
    topic: str
    bootstrap: str
    proc: subprocess.Popen[bytes]
    log: Path

    def post(self, path: str, doc: Any, *, key: str | None = KEY, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
        data = kw.pop("content", None)
        if data is None:
            data = orjson.dumps(doc)
        return httpx.post(self.url + path, content=data, headers=headers, timeout=30, **kw)

    def records(self, quiet_s: float = 2.0) -> list[Any]:
        return read_topic(self.bootstrap, self.topic, quiet_s=quiet_s)


def start_collector(bootstrap: str, prefix: str, log: Path, **extra: str) -> RunningCollector:
    port = free_port()
    env = child_environment(Connections.from_env({"KAFKA_BOOTSTRAP_SERVERS": bootstrap}))
    env.update(
        CLICKPULSE_TOPIC_PREFIX=prefix,
        CLICKPULSE_WRITE_KEY=f"other-key,{KEY}",
        CLICKPULSE_STATE_DIR=str(log.parent / "home"),
        **extra,
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "connectors.collector", "--port", str(port)],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    c = RunningCollector(f"http://127.0.0.1:{port}", f"{prefix}events.raw", bootstrap, proc, log)

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(c.url + "/ping", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    until(up, 60, "the collector to answer /ping")
    return c


def stop(c: RunningCollector) -> None:
    if c.proc.poll() is None:
        os.killpg(c.proc.pid, signal.SIGTERM)
        c.proc.wait(timeout=30)
    assert KEY not in c.log.read_text(), "the write key reached the log"


@pytest.fixture()
def collector(connections: Connections, tmp_path: Path) -> Iterator[RunningCollector]:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    kafka_io.ensure_topics(connections.kafka_bootstrap_servers, {f"{prefix}events.raw": {}}, partitions=4)
    c = start_collector(connections.kafka_bootstrap_servers, prefix, tmp_path / "collector.log")
    yield c
    stop(c)
    kafka_io.delete_topics(connections.kafka_bootstrap_servers, [c.topic])


def by_id(records: list[Any]) -> dict[str, tuple[bytes, dict[str, Any]]]:
    out = {}
    for r in records:
        doc = orjson.loads(r.value)
        assert doc["message_id"] not in out, f"duplicate {doc['message_id']}"
        out[doc["message_id"]] = (r.key, doc)
    return out


# --------------------------------------------------------------------------------------- endpoints


def test_each_endpoint_lands_exactly_its_records(collector: RunningCollector) -> None:
    ctx = {
        "userAgent": "Mozilla/5.0",
        "locale": "en-US",
        "page": {"url": "https://shop.example/", "path": "/"},
    }
    sent = {
        "track": {"messageId": "m-track", "anonymousId": "a-1", "event": "Product Viewed",
                  "properties": {"deal_id": "LAS-DEC"}, "context": ctx},
        "page": {"messageId": "m-page", "anonymousId": "a-1", "name": "Home", "properties": {"path": "/"}},
        "identify": {"messageId": "m-identify", "anonymousId": "a-1", "userId": "u-1",
                     "traits": {"plan": "pro"}},
        "alias": {"messageId": "m-alias", "previousId": "a-1", "userId": "u-1"},
    }  # fmt: skip
    for endpoint, doc in sent.items():
        r = collector.post(f"/v1/{endpoint}", doc)
        assert (r.status_code, r.json()) == (200, {"success": True}), r.text
    batch = [{"type": "track", "messageId": f"m-b{i}", "userId": "u-2", "event": "Clicked"} for i in range(3)]
    r = collector.post("/v1/batch", {"batch": batch, "sentAt": "2026-12-01T00:00:00Z"})
    assert r.status_code == 200, r.text

    got = by_id(collector.records())
    assert set(got) == {f"m-{e}" for e in sent} | {"m-b0", "m-b1", "m-b2"}
    key, track = got["m-track"]
    assert key == b"a-1"
    assert (track["type"], track["event"], track["properties"]) == (
        "track",
        "Product Viewed",
        {"deal_id": "LAS-DEC"},
    )
    assert track["context"]["user_agent"] == "Mozilla/5.0" and track["context"]["ip"] == "127.0.0.1"
    assert track["received_at"].endswith("Z")
    assert got["m-page"][1]["name"] == "Home" and got["m-page"][1]["type"] == "page"
    assert got["m-identify"][1]["traits"] == {"plan": "pro"}
    assert (got["m-alias"][0], got["m-alias"][1]["previous_id"]) == (b"u-1", "a-1")
    assert all(
        got[f"m-b{i}"][0] == b"u-2" and got[f"m-b{i}"][1]["sent_at"] == "2026-12-01T00:00:00Z"
        for i in range(3)
    )


def test_gzip_batch(collector: RunningCollector) -> None:
    batch = [{"type": "page", "messageId": f"g-{i}", "anonymousId": "a", "name": "P"} for i in range(200)]
    body = gzip.compress(orjson.dumps({"batch": batch}))
    r = collector.post("/v1/batch", None, content=body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert set(by_id(collector.records())) == {f"g-{i}" for i in range(200)}


def test_cors_preflight_from_another_origin(collector: RunningCollector) -> None:
    r = httpx.options(
        collector.url + "/v1/batch",
        headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,content-encoding"},
    )  # fmt: skip
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "*"
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "content-encoding"} <= allowed
    r = collector.post(
        "/v1/track", {"anonymousId": "a", "event": "E"}, headers={"Origin": "https://shop.example"}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_segment_python_library_interop(collector: RunningCollector) -> None:
    """Segment's own client (``segment-analytics-python``) pointed at the collector: every event arrives."""
    from segment.analytics import Client

    errors: list[Any] = []
    client = Client(
        KEY, host=collector.url, on_error=lambda e, batch: errors.append(e), max_retries=2, sync_mode=False
    )
    ids = [
        client.track("u-seg", "Order Completed", {"revenue": 42.5}, anonymous_id="a-seg")[1]["messageId"],
        client.page("u-seg", "Docs", "Getting started", {"url": "https://shop.example/docs"})[1]["messageId"],
        client.identify("u-seg", {"email": "x@example.com"}, anonymous_id="a-seg")[1]["messageId"],
        client.alias("a-seg", "u-seg")[1]["messageId"],
    ]
    client.flush()
    client.join()
    assert errors == []
    got = by_id(collector.records())
    assert set(got) == set(ids)
    kinds = {doc["type"]: doc for _, doc in got.values()}
    assert kinds["track"]["event"] == "Order Completed" and kinds["track"]["properties"] == {"revenue": 42.5}
    assert kinds["page"]["name"] == "Getting started" and kinds["page"]["category"] == "Docs"
    assert kinds["identify"]["traits"] == {"email": "x@example.com"}
    assert (kinds["alias"]["previous_id"], kinds["alias"]["user_id"]) == ("a-seg", "u-seg")
    assert kinds["track"]["context"]["library"]["name"] == "analytics-python"


def test_the_stack_runs_a_collector_with_a_private_write_key(stack: Stack) -> None:
    env = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line)
    url, key = env["CLICKPULSE_COLLECTOR_URL"], env["CLICKPULSE_WRITE_KEY"]
    assert url.startswith("http://127.0.0.1:") and len(key) > 20
    mid = "stack-" + uuid.uuid4().hex
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    r = httpx.post(url + "/v1/track", json={"messageId": mid, "anonymousId": "a", "event": "E"}, headers=auth)
    assert r.status_code == 200, r.text
    conn = Connections.from_env(env)
    assert any(
        orjson.loads(r.value).get("message_id") == mid
        for r in read_topic(conn.kafka_bootstrap_servers, conn.topic("events.raw"))
    )
    assert (stack.root / "collector" / "write_key").stat().st_mode & 0o777 == 0o600
    rows = {r["service"]: r for r in stack.status()}
    assert rows["collector"]["healthy"] and key not in str(rows)


# ------------------------------------------------------------------------------------------ faults


@pytest.mark.fault
def test_bad_input_is_refused_and_nothing_is_written(collector: RunningCollector) -> None:
    ok = {"anonymousId": "a", "event": "E"}
    assert collector.post("/v1/track", ok, key="wrong").status_code == 401
    assert collector.post("/v1/track", ok, key=None).status_code == 401
    r = collector.post("/v1/track", None, content=b'{"event": "E", "anonymousId": ')
    assert (r.status_code, r.json()["code"]) == (400, "invalid_json")
    r = collector.post("/v1/track", {"event": "E"})
    assert r.status_code == 400 and "anonymousId or userId" in r.json()["message"]
    r = collector.post("/v1/track", {**ok, "properties": {"blob": "x" * 40_000}})
    assert r.status_code == 413
    batch = [{**ok, "type": "track", "properties": {"blob": "x" * 30_000}} for _ in range(20)]
    r = collector.post("/v1/batch", {"batch": batch})
    assert r.status_code == 413
    bomb = gzip.compress(b"[" + b" " * 20_000_000 + b"]")
    r = collector.post("/v1/batch", None, content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413
    assert collector.records(quiet_s=1.0) == []
    health = httpx.get(collector.url + "/health").json()
    assert health["counters"]["401 unauthorized"] == 2 and health["counters"]["413 too_large"] == 2


@pytest.mark.fault
def test_kafka_down_gives_503_with_retry_after_and_nothing_acknowledged_is_lost(
    stack: Stack, tmp_path: Path
) -> None:
    """A broker of this test's own (the session's must not go down), stopped under a collector and started
    again on the same port and data. Started without ``Stack.up`` (that would also check the session's
    other services): the broker alone, as ``Stack.restart`` starts it."""
    st = Stack(StackSettings(home=tmp_path / "own-kafka", kafka_heap="384m"), environ={})
    kafka = st._start_kafka(None)
    c = None
    try:
        kafka_io.wait_healthy(kafka.url, timeout_s=120)
        kafka_io.ensure_topics(kafka.url, {"events.raw": {}}, partitions=2)
        c = start_collector(
            kafka.url, "", tmp_path / "collector.log",
            CLICKPULSE_COLLECTOR_ACK_TIMEOUT_MS="2000", CLICKPULSE_COLLECTOR_RETRY_AFTER_MS="1000",
        )  # fmt: skip
        acked: set[str] = set()
        refused: list[str] = []

        def send(mid: str) -> httpx.Response:
            r = c.post("/v1/track", {"messageId": mid, "anonymousId": f"a-{mid}", "event": "E"})
            if r.status_code == 200:
                acked.add(mid)
            return r

        for i in range(20):
            assert send(f"before-{i}").status_code == 200
        stop_pid(kafka.pid or 0, kafka.marker)
        until(lambda: all(port_free(p) for p in kafka.ports.values()), 30, "the broker's ports")
        for i in range(5):
            r = send(f"during-{i}")
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and r.json()["code"] == "unavailable"
            refused.append(f"during-{i}")
        kafka = st._start_kafka(kafka)  # same ports, same data
        kafka_io.wait_healthy(kafka.url, timeout_s=120)
        for mid in refused:  # the client retries what was not acknowledged, as Segment's libraries do

            def accepted(mid: str = mid) -> bool:
                return send(mid).status_code == 200

            until(accepted, 120, f"{mid} accepted after the restart")
        for i in range(20):
            assert send(f"after-{i}").status_code == 200
        got = {orjson.loads(r.value)["message_id"] for r in read_topic(kafka.url, "events.raw")}
        assert acked <= got, f"acknowledged but lost: {sorted(acked - got)}"
        assert len(acked) == 45
    finally:
        if c is not None:
            stop(c)
        stop_pid(kafka.pid or 0, kafka.marker)
