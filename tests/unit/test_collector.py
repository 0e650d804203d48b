"""The collector without Kafka: Segment → raw mapping, limits, client IP rules, write keys, CORS, and that
what it accepts passes the ingest job's validation unchanged."""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from connectors.collector import protocol
from connectors.collector.app import SERVER_OPTIONS, Collector, Publisher
from connectors.collector.protocol import Limits, RequestError
from connectors.collector.settings import CollectorSettings
from connectors.collector.sink import Unavailable
from udfs.ingest import IngestOptions, IngestStage, MemoryIdentityStore, MemoryProfileStore
from udfs.validation import ValidEvent, validate

pytestmark = pytest.mark.unit

NOW_MS = 1_796_000_000_000  # 2026-11-30T00:53:20Z
KEY = "wk_test"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}


def record(kind: str, item: dict[str, Any], **kw: Any) -> dict[str, Any]:
    rec = protocol.to_raw(kind, item, received_at_ms=NOW_MS, ip=kw.pop("ip", "198.51.100.7"), **kw)
    out: dict[str, Any] = orjson.loads(rec.value)
    return out


# ------------------------------------------------------------------------------------------ mapping


def test_track_maps_camel_case_onto_the_raw_contract() -> None:
    item = {
        "messageId": "m-1",
        "anonymousId": "a-1",
        "userId": "u-1",
        "event": "Product Viewed",
        "timestamp": "2026-11-30T10:00:00.000Z",
        "sentAt": "2026-11-30T10:00:01.000Z",
        "properties": {"deal_id": "LAS-DEC", "price": 129.0},
        "context": {
            "userAgent": "Mozilla/5.0",
            "locale": "en-US",
            "page": {"url": "https://shop.example/p/42", "referrer": "https://www.google.com/", "title": "T"},
            "library": {"name": "analytics-python"},
        },
        "integrations": {"All": True},
        "writeKey": KEY,
    }
    rec = protocol.to_raw("track", item, received_at_ms=NOW_MS, ip="198.51.100.7")
    assert rec.key == b"a-1"  # anonymous_id, else user_id (the contract's key, as the simulator writes it)
    doc = orjson.loads(rec.value)
    assert doc == {
        "type": "track",
        "message_id": "m-1",
        "anonymous_id": "a-1",
        "user_id": "u-1",
        "event": "Product Viewed",
        "properties": {"deal_id": "LAS-DEC", "price": 129.0},
        "traits": {},
        "timestamp": "2026-11-30T10:00:00.000Z",
        "sent_at": "2026-11-30T10:00:01.000Z",
        "received_at": "2026-11-30T00:53:20.000Z",
        "context": {
            "user_agent": "Mozilla/5.0",
            "locale": "en-US",
            "page": {"url": "https://shop.example/p/42", "referrer": "https://www.google.com/", "title": "T"},
            "library": {"name": "analytics-python"},
            "ip": "198.51.100.7",
        },
    }
    assert KEY.encode() not in rec.value  # the write key never reaches Kafka


def test_page_identify_alias() -> None:
    page = record("page", {"anonymousId": "a", "name": "Home", "properties": {"path": "/"}, "messageId": "p"})
    assert (page["type"], page["name"], page["properties"]) == ("page", "Home", {"path": "/"})
    ident = record("identify", {"userId": "u", "traits": {"plan": "pro"}, "messageId": "i"})
    assert (ident["type"], ident["user_id"], ident["traits"]) == ("identify", "u", {"plan": "pro"})
    alias = record("alias", {"userId": "u", "previousId": "a", "messageId": "al"})
    assert (alias["type"], alias["user_id"], alias["previous_id"]) == ("alias", "u", "a")
    assert protocol.to_raw("identify", {"userId": "u"}, received_at_ms=NOW_MS, ip=None).key == b"u"


def test_numeric_user_id_is_a_string_as_segment_libraries_send_it() -> None:
    assert record("identify", {"userId": 42})["user_id"] == "42"


def test_context_ip_wins_over_the_peer() -> None:
    assert (
        record("track", {"anonymousId": "a", "event": "E", "context": {"ip": "203.0.113.9"}})["context"]["ip"]
        == "203.0.113.9"
    )


def test_missing_timestamp_and_message_id_are_filled_deterministically() -> None:
    item = {"anonymousId": "a", "event": "E", "timestamp": "2026-11-30T09:00:00Z"}
    first = record("track", {**item, "sentAt": "2026-11-30T09:00:01Z"})
    retry = protocol.to_raw(
        "track",
        {**item, "sentAt": "2026-11-30T09:05:00Z"},
        received_at_ms=NOW_MS + 300_000,
        ip="198.51.100.7",
    )
    assert first["message_id"].startswith("cp-")
    assert orjson.loads(retry.value)["message_id"] == first["message_id"]  # a retry keeps its id
    other = record("track", {**item, "event": "F"})
    assert other["message_id"] != first["message_id"]
    no_ts = record("track", {"anonymousId": "a", "event": "E"})
    assert no_ts["timestamp"] == no_ts["received_at"]
    with_sent = record("track", {"anonymousId": "a", "event": "E", "sentAt": "2026-11-30T09:00:01Z"})
    assert with_sent["timestamp"] == "2026-11-30T09:00:01Z"  # ingest's skew correction makes it received_at


def test_batch_sent_at_applies_to_items_without_their_own() -> None:
    recs = protocol.request_records(
        "batch",
        {"sentAt": "2026-11-30T09:33:19Z", "batch": [
            {"type": "track", "event": "E", "anonymousId": "a", "messageId": "1"},
            {"type": "track", "event": "E", "anonymousId": "a", "messageId": "2",
             "sentAt": "2026-11-30T09:33:18Z"},
        ]},
        received_at_ms=NOW_MS,
        ip=None,
    )  # fmt: skip
    assert [orjson.loads(r.value)["sent_at"] for r in recs] == [
        "2026-11-30T09:33:19Z",
        "2026-11-30T09:33:18Z",
    ]


@pytest.mark.parametrize(
    ("endpoint", "doc", "code"),
    [
        ("track", {"anonymousId": "a"}, "missing_field"),  # no event
        ("track", {"event": "E"}, "missing_field"),  # no identity
        ("alias", {"userId": "u"}, "missing_field"),  # no previousId
        ("track", {"event": "E", "anonymousId": "a", "messageId": "m" * 200}, "schema_violation"),
        ("track", {"event": "E", "anonymousId": "a", "properties": [1]}, "bad_field"),
        ("track", {"event": 5, "anonymousId": "a"}, "bad_field"),
        ("track", {"event": "E", "anonymousId": {"x": 1}}, "bad_field"),
        ("track", {"event": "E", "anonymousId": "a", "context": "x"}, "bad_field"),
        ("track", {"event": "E", "anonymousId": "a", "timestamp": "yesterday"}, "schema_violation"),
        ("track", {"event": "E", "anonymousId": "a", "type": "page"}, "bad_type"),
        ("batch", {"batch": [{"type": "screen", "anonymousId": "a"}]}, "bad_type"),
        ("batch", {"batch": []}, "invalid_batch"),
        ("batch", {"batch": {"type": "track"}}, "invalid_batch"),
        ("batch", {"batch": ["x"]}, "invalid_event"),
    ],
)
def test_invalid_events_are_400_with_a_reason(endpoint: str, doc: dict[str, Any], code: str) -> None:
    with pytest.raises(RequestError) as err:
        protocol.request_records(endpoint, doc, received_at_ms=NOW_MS, ip=None)
    assert (err.value.status, err.value.code) == (400, code)
    assert err.value.body()["message"]


def test_one_bad_event_rejects_the_whole_batch() -> None:
    good = {"type": "track", "event": "E", "anonymousId": "a"}
    with pytest.raises(RequestError, match=r"batch\[1\]"):
        protocol.request_records(
            "batch", {"batch": [good, {"type": "track"}]}, received_at_ms=NOW_MS, ip=None
        )


def test_a_timestamp_outside_ingests_window_is_left_to_ingest() -> None:
    old = record("track", {"anonymousId": "a", "event": "E", "timestamp": "2020-01-01T00:00:00Z"})
    assert old["timestamp"] == "2020-01-01T00:00:00Z"  # ingest dead-letters it (timestamp_out_of_range)


# ------------------------------------------------------------------------------------------- limits


def test_event_over_32_kib_is_413() -> None:
    big = {"anonymousId": "a", "event": "E", "properties": {"x": "y" * 33_000}}
    with pytest.raises(RequestError) as err:
        protocol.to_raw("track", big, received_at_ms=NOW_MS, ip=None)
    assert err.value.status == 413
    ok = {"anonymousId": "a", "event": "E", "properties": {"x": "y" * 30_000}}
    assert (
        len(protocol.to_raw("track", ok, received_at_ms=NOW_MS, ip=None, limits=Limits()).value) < 32 * 1024
    )


def test_gzip_and_deflate_bodies_and_the_decompression_cap() -> None:
    body = orjson.dumps({"batch": []})
    assert protocol.decode_body(gzip.compress(body), "gzip", 1000) == body
    assert protocol.decode_body(zlib.compress(body), "deflate", 1000) == body
    raw_deflate = zlib.compressobj(wbits=-15)
    assert protocol.decode_body(raw_deflate.compress(body) + raw_deflate.flush(), "deflate", 1000) == body
    bomb = gzip.compress(b" " * 50_000_000)  # 50 MB of spaces in ~50 KB
    with pytest.raises(RequestError) as err:
        protocol.decode_body(bomb, "gzip", 500 * 1024)
    assert err.value.status == 413
    with pytest.raises(RequestError) as err:
        protocol.decode_body(b"not gzip", "gzip", 1000)
    assert (err.value.status, err.value.code) == (400, "invalid_encoding")
    with pytest.raises(RequestError) as err:
        protocol.decode_body(body, "br", 1000)
    assert err.value.status == 415
    with pytest.raises(RequestError) as err:
        protocol.decode_body(b"x" * 1001, "", 1000)
    assert err.value.status == 413


# --------------------------------------------------------------------------------------- IP and keys

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("198.51.100.7", None, "198.51.100.7"),
        ("198.51.100.7", "1.2.3.4", "198.51.100.7"),  # peer is no proxy: the header is a client's claim
        ("10.0.0.5", "203.0.113.9", "203.0.113.9"),
        ("10.0.0.5", "1.2.3.4, 203.0.113.9", "203.0.113.9"),  # the spoofed left part is ignored
        ("10.0.0.5", "203.0.113.9, 10.1.1.1", "203.0.113.9"),  # two trusted hops
        ("10.0.0.5", "10.2.2.2, 10.1.1.1", "10.2.2.2"),  # only proxies: the farthest
        ("10.0.0.5", "garbage, 10.1.1.1", "10.1.1.1"),  # a non-address hop ends the walk
        ("10.0.0.5", "203.0.113.9:5555", "203.0.113.9"),
        ("10.0.0.5", "[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:10.0.0.5", "203.0.113.9", "203.0.113.9"),  # v4-mapped peer of a dual-stack socket
        ("fd00::1", "2001:db8::7", "2001:db8::7"),
    ],
)
def test_client_ip(peer: str, xff: str | None, expected: str) -> None:
    assert protocol.client_ip(peer, xff, PROXIES) == expected


def test_x_forwarded_for_is_ignored_without_trusted_proxies() -> None:
    assert protocol.client_ip("10.0.0.5", "203.0.113.9", ()) == "10.0.0.5"


def test_basic_auth_user_is_the_write_key() -> None:
    assert protocol.basic_user(AUTH["Authorization"]) == KEY
    assert protocol.basic_user("Basic " + base64.b64encode(b"k2").decode()) == "k2"
    assert protocol.basic_user("Bearer x") is None
    assert protocol.basic_user("Basic !!!") is None
    assert protocol.basic_user(None) is None
    assert protocol.key_allowed("k2", {"k1", "k2"}) and not protocol.key_allowed("k3", {"k1", "k2"})
    assert not protocol.key_allowed("", {""}) and not protocol.key_allowed(None, {"k1"})


def test_settings_parse_lists_and_reject_bad_cidrs() -> None:
    s = CollectorSettings.from_env(
        {"CLICKPULSE_WRITE_KEY": "k1, k2", "CLICKPULSE_COLLECTOR_TRUSTED_PROXIES": "10.0.0.0/8,::1"}
    )
    assert s.write_keys() == {"k1", "k2"} and len(s.proxy_networks()) == 2
    assert "k1" not in repr(s)  # a secret
    with pytest.raises(ValueError, match="not-a-cidr"):
        CollectorSettings.from_env({"CLICKPULSE_COLLECTOR_TRUSTED_PROXIES": "not-a-cidr"})


# --------------------------------------------------------------------- what ingest makes of the output


UA = "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36"
URL = "https://shop.example/p/1?utm_source=google"


def test_collector_output_passes_ingest_unchanged() -> None:
    """Every event type through the ingest job's validation and stage: all enriched, none dead-lettered."""
    docs: list[tuple[str, dict[str, Any]]] = [
        ("track", {"anonymousId": "a-9", "event": "Product Viewed", "properties": {"deal_id": "D"},
                   "context": {"userAgent": UA, "page": {"url": URL, "path": "/p/1"}}}),
        ("page", {"anonymousId": "a-9", "name": "Home", "sentAt": "2026-11-30T09:33:19.500Z",
                  "timestamp": "2026-11-30T09:33:19.000Z"}),
        ("identify", {"anonymousId": "a-9", "userId": "u-9", "traits": {"plan": "pro"}}),
        ("alias", {"previousId": "a-9", "userId": "u-9"}),
    ]  # fmt: skip
    values = [protocol.to_raw(k, d, received_at_ms=NOW_MS, ip="198.51.100.7").value for k, d in docs]
    for v in values:
        assert isinstance(validate(v, received_at_ms=NOW_MS), ValidEvent)
    stage = IngestStage(IngestOptions(), MemoryIdentityStore(), MemoryProfileStore())
    keys = [protocol.to_raw(k, d, received_at_ms=NOW_MS, ip=None).key for k, d in docs]
    out = stage.process_batch(
        values, [NOW_MS] * len(values), [0] * len(values), list(range(len(values))), keys
    )
    assert out.kinds == ["ok"] * len(values), out.payloads
    enriched = [orjson.loads(p) for p in out.payloads]
    assert enriched[0]["ip"] == "198.51.100.7" and enriched[0]["utm_source"] == "google"
    assert enriched[0]["browser"] == "Chrome" and enriched[0]["page_path"] == "/p/1"


# --------------------------------------------------------------------------------------------- HTTP


class FakeKafka(Publisher):
    """Records what would be published; ``fail`` makes every publish time out."""

    def __init__(self) -> None:
        self.records: list[protocol.RawRecord] = []
        self.fail = False

    async def publish(self, records: list[protocol.RawRecord], timestamp_ms: int) -> None:
        if self.fail:
            raise Unavailable("kafka did not acknowledge within 0.1s")
        self.records.extend(records)

    def connected(self) -> bool:
        return not self.fail


def serve(test: Callable[[TestClient, FakeKafka], Awaitable[None]], **settings: Any) -> FakeKafka:
    """Run ``test`` against a collector on a loopback port (the server options of production)."""
    kafka = FakeKafka()
    collector = Collector(CollectorSettings(write_key=KEY, **settings), kafka)

    async def run() -> None:
        server = TestServer(collector.app())
        await server.start_server(**SERVER_OPTIONS)
        async with TestClient(server) as client:
            await test(client, kafka)

    asyncio.run(run())
    return kafka


TRACK = {"anonymousId": "a", "event": "E", "messageId": "m"}


def test_http_accepts_each_way_of_giving_the_write_key() -> None:
    async def t(c: TestClient, k: FakeKafka) -> None:
        r = await c.post("/v1/track", data=orjson.dumps(TRACK), headers=AUTH)
        assert (r.status, await r.json()) == (200, {"success": True})
        r = await c.post("/v1/track", data=orjson.dumps({**TRACK, "writeKey": KEY}))
        assert r.status == 200
        r = await c.post(
            f"/v1/batch?writeKey={KEY}", data=orjson.dumps({"batch": [{**TRACK, "type": "track"}]})
        )
        assert r.status == 200

    assert len(serve(t).records) == 3


def test_http_401_for_a_bad_or_missing_write_key() -> None:
    async def t(c: TestClient, k: FakeKafka) -> None:
        bad = {"Authorization": "Basic " + base64.b64encode(b"nope:").decode()}
        for kwargs in (
            {"headers": bad, "data": orjson.dumps({**TRACK, "writeKey": KEY})},  # a wrong header is final
            {"data": orjson.dumps(TRACK)},
            {"data": orjson.dumps({**TRACK, "writeKey": "nope"})},
        ):
            r = await c.post("/v1/track", **kwargs)
            assert r.status == 401
            assert (await r.json())["code"] == "unauthorized"

    assert serve(t).records == []


def test_http_400_413_415_with_json_reasons() -> None:
    async def t(c: TestClient, k: FakeKafka) -> None:
        r = await c.post("/v1/track", data=b"{not json", headers=AUTH)
        assert r.status == 400 and (await r.json())["code"] == "invalid_json"
        r = await c.post("/v1/track", data=b"[1]", headers=AUTH)
        assert r.status == 400
        r = await c.post("/v1/track", data=orjson.dumps({"anonymousId": "a"}), headers=AUTH)
        assert r.status == 400 and "event" in (await r.json())["message"]
        big = {**TRACK, "properties": {"x": "y" * 40_000}}
        r = await c.post("/v1/track", data=orjson.dumps(big), headers=AUTH)
        assert r.status == 413
        batch = {"batch": [{**TRACK, "type": "track", "properties": {"x": "y" * 20_000}}] * 30}
        r = await c.post("/v1/batch", data=orjson.dumps(batch), headers=AUTH)
        assert r.status == 413 and (await r.json())["code"] == "too_large"
        r = await c.post(
            "/v1/batch", data=gzip.compress(orjson.dumps(batch)), headers={**AUTH, "Content-Encoding": "gzip"}
        )
        assert r.status == 413
        r = await c.post("/v1/track", data=b"x", headers={**AUTH, "Content-Encoding": "br"})
        assert r.status == 415
        r = await c.get("/v1/track")
        assert r.status == 405

    kafka = serve(t)
    assert kafka.records == []


def test_http_gzip_batch() -> None:
    async def t(c: TestClient, k: FakeKafka) -> None:
        body = {"batch": [{**TRACK, "type": "track", "messageId": str(i)} for i in range(50)]}
        r = await c.post(
            "/v1/batch", data=gzip.compress(orjson.dumps(body)), headers={**AUTH, "Content-Encoding": "gzip"}
        )
        assert r.status == 200

    assert [orjson.loads(r.value)["message_id"] for r in serve(t).records] == [str(i) for i in range(50)]


def test_http_503_with_retry_after_when_kafka_does_not_ack() -> None:
    async def t(c: TestClient, k: FakeKafka) -> None:
        k.fail = True
        r = await c.post("/v1/track", data=orjson.dumps(TRACK), headers=AUTH)
        assert r.status == 503 and r.headers["Retry-After"] == "3"
        assert (await r.json())["code"] == "unavailable"
        assert (await c.get("/health")).status == 503
        k.fail = False
        assert (await c.post("/v1/track", data=orjson.dumps(TRACK), headers=AUTH)).status == 200
        health = await (await c.get("/health")).json()
        assert health["counters"]["503 unavailable"] == 1 and health["counters"]["events"] == 1

    serve(t, retry_after_ms=2500)


def test_http_cors_preflight_and_allowed_origins() -> None:
    async def t(c: TestClient, k: FakeKafka) -> None:
        pre = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
        r = await c.options("/v1/batch", headers=pre)
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert "Content-Encoding" in r.headers["Access-Control-Allow-Headers"]
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        r = await c.options("/v1/batch", headers={**pre, "Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in r.headers
        r = await c.post(
            "/v1/track", data=orjson.dumps(TRACK), headers={**AUTH, "Origin": "https://shop.example"}
        )
        assert r.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        r = await c.post("/v1/track", data=b"{", headers={**AUTH, "Origin": "https://shop.example"})
        assert r.status == 400 and r.headers["Access-Control-Allow-Origin"] == "https://shop.example"

    serve(t, cors_origins="https://shop.example")


def test_http_cors_default_is_any_origin() -> None:
    async def t(c: TestClient, k: FakeKafka) -> None:
        r = await c.options(
            "/v1/track", headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
        )
        assert r.headers["Access-Control-Allow-Origin"] == "*"

    serve(t)


def test_http_x_forwarded_for_only_from_trusted_proxies() -> None:
    async def t(c: TestClient, k: FakeKafka) -> None:
        await c.post(
            "/v1/track", data=orjson.dumps(TRACK), headers={**AUTH, "X-Forwarded-For": "203.0.113.9"}
        )

    ips = [orjson.loads(r.value)["context"]["ip"] for r in serve(t).records]
    assert ips == ["127.0.0.1"]
    ips = [orjson.loads(r.value)["context"]["ip"] for r in serve(t, trusted_proxies="127.0.0.0/8").records]
    assert ips == ["203.0.113.9"]


def test_http_serves_the_tracking_script_and_ping() -> None:
    async def t(c: TestClient, k: FakeKafka) -> None:
        r = await c.get("/v1/clickpulse.js")
        assert r.status == 200 and r.content_type == "application/javascript"
        text = await r.text()
        assert "sendBeacon" in text and "/v1/batch" in text
        assert (await c.get("/ping")).status == 200

    serve(t)


def test_write_key_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")

    async def t(c: TestClient, k: FakeKafka) -> None:
        await c.post(
            "/v1/track",
            data=orjson.dumps(TRACK),
            headers={"Authorization": "Basic " + base64.b64encode(b"guess:").decode()},
        )
        await c.post("/v1/track", data=orjson.dumps({**TRACK, "writeKey": KEY, "event": 1}))
        k.fail = True
        await c.post("/v1/track", data=orjson.dumps(TRACK), headers=AUTH)

    serve(t)
    assert caplog.records and KEY not in caplog.text and "guess" not in caplog.text
