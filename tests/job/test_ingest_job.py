"""The ingest job on the local mini-cluster against the real stack, checked against the simulator truth."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import orjson
import pytest

from devstack.simulate import produce
from tests.support import (
    check_ingest_against_truth as check_against_truth,
)
from tests.support import (
    checkpoint_after,
    raw_marker,
    read_topic,
    run_job,
    send_markers,
    start_job,
    until,
)
from tests.support import (
    simulate_now as simulate,
)
from udfs.enrich import parse_page_url

pytestmark = pytest.mark.job


@pytest.mark.parametrize("parallelism", [1, 2])
def test_ingest_matches_truth(job_env: dict[str, str], parallelism: int) -> None:
    records, truth = simulate(4000, seed=5)
    bootstrap = job_env["KAFKA_BOOTSTRAP_SERVERS"]
    prefix = job_env["CLICKPULSE_TOPIC_PREFIX"]
    produce(bootstrap, f"{prefix}events.raw", records)

    res = run_job(
        "ingest", job_env, "--bounded", "--starting-offsets", "earliest", "--parallelism", str(parallelism)
    )
    assert res.returncode == 0, res.stderr[-3000:]

    enriched = read_topic(bootstrap, f"{prefix}events.enriched", quiet_s=4.0)
    dlq = read_topic(bootstrap, f"{prefix}events.dlq", quiet_s=4.0)
    out = check_against_truth(enriched, dlq, truth)

    # every DLQ record carries its source position and the original payload
    raw_by_pos = {i: r.value for i, r in enumerate(records)}
    for m in dlq:
        d = orjson.loads(m.value)
        assert d["source_topic"] == f"{prefix}events.raw" and d["error_detail"]
        assert isinstance(d["partition"], int) and isinstance(d["offset"], int)
        if d.get("payload_encoding") != "base64":
            assert d["payload"].encode() in raw_by_pos.values()

    # identity stitched after identify/alias, keyed by user_key; enrichment right on known records
    expected_key = truth.expected_user_key
    truth_by_id = {e.message_id: e for e in truth.valid}
    assert all(r["user_key"] == expected_key[r["message_id"]] for r in out)
    assert all(m.key.decode() == orjson.loads(m.value)["user_key"] for m in enriched)
    assert any(r["user_key"] != r["anonymous_id"] and r["user_id"] is None for r in out), "no stitched event"
    for r in out:
        t = truth_by_id[r["message_id"]]
        assert r["is_bot"] == t.is_bot
        assert r["event_time_ms"] == t.timestamp_ms
        url = parse_page_url(r["page_url"])
        assert (r["utm_source"], r["click_id_type"], r["page_host"]) == (
            url.utm_source,
            url.click_id_type,
            url.host,
        )
    assert sum(1 for r in out if r["country"]) > 0.9 * len(out)
    assert {r["device_type"] for r in out} >= {"desktop", "mobile"}


def test_kill_and_restart_from_checkpoint_is_exactly_once(
    job_env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    records, truth = simulate(5000, seed=9)
    bootstrap = job_env["KAFKA_BOOTSTRAP_SERVERS"]
    prefix = job_env["CLICKPULSE_TOPIC_PREFIX"]
    half = len(records) // 2
    produce(bootstrap, f"{prefix}events.raw", records[:half])

    # The first run keeps its state as clickpulse did before universal compaction and the changelog state
    # backend became the defaults: its checkpoint (the dedup state) must restore into a job that compacts
    # the new way and checkpoints through the changelog. Each run keeps its RocksDB instances in a
    # directory of its own, to read the options they ran with.
    rocksdb = Path(tempfile.mkdtemp(prefix="cp-rdb-"))
    request.addfinalizer(lambda: shutil.rmtree(rocksdb, ignore_errors=True))
    leveled = {
        **job_env,
        "CLICKPULSE_FLINK_STATE_CHANGELOG": "false",
        "CLICKPULSE_FLINK_OPTIONS": (
            f"state.backend.rocksdb.compaction.style=LEVEL; state.backend.rocksdb.localdir={rocksdb / '1'}"
        ),
    }
    universal = {**job_env, "CLICKPULSE_FLINK_OPTIONS": f"state.backend.rocksdb.localdir={rocksdb / '2'}"}
    first = start_job("ingest", leveled, None, "--starting-offsets", "earliest")
    try:
        until(
            lambda: read_topic(bootstrap, f"{prefix}events.enriched", quiet_s=1.0),
            240,
            "committed output",
            every_s=2.0,
        )
        produce(bootstrap, f"{prefix}events.raw", records[half:])
        time.sleep(1.5)  # mid-stream: part of the second half is in flight
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a process kill, not a clean cancel
        first.wait(30)

    checkpoints = Path(job_env["CLICKPULSE_STATE_DIR"]) / "flink" / "ingest" / "checkpoints"
    changelog = checkpoints.parent / "changelog"
    assert list(checkpoints.glob("*/chk-*/_metadata")), "the first run left a retained checkpoint"
    assert not list(changelog.rglob("*")), "the first run wrote no changelog"
    # The restored source keeps the first run's (unbounded) splits, so the second run is unbounded
    # too: let it catch up, then stop it.
    second = start_job("ingest", universal, None, "--restore", "auto")
    try:
        until(
            lambda: len(read_topic(bootstrap, f"{prefix}events.enriched", quiet_s=1.0)) >= truth.unique_valid,
            300,
            "the restarted job to catch up",
            every_s=2.0,
        )
        # markers produced after everything: once all of them are committed downstream, so is anything
        # the restored job made of the records before them (one subtask: one transaction per checkpoint)
        markers = {m["message_id"] for m in send_markers(bootstrap, f"{prefix}events.raw", raw_marker)}
        until(
            lambda: markers <= {orjson.loads(m.value)["message_id"] for m in read_topic(
                bootstrap, f"{prefix}events.enriched", quiet_s=1.0)},
            120,
            "the markers behind the input in events.enriched",
            every_s=1.0,
        )  # fmt: skip
        seen = time.time()  # and a checkpoint after that: every subtask committed what it made
        until(lambda: checkpoint_after(checkpoints, seen), 60, "a checkpoint after the markers")
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait(30)

    enriched = read_topic(bootstrap, f"{prefix}events.enriched", quiet_s=4.0)
    dlq = read_topic(bootstrap, f"{prefix}events.dlq", quiet_s=4.0)
    check_against_truth(enriched, dlq, truth)
    assert any(p.is_file() for p in changelog.rglob("*")), "the second run checkpointed through the changelog"
    assert _compaction_styles(rocksdb / "1") == {"kCompactionStyleLevel"}
    assert _compaction_styles(rocksdb / "2") == {"kCompactionStyleUniversal"}
    # ... and the second run's instances were restored from the first's files (its OPTIONS file came along)
    assert any("kCompactionStyleLevel" in p.read_text() for p in (rocksdb / "2").glob("*/db/OPTIONS-*"))


def _compaction_styles(localdir: Path) -> set[str]:
    """The ``compaction_style`` each RocksDB instance under ``localdir`` was last opened with: from its
    newest OPTIONS file (a restored instance also holds the checkpoint's, written by the run before)."""
    styles = set()
    for db in localdir.glob("*/db"):
        newest = max(db.glob("OPTIONS-*"), key=lambda p: int(p.name.split("-")[1]))
        for line in newest.read_text().splitlines():
            if line.strip().startswith("compaction_style="):
                styles.add(line.split("=", 1)[1].strip())
    return styles
