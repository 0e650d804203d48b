"""The ingest stage's pure logic: one output per record, identity by stream position, fail-open."""

from __future__ import annotations

import orjson
import pytest

from devstack.simulator import SimConfig, generate
from udfs.ingest import (
    DLQ,
    OK,
    IngestOptions,
    IngestStage,
    Link,
    MemoryIdentityStore,
    MemoryProfileStore,
    StoreUnavailable,
)

pytestmark = pytest.mark.unit

T0 = 1_795_000_000_000  # 2026-11-18T...Z, fixed
UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0 Safari/537.36"
)


def ev(
    mid: str, *, typ: str = "page", anon: str | None = "a-1", user: str | None = None, t: int = T0, **extra
):
    body = {
        "message_id": mid,
        "type": typ,
        "anonymous_id": anon,
        "user_id": user,
        "timestamp": t,
        "context": {
            "ip": "8.8.8.8",
            "user_agent": UA,
            "page": {"url": "https://shop.example/p/1?utm_source=x"},
        },
    }
    body.update(extra)
    return orjson.dumps(body)


def run(stage: IngestStage, values: list[bytes], first_offset: int = 0, partition: int = 0):
    n = len(values)
    return stage.process_batch(
        values, [T0 + 1000] * n, [partition] * n, list(range(first_offset, first_offset + n)), [b"k"] * n
    )


class DownStore:
    def get_many(self, ids):
        raise StoreUnavailable("down")

    def put_many(self, links):
        raise StoreUnavailable("down")


def test_every_record_yields_exactly_one_output():
    stage = IngestStage(IngestOptions(), MemoryIdentityStore())
    values = [ev("m1"), b"{not json", b"\xff\xfe", ev("m2", typ="track"), ev("m1")]
    out = run(stage, values)
    assert out.kinds == [OK, DLQ, DLQ, DLQ, OK]  # track without event is a schema violation
    assert out.message_ids[0] == "m1" and out.message_ids[4] == "m1"  # dedup is the JVM's job
    dlq = [orjson.loads(p) for k, p in zip(out.kinds, out.payloads, strict=True) if k == DLQ]
    assert [d["error_code"] for d in dlq] == ["invalid_json", "invalid_utf8", "schema_violation"]
    assert dlq[0]["payload"] == "{not json" and dlq[0]["offset"] == 1 and dlq[0]["partition"] == 0
    assert dlq[1]["payload_encoding"] == "base64"
    assert stage.counters.records_in == 5 and stage.counters.valid == 2
    assert stage.counters.dlq == {"invalid_json": 1, "invalid_utf8": 1, "schema_violation": 1}
    # the event time column the pipeline's keyed parts use as rowtime: the payload's, 0 for DLQ rows
    assert [
        orjson.loads(p)["event_time_ms"] if k == OK else 0
        for k, p in zip(out.kinds, out.payloads, strict=True)
    ] == out.event_times
    assert out.event_times[0] > 0


def test_enriched_payload_has_contract_fields():
    stage = IngestStage(IngestOptions(), MemoryIdentityStore(), MemoryProfileStore({"a-1": {"plan": "pro"}}))
    out = run(stage, [ev("m1")])
    rec = orjson.loads(out.payloads[0])
    for field in (
        "message_id type event anonymous_id user_id user_key timestamp sent_at received_at ip user_agent "
        "page_url page_path page_host referrer locale properties traits browser browser_version os "
        "device_type is_bot country utm_source utm_medium utm_campaign utm_term utm_content click_id_type "
        "referrer_type referrer_host"
    ).split():
        assert field in rec, field
    assert rec["browser"] == "Chrome" and rec["os"] == "Windows" and rec["device_type"] == "desktop"
    assert rec["country"] == "US" and rec["utm_source"] == "x" and rec["page_path"] == "/p/1"
    assert rec["profile"] == {"plan": "pro"} and rec["profile_status"] == "ok"


def test_identity_applies_only_after_the_linking_record():
    store = MemoryIdentityStore()
    stage = IngestStage(IngestOptions(), store)
    out = run(stage, [ev("m1"), ev("m2", typ="identify", user="u-9"), ev("m3")])
    assert out.user_keys == ["a-1", "u-9", "u-9"]
    assert store.links["a-1"] == Link("u-9", 0, 1, T0)

    # A replay from offset 0 after a restart: the store already has the link made at offset 1,
    # yet the record at offset 0 still resolves to the anonymous id, exactly as in the first run.
    replay = IngestStage(IngestOptions(), store)
    again = run(replay, [ev("m1"), ev("m2", typ="identify", user="u-9"), ev("m3")])
    assert again.user_keys == out.user_keys


def test_alias_links_previous_id():
    stage = IngestStage(IngestOptions(), MemoryIdentityStore())
    out = run(stage, [ev("m1", typ="alias", anon="a-1", user="u-2", previous_id="a-1"), ev("m2")])
    assert out.user_keys == ["u-2", "u-2"]


def test_store_down_fails_open_and_counts():
    stage = IngestStage(IngestOptions(), DownStore(), DownStore())
    out = run(stage, [ev("m1"), ev("m2", typ="identify", user="u-9"), ev("m3")])
    assert out.kinds == [OK, OK, OK]
    assert out.user_keys == ["a-1", "u-9", "u-9"]  # the in-memory link still applies
    assert orjson.loads(out.payloads[0])["profile_status"] == "fallback"
    assert stage.counters.identity_fallbacks >= 1 and stage.counters.profile_fallbacks == 3


def test_stage_matches_simulator_truth_end_to_end():
    """The whole simulated corpus through the stage (one partition per key, like Kafka) = the truth."""
    records, truth = generate(SimConfig(events=3000, seed=11))
    stage = IngestStage(IngestOptions(), MemoryIdentityStore())
    parts: dict[bytes | None, list[int]] = {}
    for i, r in enumerate(records):
        parts.setdefault(r.key, []).append(i)
    partition_of = {k: hash(k) % 4 for k in parts}
    seen: set[str] = set()
    ok = dup = 0
    keys: dict[str, str] = {}
    for start in range(0, len(records), 500):
        batch = records[start : start + 500]
        out = stage.process_batch(
            [r.value for r in batch],
            [r.timestamp_ms for r in batch],
            [partition_of[r.key] for r in batch],
            list(range(start, start + len(batch))),
            [r.key for r in batch],
        )
        for kind, mid, ukey in zip(out.kinds, out.message_ids, out.user_keys, strict=True):
            if kind == OK and mid not in seen:
                seen.add(mid)
                keys[mid] = ukey
                ok += 1
            elif kind == OK:
                dup += 1
    assert ok == truth.unique_valid and dup == truth.duplicate_count
    assert dict(stage.counters.dlq) == {k: v for k, v in truth.invalid_counts.items() if v}
    assert keys == truth.expected_user_key
