"""The sessionize job on the local mini-cluster against the real stack.

Input: simulated traffic (enriched in-process with the ingest job's record logic) plus hand-made
scenarios: out-of-order events, a late event updating a closed session, a late event bridging two
sessions, a late event that becomes a session's new first event, and events too late for their
session. Expected output comes from an independent batch computation over the same input (plain
Python below, not ``udfs.sessions``): group each user's events by the gap / max-length rule and
aggregate. Lateness is designed to be deterministic: accepted late events are within the allowed
lateness of anything the watermark can have reached, too-late ones are far behind newer events of the
same user.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors import kafka as kafka_io
from tests.support import (
    checkpoint_after,
    offsets_committed_to_end,
    produce_rows,
    read_topic,
    run_job,
    send_markers,
    simulated_enriched,
    start_job,
    until,
)
from udfs.timeutil import format_ms

pytestmark = pytest.mark.job

START = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
MIN = 60_000
H = 60 * MIN
GAP_MS = 30 * MIN
MAX_MS = 24 * H
LATENESS_S = 2 * 3600
M = int(START.timestamp() * 1000) + 2 * H  # the scenarios sit before this point of simulated time


# ------------------------------------------------------------------------------------------ input


@dataclass
class Dataset:
    phase1: list[tuple[str, bytes]]  #: simulated events before M, scenario sessions on time
    phase2: list[tuple[str, bytes]]  #: the designed late events (within lateness, and too late)
    phase3: list[tuple[str, bytes]]  #: simulated events from M on
    too_late: dict[str, bytes]  #: message_id -> value of the events that must go to events.late
    published_first: dict[str, str]  #: scenario -> id of a session that is closed before phase 2

    @property
    def all(self) -> list[tuple[str, bytes]]:
        return self.phase1 + self.phase2 + self.phase3


def scenario_event(user: str, ts: int, mid: str, *, kind: str = "page", **fields: Any) -> dict[str, Any]:
    path = fields.pop("path", "/")
    event = {
        "message_id": mid,
        "type": kind,
        "event": fields.pop("event", None),
        "anonymous_id": f"anon-{user}",
        "user_id": None,
        "user_key": user,
        "timestamp": format_ms(ts),
        "event_time_ms": ts,
        "page_url": f"https://shop.example{path}" if path else None,
        "page_path": path,
        "referrer_type": "direct",
        "country": "DE",
        "device_type": "desktop",
        "utm_source": None,
        "utm_medium": None,
        "utm_campaign": None,
        "utm_term": None,
        "utm_content": None,
        "is_bot": False,
        "properties": {},
    }
    event.update(fields)
    return event


def _row(e: dict[str, Any]) -> tuple[str, bytes]:
    return e["user_key"], orjson.dumps(e)


def _sid(user: str, first_mid: str) -> str:
    return hashlib.sha256(f"{user}\x1f{first_mid}".encode()).hexdigest()[:32]


def build_dataset(events: int = 1500, seed: int = 21) -> Dataset:
    base = simulated_enriched(
        events,
        seed,
        start=START,
        span_s=3 * 3600,
        duplicate_fraction=0.0,
        malformed_fraction=0.0,
        late_fraction=0.0,
    )
    early = [(k, p) for k, p in base if orjson.loads(p)["event_time_ms"] < M]
    later = [(k, p) for k, p in base if orjson.loads(p)["event_time_ms"] >= M]

    on_time = [
        # two sessions 35 min apart; a late event at M-88 bridges them
        scenario_event("scn-bridge", M - 110 * MIN, "bridge-a1", path="/deals", utm_source="google"),
        scenario_event("scn-bridge", M - 105 * MIN, "bridge-a2", path="/p/1"),
        scenario_event("scn-bridge", M - 70 * MIN, "bridge-b1", path="/p/2"),
        scenario_event("scn-bridge", M - 65 * MIN, "bridge-b2", path="/checkout"),
        # a closed session that a late event (M-90) extends: a new version
        scenario_event("scn-late", M - 100 * MIN, "late-1", path="/"),
        scenario_event("scn-late", M - 98 * MIN, "late-2", kind="track", event="Product Viewed", path="/p/9"),
        scenario_event("scn-late", M - 95 * MIN, "late-3", path="/p/9"),
        # a closed session that a late event (M-85) extends backwards: its id changes
        scenario_event("scn-backfill", M - 80 * MIN, "backfill-1", path="/p/3"),
        scenario_event("scn-backfill", M - 75 * MIN, "backfill-2", path="/p/4"),
        # recent activity; events hours older than it are too late
        scenario_event("scn-toolate", M - 30 * MIN, "toolate-1", path="/"),
        scenario_event("scn-toolate", M - 25 * MIN, "toolate-2", path="/p/5"),
        # a converting session
        scenario_event("scn-order", M - 60 * MIN, "order-1", path="/p/7", utm_source="newsletter",
                       utm_medium="email", referrer_type="email", country="FR", device_type="mobile"),
        scenario_event("scn-order", M - 58 * MIN, "order-2", kind="track", event="Order Completed",
                       path=None, properties={"revenue": 199.5, "currency": "EUR"}),
        scenario_event("scn-order", M - 57 * MIN, "order-3", path="/checkout/confirmation"),
        # a single page view: a bounce
        scenario_event("scn-bounce", M - 40 * MIN, "bounce-1", path="/p/8"),
    ]  # fmt: skip
    # out of order by up to 4 minutes (behind the watermark, well within the lateness)
    ooo = [scenario_event("scn-ooo", M - 50 * MIN + i * MIN, f"ooo-{i}", path=f"/p/{i}") for i in range(6)]
    on_time += [ooo[i] for i in (0, 3, 1, 5, 2, 4)]

    # place the scenario events among the simulated ones at their event time
    phase1 = list(early)
    for e in on_time:
        pos = next(
            (i for i, (_, p) in enumerate(phase1) if orjson.loads(p)["event_time_ms"] > e["event_time_ms"]),
            len(phase1),
        )
        phase1.insert(pos, _row(e))
    too_late = [
        scenario_event("scn-toolate", M - 4 * H, "toolate-x", path="/old"),
        scenario_event("scn-late", M - 5 * H, "late-x", path="/older"),
    ]
    phase2 = [
        _row(scenario_event("scn-bridge", M - 88 * MIN, "bridge-x", path="/p/1")),
        _row(scenario_event("scn-late", M - 90 * MIN, "late-4", path="/cart")),
        _row(scenario_event("scn-backfill", M - 85 * MIN, "backfill-0", path="/landing")),
        *(_row(e) for e in too_late),
    ]
    return Dataset(
        phase1=phase1,
        phase2=phase2,
        phase3=later,
        too_late={e["message_id"]: orjson.dumps(e) for e in too_late},
        published_first={
            "bridge_a": _sid("scn-bridge", "bridge-a1"),
            "bridge_b": _sid("scn-bridge", "bridge-b1"),
            "late": _sid("scn-late", "late-1"),
            "backfill": _sid("scn-backfill", "backfill-1"),
        },
    )


# -------------------------------------------------------------------------------------- reference

FIELDS = (
    "session_id user_key anonymous_id start end events page_views entry_page exit_page utm_source "
    "utm_medium utm_campaign utm_term utm_content referrer_type country device_type is_bounce "
    "converted revenue version"
).split()


def reference_sessions(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Batch sessionization: per user, sorted by (time, message_id); a new session when the gap to the
    previous event is >= 30 min or the session's first event is >= 24 h back."""
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_user[e["user_key"]].append(e)
    out: dict[str, dict[str, Any]] = {}
    for user, evs in by_user.items():
        evs.sort(key=lambda e: (e["event_time_ms"], e["message_id"]))
        groups: list[list[dict[str, Any]]] = []
        for e in evs:
            t = e["event_time_ms"]
            if (
                groups
                and t - groups[-1][-1]["event_time_ms"] < GAP_MS
                and t - groups[-1][0]["event_time_ms"] < MAX_MS
            ):
                groups[-1].append(e)
            else:
                groups.append([e])
        for g in groups:
            session = summarize(user, g)
            out[session["session_id"]] = session
    return out


def summarize(user: str, g: list[dict[str, Any]]) -> dict[str, Any]:
    with_page = [e for e in g if e.get("page_url")]
    landing = with_page[0] if with_page else g[0]
    exit_ = with_page[-1] if with_page else g[-1]
    orders = [e for e in g if e["type"] == "track" and e.get("event") == "Order Completed"]
    page_views = sum(1 for e in g if e["type"] == "page")
    start, end = g[0]["event_time_ms"], g[-1]["event_time_ms"]

    def text(e: dict[str, Any], name: str) -> str | None:
        return e.get(name) or None

    return {
        "session_id": _sid(user, g[0]["message_id"]),
        "user_key": user,
        "anonymous_id": text(landing, "anonymous_id"),
        "start": format_ms(start),
        "end": format_ms(end),
        "events": len(g),
        "page_views": page_views,
        "entry_page": text(landing, "page_path") if landing.get("page_url") else None,
        "exit_page": text(exit_, "page_path") if exit_.get("page_url") else None,
        **{
            f: text(landing, f)
            for f in ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")
        },
        "referrer_type": text(landing, "referrer_type"),
        "country": text(landing, "country"),
        "device_type": text(landing, "device_type"),
        "is_bounce": page_views <= 1 and not orders and end - start < 10_000,
        "converted": bool(orders),
        "revenue": round(sum(float(e["properties"].get("revenue", 0)) for e in orders), 2),
        "version": len(g),
    }


# ------------------------------------------------------------------------------------------- I/O


def job_env_for(job_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        **job_env,
        "CLICKPULSE_JOB_GROUP_ID": f"sess-{job_env['CLICKPULSE_TOPIC_PREFIX']}",  # own transactional ids
        "CLICKPULSE_SESSIONIZE_ALLOWED_LATENESS_MS": str(LATENESS_S * 1000),
        # no partition may be declared idle while it still has data (this box is shared and slow)
        "CLICKPULSE_SESSIONIZE_IDLE_TIMEOUT_MS": "600000",
    }


def with_log_dir(env: dict[str, str], tmp_path: Path, run: str) -> dict[str, str]:
    """Each run its own Flink log (``FLINK_LOG_DIR``), for :func:`flink_log_tail`."""
    return {**env, "FLINK_LOG_DIR": str(tmp_path / "flink-log" / run)}


def flink_log_tail(tmp_path: Path, n: int = 3000) -> str:
    logs = sorted((tmp_path / "flink-log").glob("*/flink-*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text(errors="replace")[-n:] if logs else "(no flink log)"


def run_bounded(env: dict[str, str], tmp_path: Path, *args: str, timeout: float = 420) -> None:
    res = run_job("sessionize", with_log_dir(env, tmp_path, "bounded"), "--bounded", *args, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:] + flink_log_tail(tmp_path)


@dataclass
class Output:
    records: list[dict[str, Any]]
    final: dict[str, dict[str, Any]]
    late: list


def read_output(bootstrap: str, prefix: str) -> Output:
    msgs = read_topic(bootstrap, f"{prefix}sessions", quiet_s=4.0)
    records = []
    for m in msgs:
        value = orjson.loads(m.value)
        assert m.key.decode() == value["session_id"]
        records.append(value)
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["session_id"] not in latest or r["version"] > latest[r["session_id"]]["version"]:
            latest[r["session_id"]] = r
    final = {k: v for k, v in latest.items() if not v["retracted"]}
    return Output(records, final, read_topic(bootstrap, f"{prefix}events.late", quiet_s=2.0))


def check(out: Output, data: Dataset) -> None:
    accepted = [orjson.loads(v) for _, v in data.all if orjson.loads(v)["message_id"] not in data.too_late]
    expected = reference_sessions(accepted)
    got = {
        sid: {f: (round(v[f], 2) if f == "revenue" else v[f]) for f in FIELDS} for sid, v in out.final.items()
    }
    assert set(got) == set(expected), "same session ids"
    mismatched = [sid for sid in expected if got[sid] != expected[sid]]
    assert not mismatched, [(got[s], expected[s]) for s in mismatched[:3]]
    assert sum(v["events"] for v in out.final.values()) == len(accepted)

    # versions only grow per id, each (id, version) once, retracted ids stay retracted
    last: dict[str, int] = {}
    for r in out.records:
        assert r["version"] > last.get(r["session_id"], 0), r
        last[r["session_id"]] = r["version"]
    for r in out.records:
        if r["retracted"]:
            assert r["session_id"] not in out.final and r["superseded_by"] in out.final

    # too-late events: exactly the designed ones, once each, as received, keyed by user_key
    late = {orjson.loads(m.value)["message_id"]: m for m in out.late}
    assert len(out.late) == len(late) and set(late) == set(data.too_late)
    for mid, m in late.items():
        assert m.value == data.too_late[mid] and m.key.decode() == orjson.loads(m.value)["user_key"]

    scenario = {v["user_key"]: v for v in out.final.values() if v["user_key"].startswith("scn-")}
    assert scenario["scn-bridge"]["session_id"] == data.published_first["bridge_a"]
    assert scenario["scn-bridge"]["events"] == 5
    assert scenario["scn-late"]["version"] == 4 and scenario["scn-late"]["entry_page"] == "/"
    assert scenario["scn-backfill"]["session_id"] == _sid("scn-backfill", "backfill-0")
    assert scenario["scn-order"]["converted"] and scenario["scn-order"]["revenue"] == 199.5
    assert scenario["scn-bounce"]["is_bounce"] and not scenario["scn-order"]["is_bounce"]
    assert scenario["scn-ooo"]["events"] == 6 and scenario["scn-ooo"]["entry_page"] == "/p/0"


# ------------------------------------------------------------------------------------------ tests


def test_bounded_run_matches_batch_reference(job_env: dict[str, str], tmp_path: Path) -> None:
    data = build_dataset()
    env = job_env_for(job_env, tmp_path)
    bootstrap, prefix = env["KAFKA_BOOTSTRAP_SERVERS"], env["CLICKPULSE_TOPIC_PREFIX"]
    produce_rows(bootstrap, f"{prefix}events.enriched", data.all)

    run_bounded(env, tmp_path, "--starting-offsets", "earliest", "--parallelism", "2")

    check(read_output(bootstrap, prefix), data)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # a process kill, not a clean cancel
    proc.wait(30)


def produce_sentinels(bootstrap: str, topic: str, partitions: int = 4) -> None:
    """One event a day ahead on every partition: once each partition has been read up to it, the
    watermark passes every real session (a bounded source would end with a MAX watermark instead,
    but a bounded Kafka source restored from a checkpoint never finishes: FLINK-31006)."""
    send_markers(
        bootstrap, topic, lambda part: _row_value(f"zz-sentinel-{part}", f"sentinel-{part}"), partitions
    )


def _row_value(user: str, mid: str) -> tuple[str, dict[str, Any]]:
    return user, scenario_event(user, M + 24 * H, mid)


def test_kill_and_restore_gives_the_same_final_sessions(job_env: dict[str, str], tmp_path: Path) -> None:
    data = build_dataset()
    env = job_env_for(job_env, tmp_path)
    bootstrap, prefix = env["KAFKA_BOOTSTRAP_SERVERS"], env["CLICKPULSE_TOPIC_PREFIX"]
    topic = f"{prefix}events.enriched"
    produce_rows(bootstrap, topic, data.phase1)

    proc = start_job(
        "sessionize",
        with_log_dir(env, tmp_path, "first-run"),
        tmp_path / "first-run.log",
        "--starting-offsets",
        "earliest",
    )
    try:
        # wait until the scenario sessions are published and committed (so phase 2 updates them)
        deadline = time.monotonic() + 300
        wanted = set(data.published_first.values())
        while time.monotonic() < deadline:
            seen = {m.key.decode() for m in read_topic(bootstrap, f"{prefix}sessions", quiet_s=1.0)}
            if wanted <= seen:
                break
            assert proc.poll() is None, flink_log_tail(tmp_path)
            time.sleep(2)
        else:
            pytest.fail("scenario sessions were not published before the kill\n" + flink_log_tail(tmp_path))
        produce_rows(bootstrap, topic, data.phase2 + data.phase3)
        time.sleep(2.0)  # mid-stream: part of it processed, maybe checkpointed, maybe not
    finally:
        kill(proc)

    checkpoints = Path(env["CLICKPULSE_STATE_DIR"]) / "flink" / "sessionize" / "checkpoints"
    assert list(checkpoints.glob("*/chk-*/_metadata")), "a retained checkpoint"
    produce_sentinels(bootstrap, topic)
    proc = start_job(
        "sessionize",
        with_log_dir(env, tmp_path, "restored-run"),
        tmp_path / "restored-run.log",
        "--restore",
        "auto",
    )
    try:
        deadline = time.monotonic() + 360
        while True:
            out = read_output(bootstrap, prefix)
            try:
                check(out, data)
                break
            except (AssertionError, KeyError):
                if time.monotonic() > deadline:
                    raise
                assert proc.poll() is None, flink_log_tail(tmp_path)
                time.sleep(3)
        # nothing else may arrive: the job has committed its input to the end, and a checkpoint after
        # that committed whatever it made of it (and of the watermark it reached)
        until(
            lambda: offsets_committed_to_end(bootstrap, topic, env["CLICKPULSE_JOB_GROUP_ID"]),
            120,
            "the restored job to commit its input offsets to the end",
            every_s=1.0,
        )
        at_end = time.time()
        until(lambda: checkpoint_after(checkpoints, at_end), 60, "a checkpoint after the input's end")
        out = read_output(bootstrap, prefix)
    finally:
        kill(proc)

    check(out, data)
    # the late events arrived after publication: an update, a merge and an id change were sent
    ids = data.published_first
    retracted = {r["session_id"]: r for r in out.records if r["retracted"]}
    assert retracted[ids["bridge_b"]]["superseded_by"] == ids["bridge_a"]
    assert retracted[ids["backfill"]]["superseded_by"] == _sid("scn-backfill", "backfill-0")
    versions = sorted(r["version"] for r in out.records if r["session_id"] == ids["late"])
    assert versions == [3, 4]


# ------------------------------------------------------------------ future-dated events (issue 14)


def produce_at(
    bootstrap: str, topic: str, rows: Sequence[tuple[dict[str, Any], int, int | None]]
) -> dict[int, int]:
    """Send ``(event, Kafka record time, partition or None)`` in order, as ingest would have written them
    at that time; returns the next offset per partition written to."""
    p = kafka_io.producer(bootstrap)
    futures = [
        p.send(topic, key=e["user_key"].encode(), value=orjson.dumps(e), timestamp_ms=ts, partition=part)
        for e, ts, part in rows
    ]
    p.flush()
    p.close()
    ends: dict[int, int] = {}
    for f in futures:
        meta = f.get(timeout=30)
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    return ends


@pytest.mark.fault
def test_future_dated_burst_does_not_move_the_watermark(job_env: dict[str, str], tmp_path: Path) -> None:
    """Ingest accepts events up to 24 h ahead of received_at. A burst of them (on every partition), then
    normal traffic: the watermark must not jump 23 h ahead, which would send every normal event to
    ``events.late`` and leave their sessions unpublished.

    Kafka record times are set as ingest would have written the records: the burst at T0 (dated T0 +
    23 h), the normal events at their event time, all in the past so the broker takes them.
    """
    env = job_env_for(job_env, tmp_path)
    bootstrap, prefix = env["KAFKA_BOOTSTRAP_SERVERS"], env["CLICKPULSE_TOPIC_PREFIX"]
    topic = f"{prefix}events.enriched"
    t0 = (int(time.time() * 1000) - 6 * H) // MIN * MIN
    partitions = range(4)

    burst = [
        (scenario_event(f"zz-future-{p}-{i}", t0 + 23 * H + i * MIN, f"future-{p}-{i}"), t0, p)
        for p in partitions
        for i in range(3)
    ]
    normal = []
    for u in range(8):
        user = f"n-{u}"
        first = [t0 + (10 + u) * MIN + j * 3 * MIN for j in range(4)]  # a session of 4 events
        second = [first[-1] + 45 * MIN + j * 2 * MIN for j in range(3)]  # and one of 3, 45 min later
        normal += [scenario_event(user, ts, f"{user}-{ts}", path=f"/p/{ts % 7}") for ts in first + second]
    normal.sort(key=lambda e: (e["event_time_ms"], e["message_id"]))
    # an event 3 h after T0 on every partition: once read, the watermark passes every normal session
    sentinels = [
        (scenario_event(f"zz-sentinel-{p}", t0 + 3 * H, f"sentinel-{p}"), t0 + 3 * H, p) for p in partitions
    ]
    expected = reference_sessions(normal)

    proc = start_job(
        "sessionize",
        with_log_dir(env, tmp_path, "burst"),
        tmp_path / "burst.log",
        "--starting-offsets",
        "earliest",
    )
    try:
        produce_at(bootstrap, topic, burst)
        # the job has read the burst (its offsets are committed with a checkpoint), and one more checkpoint
        # later its periodic watermark (every 200 ms) has long been emitted: the normal events come after it
        group = env["CLICKPULSE_JOB_GROUP_ID"]

        def alive_and(check: Callable[[], bool]) -> Callable[[], bool]:
            def probe() -> bool:
                assert proc.poll() is None, flink_log_tail(tmp_path)
                return check()

            return probe

        until(alive_and(lambda: offsets_committed_to_end(bootstrap, topic, group)), 300, "the burst consumed")
        read_at = time.time()
        checkpoints = Path(env["CLICKPULSE_STATE_DIR"]) / "flink" / "sessionize" / "checkpoints"
        until(alive_and(lambda: checkpoint_after(checkpoints, read_at)), 300, "a checkpoint after the burst")

        produce_at(bootstrap, topic, [(e, e["event_time_ms"], None) for e in normal])
        produce_at(bootstrap, topic, sentinels)

        # until every normal session is published, or anything turns up in events.late
        deadline = time.monotonic() + 300
        while True:
            out = read_output(bootstrap, prefix)
            got = {sid: v for sid, v in out.final.items() if v["user_key"].startswith("n-")}
            if out.late or set(expected) <= set(got) or time.monotonic() > deadline:
                break
            assert proc.poll() is None, flink_log_tail(tmp_path)
            time.sleep(2)
    finally:
        kill(proc)

    late = sorted(orjson.loads(m.value)["message_id"] for m in out.late)
    assert not late, f"{len(late)} events sent to events.late, e.g. {late[:5]}"
    assert {sid: {f: v[f] for f in FIELDS} for sid, v in got.items()} == expected
