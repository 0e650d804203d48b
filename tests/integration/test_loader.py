"""The loader against the real stack: Kafka topics of its own, a ClickHouse database of its own per test.

Input is realistic: the simulator's raw clickstream run through the ingest stage (validation, identity,
enrichment) gives enriched events; sessions with several versions and retractions are built from them;
a few unloadable records are mixed in. Every table and rollup is compared with the same aggregate
computed here in Python, after a normal run, a replay from the beginning, a crash mid-batch (SIGKILL-like
exit before the commit, twice) and a ClickHouse outage.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from connectors import kafka as kafka_io
from connectors.clickhouse import client_from_url, wait_healthy
from connectors.loader import EVENTS, Loader, LoaderConfig, LoaderCounters, Msg, StartingOffsets, convert
from connectors.migrate import migrate
from connectors.query import load_query
from connectors.settings import Connections
from devstack.simulator import SimConfig, generate
from tests.support import until
from udfs.ingest import OK, IngestOptions, IngestStage, MemoryIdentityStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SESSION_GAP_MS = 30 * 60 * 1000


# ============================================================================ the data set and its truth


@dataclass
class Dataset:
    """Records to produce and what ClickHouse must end up holding."""

    events: list[dict[str, Any]]
    event_records: list[tuple[bytes, bytes]]
    session_records: list[tuple[bytes, bytes]]
    bad_records: list[tuple[bytes, bytes]]
    latest_sessions: dict[str, dict[str, Any]] = field(default_factory=dict)


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def _sessions(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Session versions as the sessionize job would emit them: a first version over the first half of a
    session's events, a final version over all of them, and every fifth session retracted (merged)."""
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_user[e["user_key"]].append(e)
    versions: list[dict[str, Any]] = []
    latest: dict[str, dict[str, Any]] = {}
    n = 0
    for user_key, evs in sorted(by_user.items()):
        evs.sort(key=lambda e: e["event_time_ms"])
        groups: list[list[dict[str, Any]]] = [[evs[0]]]
        for e in evs[1:]:
            if e["event_time_ms"] - groups[-1][-1]["event_time_ms"] >= SESSION_GAP_MS:
                groups.append([])
            groups[-1].append(e)
        for g in groups:
            n += 1
            sid = f"s-{uuid.uuid5(uuid.NAMESPACE_URL, user_key + g[0]['message_id'])}"

            def record(part: list[dict[str, Any]], version: int, sid: str = sid) -> dict[str, Any]:
                orders = [e for e in part if e["event"] == "Order Completed"]
                pages = [e for e in part if e["type"] == "page"]
                first = part[0]
                return {
                    "session_id": sid,
                    "user_key": first["user_key"],
                    "anonymous_id": first["anonymous_id"],
                    "start": first["timestamp"],
                    "end": part[-1]["timestamp"],
                    "duration_s": (part[-1]["event_time_ms"] - first["event_time_ms"]) / 1000,
                    "events": len(part),
                    "page_views": len(pages),
                    "entry_page": pages[0]["page_path"] if pages else "",
                    "exit_page": pages[-1]["page_path"] if pages else "",
                    "utm_source": first["utm_source"],
                    "utm_medium": first["utm_medium"],
                    "utm_campaign": first["utm_campaign"],
                    "utm_term": first["utm_term"],
                    "utm_content": first["utm_content"],
                    "referrer_type": first["referrer_type"],
                    "country": first["country"],
                    "device_type": first["device_type"],
                    "is_bounce": len(part) == 1,
                    "converted": bool(orders),
                    "revenue": round(sum(float(o["properties"].get("revenue", 0)) for o in orders), 2),
                    "version": version,
                }

            half = g[: (len(g) + 1) // 2]
            versions.append(record(half, 1))
            final = record(g, 2)
            versions.append(final)
            if n % 5 == 0:
                versions.append({**final, "version": 3, "retracted": True})
            else:
                latest[sid] = final
    return versions, latest


@functools.cache
def dataset(events: int = 2400, seed: int = 11) -> Dataset:
    """Enriched events (ingest stage over simulated raw records, deduplicated), sessions, bad records."""
    raw, _truth = generate(SimConfig(events=events, seed=seed))
    stage = IngestStage(IngestOptions(), MemoryIdentityStore())
    out = stage.process_batch(
        [r.value for r in raw],
        [r.timestamp_ms for r in raw],
        [0] * len(raw),
        list(range(len(raw))),
        [r.key for r in raw],
    )
    seen: set[str] = set()
    enriched: list[dict[str, Any]] = []
    payloads: list[tuple[bytes, bytes]] = []
    for kind, mid, user_key, payload, _ in zip(*out, strict=True):
        if kind == OK and mid not in seen:
            seen.add(mid)
            enriched.append(orjson.loads(payload))
            payloads.append((user_key.encode(), payload))
    versions, latest = _sessions(enriched)
    session_records = [(v["session_id"].encode(), orjson.dumps(v)) for v in versions]
    good = enriched[0]
    bad = [
        (b"k1", b"{not json"),
        (b"k2", orjson.dumps({**good, "message_id": ""})),
        (b"k3", orjson.dumps({**good, "message_id": "bad-ts", "timestamp": "yesterday"})),
        (b"k4", orjson.dumps([1, 2, 3])),
        (b"k5", orjson.dumps({**good, "message_id": "bad-bot", "is_bot": "maybe"})),
    ]
    return Dataset(enriched, payloads, session_records, bad, latest)


def _minute(ms: int) -> datetime:
    return datetime.fromtimestamp(ms // 60000 * 60, UTC).replace(tzinfo=None)


def _day(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()


def expected(ds: Dataset) -> dict[str, Any]:
    """Every table and rollup, computed in Python from the input."""
    ev = ds.events
    per_minute = Counter((_minute(e["event_time_ms"]), e["event"] or f"${e['type']}") for e in ev)
    pages: Counter[tuple[Any, ...]] = Counter()
    page_views: Counter[tuple[Any, ...]] = Counter()
    for e in ev:
        key = (_minute(e["event_time_ms"]), e["page_host"], e["page_path"])
        pages[key] += 1
        page_views[key] += e["type"] == "page"
    dau: dict[date, set[str]] = defaultdict(set)
    for e in ev:
        if not e["is_bot"]:
            dau[_day(e["event_time_ms"])].add(e["user_key"])
    revenue: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
    for e in ev:
        if e["event"] == "Order Completed":
            p = e["properties"]
            rkey = (_day(e["event_time_ms"]), p.get("currency", ""), e["utm_source"], e["utm_campaign"])
            revenue[rkey][0] += 1
            revenue[rkey][1] += Decimal(repr(p.get("revenue", 0))).quantize(Decimal("0.0001"))
    sessions_per_day: Counter[date] = Counter(_day(_ms(s["start"])) for s in ds.latest_sessions.values())
    last_day = max(dau)
    wau = {
        d: len(set().union(*(u for dd, u in dau.items() if 0 <= (d - dd).days < 7)))
        for d in {dd.fromordinal(dd.toordinal() + k) for dd in dau for k in range(7)}
        if d <= last_day
    }
    return {
        "events": len(ev),
        "message_ids": len({e["message_id"] for e in ev}),
        "events_per_minute": dict(per_minute),
        "page_events_per_minute": {k: (v, page_views[k]) for k, v in pages.items()},
        "country_events_per_minute": dict(Counter((_minute(e["event_time_ms"]), e["country"]) for e in ev)),
        "device_events_per_minute": dict(
            Counter((_minute(e["event_time_ms"]), e["device_type"]) for e in ev)
        ),
        "utm_source_events_per_minute": dict(
            Counter((_minute(e["event_time_ms"]), e["utm_source"]) for e in ev)
        ),
        "daily_active_users": {d: len(u) for d, u in dau.items()},
        "weekly_active_users": wau,
        "revenue_per_day": {k: (v[0], v[1]) for k, v in revenue.items()},
        "sessions_latest": {sid: s["version"] for sid, s in ds.latest_sessions.items()},
        "sessions_per_day": dict(sessions_per_day),
    }


def actual(client: Any, db: str) -> dict[str, Any]:
    """The same numbers read back from ClickHouse (the views the users read)."""

    def rows(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in client.query(sql.replace("{db}", db)).result_rows]

    return {
        "events": rows("SELECT count() FROM {db}.events")[0][0],
        "message_ids": rows("SELECT uniqExact(message_id) FROM {db}.events")[0][0],
        "events_per_minute": {
            (m, e): n for m, e, n in rows("SELECT minute, event, events FROM {db}.events_per_minute")
        },
        "page_events_per_minute": {
            (m, h, p): (n, v)
            for m, h, p, n, v in rows(
                "SELECT minute, page_host, page_path, events, page_views FROM {db}.page_events_per_minute"
            )
        },
        "country_events_per_minute": {
            (m, c): n
            for m, c, n in rows("SELECT minute, country, events FROM {db}.country_events_per_minute")
        },
        "device_events_per_minute": {
            (m, d): n
            for m, d, n in rows("SELECT minute, device_type, events FROM {db}.device_events_per_minute")
        },
        "utm_source_events_per_minute": {
            (m, u): n
            for m, u, n in rows("SELECT minute, utm_source, events FROM {db}.utm_source_events_per_minute")
        },
        "daily_active_users": dict(rows("SELECT day, users FROM {db}.daily_active_users")),
        "weekly_active_users": dict(rows("SELECT day, users FROM {db}.weekly_active_users")),
        "revenue_per_day": {
            (d, c, s, k): (o, r)
            for d, c, s, k, o, r in rows(
                "SELECT day, currency, utm_source, utm_campaign, orders, revenue FROM {db}.revenue_per_day"
            )
        },
        "sessions_latest": dict(rows("SELECT session_id, version FROM {db}.sessions_latest")),
        "sessions_per_day": dict(rows("SELECT day, sessions FROM {db}.sessions_per_day")),
    }


def assert_matches(client: Any, db: str, ds: Dataset) -> None:
    """Every table and rollup equals its Python counterpart."""
    want, got = expected(ds), actual(client, db)
    for name in want:
        assert got[name] == want[name], f"{name} differs"


# ============================================================================ fixtures and helpers


@pytest.fixture()
def database(connections: Connections) -> Iterator[tuple[Any, str]]:
    """A freshly migrated database of this test (dropped afterwards)."""
    db = f"cp_test_{uuid.uuid4().hex[:12]}"
    client = client_from_url(connections.clickhouse_url.get_secret_value())
    migrate(client, db)
    yield client, db
    client.command(f"DROP DATABASE IF EXISTS {db}")
    client.close()


@dataclass
class Topics:
    events: str
    sessions: str
    dlq: str


@pytest.fixture()
def topics(topic_factory: Callable[..., str]) -> Topics:
    """This test's events.enriched / sessions / events.dlq topics (4 partitions each)."""
    return Topics(topic_factory("enriched"), topic_factory("sessions"), topic_factory("dlq"))


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Produce keyed records and wait for the acks."""
    p = kafka_io.producer(bootstrap)
    try:
        for key, value in records:
            p.send(topic, key=key, value=value)
        p.flush(timeout=60)
    finally:
        p.close()


def produce_all(bootstrap: str, t: Topics, ds: Dataset) -> None:
    """The data set into the test's topics (bad records spread through the events)."""
    ev = list(ds.event_records)
    for i, bad in enumerate(ds.bad_records):
        ev.insert((i + 1) * len(ev) // (len(ds.bad_records) + 1), bad)
    produce(bootstrap, t.events, ev)
    produce(bootstrap, t.sessions, ds.session_records)


def config(conn: Connections, t: Topics, db: str, **kw: Any) -> LoaderConfig:
    """A bounded loader config for this test's topics and database."""
    base: dict[str, Any] = {
        "bootstrap_servers": conn.kafka_bootstrap_servers,
        "clickhouse_url": conn.clickhouse_url.get_secret_value(),
        "database": db,
        "events_topic": t.events,
        "sessions_topic": t.sessions,
        "dlq_topic": t.dlq,
        "group_id": f"g-{uuid.uuid4().hex[:8]}",
        "batch_max_rows": 700,
        "batch_max_seconds": 0.5,
        "retry_initial_s": 0.1,
        "retry_max_s": 1.0,
        "bounded": True,
        "log_interval_s": 2.0,
    }
    base.update(kw)
    return LoaderConfig(**base)


def run_bounded(cfg: LoaderConfig, timeout_s: float = 90) -> LoaderCounters:
    """Run a bounded loader in a thread until it has caught up."""
    loader = Loader(cfg)
    result: list[LoaderCounters] = []
    th = threading.Thread(target=lambda: result.append(loader.run()), daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        loader.stop()
        th.join(30)
        pytest.fail(f"loader did not catch up within {timeout_s}s: {loader.counters.line()}")
    return result[0]


def dlq_count(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every record in the DLQ topic."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + 20
        while any(c.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=300).values():
                out.extend(orjson.loads(r.value) for r in recs)
        return out
    finally:
        c.close()


def reset_group(bootstrap: str, group: str, topic_names: list[str]) -> None:
    """Commit offset 0 on every partition for ``group`` (the group must have no members)."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t in topic_names for p in sorted(c.partitions_for_topic(t) or ())]
        c.assign(tps)
        c.commit({tp: OffsetAndMetadata(0, "", -1) for tp in tps})
    finally:
        c.close()


def loaded_offsets(client: Any, db: str, topic: str) -> int:
    """Records of ``topic`` the loader has finished with (sum of its high-water marks; offsets from 0)."""
    return int(
        client.command(
            f"SELECT sum(e) FROM (SELECT max(end_offset) AS e FROM {db}.loader_offsets "
            "WHERE topic = {t:String} GROUP BY partition)",
            parameters={"t": topic},
        )
    )


# ============================================================================ tests


def test_mv_dedup_needs_window_and_setting(database: tuple[Any, str]) -> None:
    """Proof of the dedup chain on this server: repeating an insert with the same token leaves `events` and
    every rollup unchanged *with* deduplicate_blocks_in_dependent_materialized_views=1 and a dedup window
    on the MV targets; on ClickHouse 26.x (the embedded endpoint) either one missing double counts."""
    client, db = database
    ds = dataset()
    spec_rows = [Msg("t", 0, i, k, v) for i, (k, v) in enumerate(ds.event_records[:300])]
    table = convert(EVENTS, spec_rows).table
    assert table.num_rows == 300
    good = {"insert_deduplication_token": "proof-1", "deduplicate_blocks_in_dependent_materialized_views": 1}

    def state() -> tuple[int, int, int]:
        return (
            client.command(f"SELECT count() FROM {db}.events"),
            client.command(f"SELECT sum(events) FROM {db}.events_per_minute"),
            client.command(f"SELECT sum(events) FROM {db}.country_events_per_minute"),
        )

    for _ in range(3):
        client.insert_arrow("events", table, database=db, settings=good)
    assert state() == (300, 300, 300)

    major = int(str(client.server_version).split(".")[0])
    # Control 1: the same token without the setting: the source drops the block, the MVs do not.
    client.insert_arrow(
        "events",
        table,
        database=db,
        settings={**good, "deduplicate_blocks_in_dependent_materialized_views": 0},
    )
    if major >= 25:
        assert state() == (300, 600, 600)
    # Control 2: an MV target without non_replicated_deduplication_window double counts even with it.
    client.command(
        f"CREATE TABLE {db}.nowindow (minute DateTime('UTC'), events AggregateFunction(count)) "
        "ENGINE = AggregatingMergeTree ORDER BY minute"
    )
    client.command(
        f"CREATE MATERIALIZED VIEW {db}.nowindow_mv TO {db}.nowindow AS "
        "SELECT toStartOfMinute(timestamp) AS minute, countState() AS events "
        f"FROM {db}.events GROUP BY minute"
    )
    before = state()
    for _ in range(2):
        client.insert_arrow(
            "events", table, database=db, settings={**good, "insert_deduplication_token": "proof-2"}
        )
    after = state()
    assert after[0] == before[0] + 300  # the repeat was dropped by events...
    assert after[1] == before[1] + 300  # ...and by the windowed rollups...
    nowindow = client.command(f"SELECT countMerge(events) FROM {db}.nowindow")
    if major >= 25:
        assert nowindow == 600  # ...but not by the target without a window


def test_load_rollups_and_replay(connections: Connections, database: tuple[Any, str], topics: Topics) -> None:
    """Load everything, compare every rollup with Python; then replay from offset 0 (same group, other
    batch sizes, and a new group reading from earliest): nothing changes."""
    client, db = database
    ds = dataset()
    produce_all(connections.kafka_bootstrap_servers, topics, ds)
    cfg = config(connections, topics, db)
    first = run_bounded(cfg)
    assert first.rows == {"events": len(ds.event_records), "sessions": len(ds.session_records)}
    assert first.dlq == len(ds.bad_records)
    assert first.batches >= 3
    assert_matches(client, db, ds)
    dlq = dlq_count(connections.kafka_bootstrap_servers, topics.dlq)
    assert len(dlq) == len(ds.bad_records)
    assert {d["error_code"] for d in dlq} == {"load_error"}
    assert {d["source_topic"] for d in dlq} == {topics.events}

    # replay: reset the group to the beginning; different batch boundaries this time
    reset_group(connections.kafka_bootstrap_servers, cfg.group_id, [topics.events, topics.sessions])
    again = run_bounded(config(connections, topics, db, group_id=cfg.group_id, batch_max_rows=333))
    assert again.rows == {"events": 0, "sessions": 0}
    assert again.skipped_loaded == len(ds.event_records) + len(ds.bad_records) + len(ds.session_records)
    assert_matches(client, db, ds)
    # a new group starting from earliest
    other = run_bounded(config(connections, topics, db, starting_offsets=StartingOffsets.EARLIEST))
    assert other.rows == {"events": 0, "sessions": 0}
    assert_matches(client, db, ds)
    assert len(dlq_count(connections.kafka_bootstrap_servers, topics.dlq)) == len(ds.bad_records)

    # the saved queries run against the loaded data
    every_day = {"date_from": "1970-01-02", "date_to": "2100-01-01"}
    in_db = client_from_url(connections.clickhouse_url.get_secret_value(), database=db)
    saved = load_query("funnel")
    funnel = [r[1:] for r in in_db.query(saved.sql, parameters=saved.bind(every_day)).result_rows]
    viewers = {e["user_key"] for e in ds.events if e["event"] == "Product Viewed" and not e["is_bot"]}
    buyers = {e["user_key"] for e in ds.events if e["event"] == "Order Completed" and not e["is_bot"]}
    assert [r[0] for r in funnel] == ["Product Viewed", "Product Added", "Order Completed"]
    assert funnel[0][1] == len(viewers)
    assert funnel[0][1] >= funnel[1][1] >= funnel[2][1] > 0
    assert funnel[2][1] <= len(buyers)
    saved = load_query("retention")
    retention = in_db.query(saved.sql, parameters=saved.bind(every_day)).result_rows
    in_db.close()
    humans = {e["user_key"] for e in ds.events if not e["is_bot"]}
    assert sum(r[2] for r in retention if r[1] == 0) == len(humans)
    assert all(r[2] <= r[3] and (r[1] != 0 or r[2] == r[3]) for r in retention)


def _job_env(conn: Connections, db: str, group: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKPULSE_")}
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": conn.kafka_bootstrap_servers,
            "CLICKHOUSE_URL": conn.clickhouse_url.get_secret_value(),
            "CLICKPULSE_STATE_DIR": str(home),
            "CLICKPULSE_CLICKHOUSE_DATABASE": db,
            "CLICKPULSE_TOPIC_PREFIX": "",
            "CLICKPULSE_JOB_GROUP_ID": group,
            "CLICKPULSE_LOAD_BATCH_MAX_ROWS": "400",
            "CLICKPULSE_LOAD_BATCH_MAX_AGE_MS": "300",
            "CLICKPULSE_JOB_LOG_INTERVAL_MS": "5000",
            "CLICKPULSE_LOAD_SESSION_TIMEOUT_MS": "6000",
            **extra,
        }
    )
    return env


def test_crash_mid_batch(connections: Connections, database: tuple[Any, str], tmp_path: Path) -> None:
    """`python -m jobs.load` exits right after an insert, before committing (test hook); the restart
    replays the intent (and crashes again right after that replay's insert); the third run replays it once
    more, catches up and stops cleanly on SIGTERM. No loss, no double count, rollups included."""
    client, db = database
    ds = dataset()
    # the job reads fixed contract topic names under a prefix: use the prefix to point at the test topics
    prefix = f"t{uuid.uuid4().hex[:8]}."
    names = {
        "events.enriched": f"{prefix}events.enriched",
        "sessions": f"{prefix}sessions",
        "events.dlq": f"{prefix}events.dlq",
    }
    kafka_io.ensure_topics(connections.kafka_bootstrap_servers, {n: {} for n in names.values()}, partitions=4)
    t = Topics(names["events.enriched"], names["sessions"], names["events.dlq"])
    try:
        produce_all(connections.kafka_bootstrap_servers, t, ds)
        group = f"g-{uuid.uuid4().hex[:8]}"
        cmd = [sys.executable, "-m", "jobs.load", "--bounded"]

        def run(**extra: str) -> subprocess.CompletedProcess[str]:
            env = _job_env(connections, db, group, tmp_path, CLICKPULSE_TOPIC_PREFIX=prefix, **extra)
            return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

        crashed = run(CLICKPULSE_LOAD_FAIL_AFTER_INSERT="3")
        assert crashed.returncode == 17, crashed.stderr[-2000:]
        partial = client.command(f"SELECT count() FROM {db}.events")
        assert 0 < partial < len(ds.event_records)

        replayed = run(CLICKPULSE_LOAD_FAIL_AFTER_INSERT="1")
        assert replayed.returncode == 17, replayed.stderr[-2000:]
        assert "replaying intent" in replayed.stderr
        assert client.command(f"SELECT count() FROM {db}.events") == partial  # the repeat was dropped

        # third run: unbounded; once everything is in, SIGTERM must stop it cleanly (exit 0)
        env = _job_env(connections, db, group, tmp_path, CLICKPULSE_TOPIC_PREFIX=prefix)
        log_path = tmp_path / "load.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(cmd[:-1], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                until(
                    lambda: (
                        loaded_offsets(client, db, t.sessions) == len(ds.session_records)
                        and loaded_offsets(client, db, t.events)
                        == len(ds.event_records) + len(ds.bad_records)
                    ),
                    60,
                    "the restarted loader to catch up",
                )
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        out = log_path.read_text()
        assert "replaying intent" in out and "loader stopped" in out
        assert_matches(client, db, ds)
    finally:
        kafka_io.delete_topics(connections.kafka_bootstrap_servers, list(names.values()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_chserver(data_dir: Path, port: int, log_file: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack.chserver", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), "--log-file", str(log_file)],
        cwd=REPO,
    )  # fmt: skip
    wait_healthy(f"http://127.0.0.1:{port}", 60)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_clickhouse_outage(connections: Connections, topics: Topics, tmp_path: Path) -> None:
    """The loader keeps its batch while ClickHouse is down (own endpoint, stopped with SIGTERM while
    records are produced), catches up after the restart on the same port and data dir: nothing lost,
    nothing doubled."""
    ds = dataset()
    port = _free_port()
    data_dir = tmp_path / "ch"
    url = f"http://127.0.0.1:{port}"
    server = _start_chserver(data_dir, port, tmp_path / "ch.log")
    db = "cp_outage"
    migrate(url, db)
    conn = Connections(KAFKA_BOOTSTRAP_SERVERS=connections.kafka_bootstrap_servers, CLICKHOUSE_URL=url)
    loader = Loader(config(conn, topics, db, bounded=False, batch_max_rows=500))
    th = threading.Thread(target=loader.run, daemon=True)
    th.start()
    try:
        half = len(ds.event_records) // 2
        produce(connections.kafka_bootstrap_servers, topics.events, ds.event_records[:half])
        client = client_from_url(url)
        until(lambda: client.command(f"SELECT count() FROM {db}.events") == half, 60, "first half")
        client.close()

        _stop(server)
        produce(connections.kafka_bootstrap_servers, topics.events, ds.event_records[half:])
        produce(connections.kafka_bootstrap_servers, topics.sessions, ds.session_records)
        until(lambda: loader.counters.retries >= 2, 30, "insert retries while ClickHouse is down")
        assert th.is_alive()

        server = _start_chserver(data_dir, port, tmp_path / "ch.log")
        client = client_from_url(url)
        until(
            lambda: (
                loader.counters.rows["sessions"] == len(ds.session_records)
                and client.command(f"SELECT count() FROM {db}.events") == len(ds.event_records)
            ),
            90,
            "catch-up after the restart",
        )
        loader.stop()
        th.join(30)
        assert not th.is_alive()
        assert_matches(client, db, Dataset(ds.events, [], [], [], ds.latest_sessions))
        client.close()
    finally:
        loader.stop()
        th.join(30)
        _stop(server)


# ============================================================================ rows ClickHouse refuses

KNOWN_TYPES = "CHECK type IN ('track', 'page', 'identify', 'alias')"


def _with_constraints(client: Any, db: str) -> None:
    """Constraints an operator could add: a known event type; a session that does not end before it starts."""
    client.command(f"ALTER TABLE {db}.events ADD CONSTRAINT known_type {KNOWN_TYPES}")
    client.command(f"ALTER TABLE {db}.sessions ADD CONSTRAINT ends_after_start CHECK `end` >= start")


def _refused(ds: Dataset) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """Records the loader converts fine but the constraints above refuse (events, sessions)."""
    ev = [
        (b"r1", orjson.dumps({**ds.events[3], "message_id": "refused-1", "type": "screen"})),
        (b"r2", orjson.dumps({**ds.events[9], "message_id": "refused-2", "type": "Group"})),
    ]
    last = orjson.loads(ds.session_records[5][1])
    se = [(b"r3", orjson.dumps({**last, "session_id": "s-refused", "end": "2020-01-01T00:00:00Z"}))]
    return ev, se


def _check_refused_dlq(dlq: list[dict[str, Any]], t: Topics, refused: list[tuple[bytes, bytes]]) -> None:
    got = [d for d in dlq if d["error_code"] == "clickhouse_rejected"]
    assert sorted(d["payload"].encode() for d in got) == sorted(v for _, v in refused)
    for d in got:
        assert "VIOLATED_CONSTRAINT" in d["error_detail"] and d["error_detail"].startswith("Code: 469.")
        assert d["source_topic"] in {t.events, t.sessions} and d["partition"] >= 0 and d["offset"] >= 0
        name = "known_type" if d["source_topic"] == t.events else "ends_after_start"
        assert name in d["error_detail"]


@pytest.mark.fault
def test_refused_rows_dead_lettered(
    connections: Connections, database: tuple[Any, str], topics: Topics
) -> None:
    """Rows ClickHouse refuses (CHECK constraints) go to events.dlq with ClickHouse's reason after bounded
    retries; the rest of their batches load, every rollup matches; a replay from offset 0 changes nothing.
    Before: the refused insert was retried forever and nothing after it loaded."""
    client, db = database
    _with_constraints(client, db)
    ds = dataset()
    bad_ev, bad_se = _refused(ds)
    bootstrap = connections.kafka_bootstrap_servers
    ev = list(ds.event_records)
    for i, rec in enumerate(bad_ev):
        ev.insert((i + 1) * len(ev) // 3, rec)
    produce(bootstrap, topics.events, ev)
    produce(bootstrap, topics.sessions, [*ds.session_records[:50], *bad_se, *ds.session_records[50:]])
    cfg = config(connections, topics, db, reject_attempts=2)
    first = run_bounded(cfg, timeout_s=150)
    assert first.rejected == first.dlq == 3
    assert first.rows == {"events": len(ds.event_records), "sessions": len(ds.session_records)}
    assert_matches(client, db, ds)
    dlq = dlq_count(bootstrap, topics.dlq)
    assert len(dlq) == 3
    _check_refused_dlq(dlq, topics, bad_ev + bad_se)
    assert loaded_offsets(client, db, topics.events) == len(ev)  # the marks cover the refused rows too

    reset_group(bootstrap, cfg.group_id, [topics.events, topics.sessions])
    again = run_bounded(config(connections, topics, db, group_id=cfg.group_id, batch_max_rows=333))
    assert again.rows == {"events": 0, "sessions": 0} and again.dlq == 0
    assert_matches(client, db, ds)


@pytest.mark.fault
def test_crash_while_bisecting(connections: Connections, database: tuple[Any, str], tmp_path: Path) -> None:
    """`python -m jobs.load` exits in the middle of bisecting a refused batch (test hook), twice; each restart
    replays the intent, splits it the same way (same tokens, ClickHouse drops what landed) and the third run
    finishes: every good row exactly once, the refused rows in the DLQ, rollups included."""
    client, db = database
    _with_constraints(client, db)
    ds = dataset()
    bad_ev, _ = _refused(ds)
    prefix = f"t{uuid.uuid4().hex[:8]}."
    t = Topics(f"{prefix}events.enriched", f"{prefix}sessions", f"{prefix}events.dlq")
    names = [t.events, t.sessions, t.dlq]
    bootstrap = connections.kafka_bootstrap_servers
    kafka_io.ensure_topics(bootstrap, {n: {} for n in names}, partitions=4)
    try:
        ev = list(ds.event_records)
        ev.insert(len(ev) // 4, bad_ev[0])
        ev.insert(3 * len(ev) // 4, bad_ev[1])
        produce(bootstrap, t.events, ev)
        group = f"g-{uuid.uuid4().hex[:8]}"
        cmd = [sys.executable, "-m", "jobs.load", "--bounded"]
        # one batch holding every record: its first insert is refused, every later insert is a bisection step
        extra = {
            "CLICKPULSE_TOPIC_PREFIX": prefix,
            "CLICKPULSE_LOAD_BATCH_MAX_ROWS": "20000",
            "CLICKPULSE_LOAD_BATCH_MAX_AGE_MS": "4000",
            "CLICKPULSE_LOAD_REJECT_ATTEMPTS": "1",
        }

        def run(**more: str) -> subprocess.CompletedProcess[str]:
            env = _job_env(connections, db, group, tmp_path, **extra, **more)
            return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)

        for crash_after, replay in (("4", False), ("9", True)):
            crashed = run(CLICKPULSE_LOAD_FAIL_AFTER_INSERT=crash_after)
            assert crashed.returncode == 17, crashed.stderr[-3000:]
            assert "bisecting" in crashed.stderr and ("replaying intent" in crashed.stderr) == replay
            assert 0 < client.command(f"SELECT count() FROM {db}.events") < len(ds.event_records)
            assert client.command(f"SELECT count() - uniqExact(message_id) FROM {db}.events") == 0
        done = run()
        assert done.returncode == 0, done.stderr[-3000:]
        assert "replaying intent" in done.stderr
        assert_matches(client, db, Dataset(ds.events, [], [], [], {}))
        _check_refused_dlq(dlq_count(bootstrap, t.dlq), t, bad_ev)
    finally:
        kafka_io.delete_topics(bootstrap, names)


# ============================================================================ a topic deleted and recreated


def _recreate(bootstrap: str, topic: str) -> None:
    """Delete ``topic`` and create it again (same name, 4 partitions, a new topic id)."""
    before = kafka_io.topic_ids(bootstrap, [topic])[topic]
    kafka_io.delete_topics(bootstrap, [topic])
    until(lambda: topic not in kafka_io.topic_ids(bootstrap, [topic]), 60, "the topic deletion")

    def created() -> bool:
        try:
            kafka_io.ensure_topics(bootstrap, {topic: {}}, partitions=4)
        except Exception:  # still being deleted
            return False
        return kafka_io.topic_ids(bootstrap, [topic]).get(topic) not in (None, "", before)

    until(created, 60, "the topic to be created again")


@pytest.mark.fault
def test_topic_recreated(connections: Connections, database: tuple[Any, str], topics: Topics) -> None:
    """The events topic is deleted and created again with fewer records than the old high-water marks: a
    plain restart of the same group loads the new records (before: skipped silently as "already loaded",
    and tokens of the old topic could drop them too); another restart loads nothing twice."""
    client, db = database
    bootstrap = connections.kafka_bootstrap_servers
    old, new = dataset(), dataset(events=900, seed=12)
    produce(bootstrap, topics.events, old.event_records)
    cfg = config(connections, topics, db)
    assert run_bounded(cfg).rows["events"] == len(old.event_records)
    ids_before = kafka_io.topic_ids(bootstrap, [topics.events])
    assert ids_before[topics.events]  # Kafka 4 gives every topic an id

    _recreate(bootstrap, topics.events)
    produce(bootstrap, topics.events, new.event_records)
    assert len(new.event_records) < len(old.event_records) // 2
    second = run_bounded(cfg)
    want = len(old.event_records) + len(new.event_records)
    assert client.command(f"SELECT count() FROM {db}.events") == want
    assert client.command(f"SELECT uniqExact(message_id) FROM {db}.events") == want
    assert second.rows["events"] == len(new.event_records)
    assert second.recreated == 1

    # a plain restart (and a new group from earliest) of the new incarnation: nothing twice
    third = run_bounded(cfg)
    fourth = run_bounded(config(connections, topics, db, starting_offsets=StartingOffsets.EARLIEST))
    assert third.rows["events"] == fourth.rows["events"] == 0 and third.recreated == fourth.recreated == 0
    assert client.command(f"SELECT count() FROM {db}.events") == want
    assert_matches(client, db, Dataset(old.events + new.events, [], [], [], {}))


@pytest.mark.fault
def test_marks_from_before_topic_ids_are_adopted(
    connections: Connections, database: tuple[Any, str], topics: Topics
) -> None:
    """Marks written before migration 0009 (topic_id '') still apply on the first start after the upgrade
    (no double count), and are recorded under the topic's id from then on."""
    client, db = database
    bootstrap = connections.kafka_bootstrap_servers
    ds = dataset()
    produce(bootstrap, topics.events, ds.event_records)
    cfg = config(connections, topics, db)
    assert run_bounded(cfg).rows["events"] == len(ds.event_records)
    # what an older loader left behind: the same marks without an id, and commits without metadata
    marks = client.query(
        f"SELECT topic, partition, end_offset, loaded_table FROM {db}.loader_offsets"
    ).result_rows
    client.command(f"TRUNCATE TABLE {db}.loader_offsets")
    client.insert(
        "loader_offsets",
        marks,
        database=db,
        column_names=["topic", "partition", "end_offset", "loaded_table"],
    )
    reset_group(bootstrap, cfg.group_id, [topics.events, topics.sessions])
    again = run_bounded(cfg)
    assert again.rows["events"] == 0 and again.recreated == 0
    assert again.skipped_loaded == len(ds.event_records)
    tid = kafka_io.topic_ids(bootstrap, [topics.events])[topics.events]
    assert loaded_offsets(client, db, topics.events) == len(ds.event_records)
    ids = client.query(
        f"SELECT DISTINCT topic_id FROM {db}.loader_offsets WHERE topic = {{t:String}}",
        parameters={"t": topics.events},
    ).result_rows
    assert {r[0] for r in ids} == {"", tid}
