"""The clickstream simulator: determinism, realism and a ground truth that an independent check agrees with.

The checks below re-implement the ingest job's record checks (size -> UTF-8 -> JSON object -> JSON Schema ->
timestamp correction and range -> dedup) with the standard library and fastjsonschema, so they do not
share code with the simulator.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fastjsonschema
import orjson
import pytest
from crawlerdetect import CrawlerDetect
from geoip2fast import GeoIP2Fast
from ua_parser import parse as parse_ua

from devstack.simulator import (
    ERROR_CODES,
    MAX_FUTURE_MS,
    MAX_PAST_MS,
    SimConfig,
    SimRecord,
    Truth,
    generate,
)
from udfs.identity import identity_link, record_key, resolve_user_key

pytestmark = pytest.mark.unit

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "udfs" / "schemas" / "raw_event.schema.json"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)


# ------------------------------------------------------------------------------------------------
# independent re-implementation of the ingest checks


def _ts_ms(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("boolean timestamp")
    if isinstance(value, int | float):
        return int(value)
    dt = datetime.fromisoformat(value)
    assert dt.tzinfo is not None, f"naive timestamp {value!r}"
    return (dt - EPOCH) // MS


class Checked:
    """Outcome of checking one record: ``kind`` is an error code, ``duplicate`` or ``valid``."""

    def __init__(self, kind: str, event: dict[str, Any] | None = None, corrected_ms: int | None = None):
        self.kind = kind
        self.event = event
        self.corrected_ms = corrected_ms


def check_records(records: list[SimRecord], cap: int) -> list[Checked]:
    validate = fastjsonschema.compile(json.loads(SCHEMA_PATH.read_text()))
    seen: set[str] = set()
    out: list[Checked] = []
    for rec in records:
        if len(rec.value) > cap:
            out.append(Checked("size_exceeded"))
            continue
        try:
            text = rec.value.decode("utf-8")
        except UnicodeDecodeError:
            out.append(Checked("invalid_utf8"))
            continue
        try:
            event = json.loads(text)
        except ValueError:
            with pytest.raises(orjson.JSONDecodeError):  # the ingest job's parser agrees
                orjson.loads(rec.value)
            out.append(Checked("invalid_json"))
            continue
        assert orjson.loads(rec.value) == event
        if not isinstance(event, dict):
            out.append(Checked("invalid_json"))
            continue
        try:
            validate(event)
        except fastjsonschema.JsonSchemaException:
            out.append(Checked("schema_violation"))
            continue
        ts = _ts_ms(event["timestamp"])
        sent = event.get("sent_at")
        corrected = rec.timestamp_ms - (_ts_ms(sent) - ts) if sent is not None else ts
        if corrected > rec.timestamp_ms + 24 * 3600_000 or corrected < rec.timestamp_ms - 30 * 86400_000:
            out.append(Checked("timestamp_out_of_range"))
            continue
        if event["message_id"] in seen:
            out.append(Checked("duplicate", event, corrected))
            continue
        seen.add(event["message_id"])
        out.append(Checked("valid", event, corrected))
    return out


def valid_events(records: list[SimRecord], checked: list[Checked]) -> list[tuple[int, dict[str, Any], int]]:
    return [(i, c.event, c.corrected_ms) for i, c in enumerate(checked) if c.kind == "valid"]  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def sim() -> tuple[SimConfig, list[SimRecord], Truth, list[Checked]]:
    cfg = SimConfig(events=5000, seed=7)
    records, truth = generate(cfg)
    return cfg, records, truth, check_records(records, cfg.max_payload_bytes)


@pytest.fixture(scope="module")
def skewed() -> tuple[SimConfig, list[SimRecord], Truth, list[Checked]]:
    """Many skewed clocks and bots, a few days of simulated time."""
    cfg = SimConfig(events=4000, seed=3, skewed_clock_fraction=0.4, bot_fraction=0.25, span_s=3 * 86400)
    records, truth = generate(cfg)
    return cfg, records, truth, check_records(records, cfg.max_payload_bytes)


def _digest(records: list[SimRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(repr((r.key, r.timestamp_ms, len(r.value))).encode())
        h.update(r.value)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# determinism and accounting


def test_same_seed_same_bytes_and_different_seed_different_bytes() -> None:
    cfg = SimConfig(events=2500, seed=11)
    a_records, a_truth = generate(cfg)
    b_records, b_truth = generate(SimConfig(events=2500, seed=11))
    c_records, _ = generate(SimConfig(events=2500, seed=12))
    assert _digest(a_records) == _digest(b_records)
    assert a_truth.to_json() == b_truth.to_json()
    assert _digest(a_records) != _digest(c_records)


def test_totals_add_up(sim: Any) -> None:
    cfg, records, truth, _ = sim
    n_valid, n_dup, n_bad = cfg.counts()
    assert len(records) == truth.records == cfg.events
    assert truth.records == truth.unique_valid + truth.duplicate_count + sum(truth.invalid_counts.values())
    assert (truth.unique_valid, truth.duplicate_count, len(truth.invalid)) == (n_valid, n_dup, n_bad)
    assert n_dup == round(cfg.events * cfg.duplicate_fraction)
    assert n_bad == round(cfg.events * cfg.malformed_fraction)
    assert all(truth.invalid_counts[code] >= 1 for code in ERROR_CODES)
    positions = (
        [e.position for e in truth.valid]
        + [d.position for d in truth.duplicates]
        + [i.position for i in truth.invalid]
    )
    assert sorted(positions) == list(range(len(records)))
    assert len(set(truth.unique_message_ids)) == truth.unique_valid


def test_truth_round_trips_through_json(sim: Any) -> None:
    _, _, truth, _ = sim
    loaded = Truth.from_json(truth.to_json())
    assert loaded == truth
    assert loaded.expected_user_key == truth.expected_user_key
    assert loaded.invalid_counts == truth.invalid_counts
    assert loaded.session_count == truth.session_count


# ------------------------------------------------------------------------------------------------
# the truth agrees with an independent check of every record


def test_every_record_classified_as_the_truth_says(sim: Any) -> None:
    _, records, truth, checked = sim
    for inv in truth.invalid:
        assert checked[inv.position].kind == inv.code, (inv, records[inv.position].value[:200])
    for dup in truth.duplicates:
        assert checked[dup.position].kind == "duplicate"
    for ev in truth.valid:
        got = checked[ev.position]
        assert got.kind == "valid"
        assert got.event is not None
        assert got.event["message_id"] == ev.message_id
        assert got.corrected_ms == ev.timestamp_ms
        assert records[ev.position].timestamp_ms == ev.received_at_ms
        assert got.event["type"] == ev.type and got.event.get("event") == ev.event


def test_invalid_records_cover_the_documented_cases(sim: Any) -> None:
    _, records, truth, _ = sim
    cfg = SimConfig()
    details = {(i.code, i.detail) for i in truth.invalid}
    assert {c for c, _ in details} == set(ERROR_CODES)
    for inv in truth.invalid:
        value = records[inv.position].value
        if inv.code != "size_exceeded":
            assert len(value) <= cfg.max_payload_bytes
        else:
            assert cfg.max_payload_bytes < len(value) <= 3 * cfg.max_payload_bytes
            json.loads(value)  # valid-looking JSON, only too large


def test_schema_violations_include_the_classic_mistakes() -> None:
    _, truth = generate(SimConfig(events=4000, seed=5, malformed_fraction=0.2))
    details = {i.detail for i in truth.invalid if i.code == "schema_violation"}
    for expected in ("missing_message_id", "missing_identity", "track_without_event", "timestamp_bool",
                     "properties_string", "type_screen"):  # fmt: skip
        assert expected in details
    json_details = {i.detail for i in truth.invalid if i.code == "invalid_json"}
    assert {"truncated", "batch_array", "json_string"} <= json_details
    range_details = {i.detail for i in truth.invalid if i.code == "timestamp_out_of_range"}
    assert {"stale_offline_queue", "future_after_correction"} <= range_details


def test_duplicates_are_byte_identical_redeliveries_within_ten_minutes(sim: Any) -> None:
    _, records, truth, checked = sim
    valid_positions = {e.position for e in truth.valid}
    for dup in truth.duplicates:
        assert dup.original_position < dup.position
        assert dup.original_position in valid_positions
        orig, copy = records[dup.original_position], records[dup.position]
        assert copy.value == orig.value and copy.key == orig.key
        assert 0 <= copy.timestamp_ms - orig.timestamp_ms <= 600_000
        assert checked[dup.original_position].event["message_id"] == dup.message_id


def test_records_are_ordered_in_time_and_keyed_by_visitor(sim: Any) -> None:
    cfg, records, truth, checked = sim
    stamps = [r.timestamp_ms for r in records]
    assert stamps == sorted(stamps)
    assert cfg.start_ms <= stamps[0] and stamps[-1] <= cfg.end_ms
    for pos, event, _ in valid_events(records, checked):
        expected = event.get("anonymous_id") or event.get("user_id")
        assert expected is not None and records[pos].key == expected.encode()
    # a few backend events carry only a user_id and are keyed by it
    assert any(e.get("user_id") and not e.get("anonymous_id") for _, e, _ in valid_events(records, checked))


def test_user_keys_follow_the_identity_rule(sim: Any) -> None:
    _, records, truth, checked = sim
    links: dict[str, str] = {}
    expected: dict[str, str] = {}
    via_link = 0
    for _, e, _ in valid_events(records, checked):
        if e.get("user_id"):
            key = e["user_id"]
        elif e["anonymous_id"] in links:
            key = links[e["anonymous_id"]]
            via_link += 1
        else:
            key = e["anonymous_id"]
        expected[e["message_id"]] = key
        if e["type"] == "identify" and e.get("user_id") and e.get("anonymous_id"):
            links[e["anonymous_id"]] = e["user_id"]
        if e["type"] == "alias":
            links[e["previous_id"]] = e["user_id"]
    assert expected == truth.expected_user_key
    assert via_link > 10  # anonymous-only events after an identify resolve to the user
    types = Counter(e.type for e in truth.valid)
    assert types["identify"] > 0 and types["alias"] > 0


def test_expected_sessions_agree_with_an_independent_sessionizer(sim: Any) -> None:
    cfg, records, truth, checked = sim
    rows = sorted(
        (truth.expected_user_key[e["message_id"]], ts) for _, e, ts in valid_events(records, checked)
    )
    sessions: dict[str, list[list[int]]] = defaultdict(list)
    gap, max_len = cfg.session_gap_s * 1000, cfg.session_max_s * 1000
    for key, ts in rows:
        cur = sessions[key][-1] if sessions[key] else None
        if cur is None or ts - cur[1] >= gap or ts - cur[0] >= max_len:
            sessions[key].append([ts, ts, 1])
        else:
            cur[1] = ts
            cur[2] += 1
    got = {k: [list(s) for s in v] for k, v in truth.sessions.items()}
    assert got == dict(sessions)
    assert truth.session_count == sum(len(v) for v in sessions.values())
    counts = [s.events for v in truth.sessions.values() for s in v]
    assert 3 <= sum(counts) / len(counts) <= 15  # plausible events per session
    multi = [k for k, v in truth.sessions.items() if len(v) > 1]
    assert len(multi) > 20  # returning visitors


# ------------------------------------------------------------------------------------------------
# delivery effects


def test_late_and_out_of_order_delivery(sim: Any) -> None:
    cfg, records, truth, checked = sim
    n_valid = truth.unique_valid
    assert len(truth.late) == round(n_valid * cfg.late_fraction)
    assert len(truth.out_of_order) == round(n_valid * cfg.out_of_order_fraction)
    by_id = {e.message_id: e for e in truth.valid}
    for late in truth.late:
        ev = by_id[late.message_id]
        assert late.delay_ms == ev.received_at_ms - ev.timestamp_ms
        assert 3600_000 - 500 <= late.delay_ms <= 12 * 3600_000  # minus the network latency
    for mid in truth.out_of_order:
        ev = by_id[mid]
        assert 4_500 <= ev.received_at_ms - ev.timestamp_ms <= 300_000
    normal = [
        e
        for e in truth.valid
        if e.message_id not in set(truth.out_of_order) | {x.message_id for x in truth.late}
    ]
    assert all(0 < e.received_at_ms - e.timestamp_ms < 2_000 for e in normal)
    # the stream really is out of order in event time
    newest, behind = 0, 0
    for e in truth.valid:
        if e.timestamp_ms < newest - 5_000:
            behind += 1
        newest = max(newest, e.timestamp_ms)
    assert behind >= len(truth.late)


def test_skewed_clocks_are_recovered_by_sent_at_correction(skewed: Any) -> None:
    cfg, records, truth, checked = skewed
    by_id = {e.message_id: e for e in truth.valid}
    off_minutes = off_days = 0
    for pos, e, corrected in valid_events(records, checked):
        raw = _ts_ms(e["timestamp"])
        assert corrected == by_id[e["message_id"]].timestamp_ms
        if abs(raw - corrected) > 60_000:
            off_minutes += 1
        if raw - records[pos].timestamp_ms > MAX_FUTURE_MS or records[pos].timestamp_ms - raw > MAX_FUTURE_MS:
            off_days += 1  # raw timestamp a day off, yet valid after correction
    assert off_minutes > 50
    assert off_days > 0
    # every valid event keeps its place in the simulated period
    assert all(cfg.start_ms - 1_000 <= e.timestamp_ms <= cfg.end_ms for e in truth.valid)
    assert MAX_PAST_MS == 30 * 86400_000


def test_timestamp_formats_include_offsets_and_epoch_millis(sim: Any) -> None:
    _, records, _, checked = sim
    stamps = [e["timestamp"] for _, e, _ in valid_events(records, checked)]
    assert any(isinstance(s, int) for s in stamps)
    assert any(isinstance(s, str) and s.endswith("Z") for s in stamps)
    assert any(isinstance(s, str) and (s[-6] in "+-") and not s.endswith("Z") for s in stamps)
    sent = [e.get("sent_at", "absent") for _, e, _ in valid_events(records, checked)]
    assert "absent" in sent and None in sent


# ------------------------------------------------------------------------------------------------
# realism


def test_deal_hunters_view_the_same_deal_four_times_within_30_minutes(sim: Any) -> None:
    _, records, truth, checked = sim
    views: dict[tuple[str, str], list[int]] = defaultdict(list)
    for _, e, ts in valid_events(records, checked):
        if e.get("event") == "Product Viewed" and "deal_id" in (e.get("properties") or {}):
            views[(truth.expected_user_key[e["message_id"]], e["properties"]["deal_id"])].append(ts)
    hits = set()
    for key, times in views.items():
        times.sort()
        if any(times[i + 3] - times[i] <= 30 * 60_000 for i in range(len(times) - 3)):
            hits.add(key)
    assert len(hits) >= math.ceil(truth.unique_valid / 2000)
    assert any(deal == "LAS-DEC" for _, deal in hits)
    fired = {(f[0], f[1]) for f in truth.aggregates["deal_promo"]["fires"]}
    assert fired == hits


def test_bots_are_recognisable_and_behave_like_bots(skewed: Any) -> None:
    cfg, records, truth, checked = skewed
    crawler = CrawlerDetect()
    by_id = {e.message_id: e for e in truth.valid}
    runs: dict[str, list[int]] = defaultdict(list)
    for _, e, ts in valid_events(records, checked):
        ua = e["context"].get("user_agent")
        is_bot = by_id[e["message_id"]].is_bot
        if ua is not None:
            assert crawler.isCrawler(ua) == is_bot, ua
        if is_bot:
            assert e["type"] == "page"
            runs[e["anonymous_id"]].append(ts)
    bot_events = sum(len(v) for v in runs.values())
    assert bot_events == truth.aggregates["bot_events"] == round(truth.unique_valid * cfg.bot_fraction)
    for times in runs.values():
        times.sort()
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        if gaps:
            assert sorted(gaps)[len(gaps) // 2] <= 10_000  # fast
    assert max(len(v) for v in runs.values()) >= 40  # many pages


def test_campaigns_referrers_devices_and_countries(sim: Any) -> None:
    _, records, _, checked = sim
    params: Counter[str] = Counter()
    referrer_hosts: Counter[str] = Counter()
    mediums: Counter[str] = Counter()
    oses: Counter[str] = Counter()
    countries: Counter[str] = Counter()
    geo = GeoIP2Fast()
    direct_landings = 0
    for _, e, _ in valid_events(records, checked):
        page = (e.get("context") or {}).get("page")
        if page is None:
            continue
        query = parse_qs(urlsplit(page["url"]).query)
        params.update(query.keys())
        mediums.update(query.get("utm_medium", []))
        if page["referrer"]:
            referrer_hosts[urlsplit(page["referrer"]).hostname or ""] += 1
        elif e["type"] == "page":
            direct_landings += 1
        ua = parse_ua(e["context"]["user_agent"])
        if ua.os:
            oses[ua.os.family] += 1
        countries[geo.lookup(e["context"]["ip"]).country_code] += 1
    for p in (
        "utm_source",
        "utm_medium",
        "utm_campaign",
        "utm_term",
        "utm_content",
        "gclid",
        "fbclid",
        "msclkid",
    ):
        assert params[p] > 0, p
    assert {"cpc", "email", "paid_social", "affiliate"} <= set(mediums)
    for host in ("www.bing.com", "shop.example", "t.co", "www.linkedin.com", "mail.google.com"):
        assert referrer_hosts[host] > 0, host
    assert any(h.startswith("www.google.") for h in referrer_hosts)
    assert any(h.endswith("facebook.com") for h in referrer_hosts)
    assert direct_landings > 0
    assert {"Windows", "Mac OS X", "iOS", "Android"} <= set(oses)
    assert "--" not in countries and len(countries) >= 8


def test_funnel_orders_and_revenue(sim: Any) -> None:
    _, records, truth, checked = sim
    agg = truth.aggregates
    track = agg["track_events"]
    assert (
        track["Product Viewed"]
        > track["Product Added"]
        > track["Checkout Started"]
        > track["Order Completed"]
        > 0
    )
    assert agg["orders"] == track["Order Completed"]
    revenue: dict[str, float] = defaultdict(float)
    order_ids = set()
    for _, e, _ in valid_events(records, checked):
        if e.get("event") == "Order Completed":
            props = e["properties"]
            revenue[props["currency"]] += props["revenue"]
            order_ids.add(props["order_id"])
    assert len(order_ids) == agg["orders"]
    assert {k: round(v, 2) for k, v in revenue.items()} == agg["revenue"]
    assert agg["page_views"] == agg["events_by_type"]["page"]
    assert agg["cart_adds_without_order_30m"] > 0  # abandoned carts


def test_daily_active_users_span_several_days(skewed: Any) -> None:
    _, _, truth, _ = skewed
    dau = truth.aggregates["daily_active_users"]
    assert len(dau) >= 3
    per_day: dict[str, set[str]] = defaultdict(set)
    for e in truth.valid:
        per_day[datetime.fromtimestamp(e.timestamp_ms / 1000, UTC).date().isoformat()].add(e.user_key)
    assert dau == {d: len(u) for d, u in sorted(per_day.items())}


def test_users_sets_the_number_of_human_devices() -> None:
    _, truth = generate(SimConfig(events=3000, users=200, span_s=2 * 86400))
    assert 180 <= truth.users["human_devices"] <= 220
    assert truth.users["user_keys"] >= truth.users["human_devices"]


def test_default_span_scales_with_events() -> None:
    assert SimConfig(events=2000).span == timedelta(hours=2)
    assert SimConfig(events=10_000).span == timedelta(hours=4)
    assert SimConfig(events=200_000).span > timedelta(days=3)
    assert SimConfig(events=10_000_000).span <= timedelta(days=5)
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    ending = SimConfig.ending_at(now, events=2000, seed=1)
    assert ending.end == now and ending.events == 2000 and ending.seed == 1
    with pytest.raises(ValueError):
        SimConfig(start=datetime(2026, 11, 22))  # naive
    with pytest.raises(ValueError):
        SimConfig(late_fraction=1.5)


# ------------------------------------------------------------------------------------------------
# identity helpers


def test_identity_helpers() -> None:
    links: dict[str, str] = {}
    assert resolve_user_key("u1", "a1", links) == "u1"
    assert resolve_user_key(None, "a1", links) == "a1"
    assert resolve_user_key("", "a1", links) == "a1"
    assert identity_link({"type": "identify", "anonymous_id": "a1", "user_id": "u1"}) == ("a1", "u1")
    assert identity_link({"type": "identify", "anonymous_id": "a1"}) is None
    assert identity_link({"type": "alias", "anonymous_id": "a9", "previous_id": "a2", "user_id": "u2"}) == (
        "a2",
        "u2",
    )
    assert identity_link({"type": "track", "event": "x", "anonymous_id": "a1", "user_id": "u1"}) is None
    links["a1"] = "u1"
    assert resolve_user_key(None, "a1", links) == "u1"
    with pytest.raises(ValueError):
        resolve_user_key(None, None, links)
    assert record_key({"anonymous_id": "a1", "user_id": "u1"}) == "a1"
    assert record_key({"anonymous_id": None, "user_id": "u1"}) == "u1"
    assert record_key({}) is None
