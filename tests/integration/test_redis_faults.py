"""Ingest against a misbehaving Redis: a private redis-server killed and restarted, and poison values.

Each test starts its own redis-server on a free loopback port (no persistence), so killing it touches
nothing else; the stage and the Redis stores are the production ones.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from shutil import which

import orjson
import pytest
import redis

from connectors.redis_stores import RedisIdentityStore, RedisProfileStore, client
from devstack.stack import free_port
from tests.unit.test_ingest_stage import T0, ev, run
from udfs.ingest import OK, IngestOptions, IngestStage

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PREFIX = "t:"


class RedisServer:
    """A redis-server of this test only, on a fixed free port, that can be killed and started again."""

    def __init__(self, workdir: Path) -> None:
        exe = which("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed")
        self.exe = exe
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        probe = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "redis-server exited during start-up"
            try:
                if probe.ping():
                    probe.close()
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        pytest.fail("private redis-server did not answer PING within 20 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture()
def r(server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client for planting and checking keys."""
    c = redis.Redis(port=server.port, socket_timeout=5)
    yield c
    c.close()


def make_stage(server: RedisServer, timeout_s: float = 0.2, **options) -> IngestStage:
    rc = client(server.url, timeout_s=timeout_s)
    return IngestStage(
        IngestOptions(**options), RedisIdentityStore(rc, PREFIX), RedisProfileStore(rc, PREFIX)
    )


def test_links_learned_while_redis_is_down_are_written_once_it_is_back(
    server: RedisServer, r: redis.Redis
) -> None:
    stage = make_stage(server)
    assert run(stage, [ev("m0", anon="a-0")]).kinds == [OK]  # connected, nothing to stitch

    server.kill()
    started = time.monotonic()
    out = run(
        stage,
        [
            ev("m1", typ="identify", anon="a-1", user="u-1"),
            ev("m2", typ="alias", anon="a-2", user="u-2", previous_id="a-2"),
            ev("m3", anon="a-1"),
        ],
        first_offset=1,
    )
    assert time.monotonic() - started < 5, "a batch waited on the dead Redis"
    assert out.kinds == [OK, OK, OK] and out.user_keys == ["u-1", "u-2", "u-1"]  # memory still applies
    pending_while_down = getattr(stage.counters, "links_pending", None)

    server.start()  # empty: no persistence, like a Redis that lost its data too
    offset = 4
    deadline = time.monotonic() + 30
    while not r.exists(f"{PREFIX}identity:a-1", f"{PREFIX}identity:a-2") == 2:
        assert time.monotonic() < deadline, "pending links never reached Redis after it came back"
        run(stage, [ev(f"m{offset}", anon="a-9")], first_offset=offset)  # later traffic, no links
        offset += 1
    assert r.hgetall(f"{PREFIX}identity:a-1") == {
        b"user_id": b"u-1",
        b"partition": b"0",
        b"offset": b"1",
        b"event_time_ms": str(T0).encode(),
    }
    assert r.hget(f"{PREFIX}identity:a-2", "user_id") == b"u-2"
    c = stage.counters
    assert pending_while_down == 2
    assert (c.links_pending, c.links_flushed, c.links_dropped) == (0, 2, 0)

    # a restarted job (fresh stage, empty memory) finds the links in Redis
    fresh = make_stage(server)
    assert run(fresh, [ev("m9", anon="a-1"), ev("m10", anon="a-2")], first_offset=9).user_keys == [
        "u-1",
        "u-2",
    ]


def _plant_identity(r: redis.Redis, kind: str, key: str) -> None:
    link = {"user_id": "u-bad", "partition": 0, "offset": 0, "event_time_ms": T0}
    if kind == "string":
        r.set(key, "u-bad")
    elif kind == "list":
        r.rpush(key, "u-bad")
    elif kind == "no_user_id":
        r.hset(key, mapping={k: v for k, v in link.items() if k != "user_id"})
    elif kind == "non_numeric_offset":
        r.hset(key, mapping={**link, "offset": "twelve"})
    elif kind == "invalid_utf8":
        r.hset(key, mapping={**link, "user_id": b"\xff\xfeu"})
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["string", "list", "no_user_id", "non_numeric_offset", "invalid_utf8"])
def test_poison_identity_value_is_counted_and_ignored(server: RedisServer, r: redis.Redis, kind: str) -> None:
    r.hset(
        f"{PREFIX}identity:a-good",
        mapping={"user_id": "u-good", "partition": 0, "offset": 0, "event_time_ms": T0},
    )
    _plant_identity(r, kind, f"{PREFIX}identity:a-bad")
    stage = make_stage(server)
    out = run(stage, [ev("m1", anon="a-bad"), ev("m2", anon="a-good")], first_offset=1)
    # the poison key reads as "no link"; the other lookup of the same pipeline is unaffected
    assert out.kinds == [OK, OK] and out.user_keys == ["a-bad", "u-good"]
    assert stage.counters.redis_poison == 1 and stage.counters.identity_fallbacks == 0


def test_identify_over_a_wrong_type_key_is_counted_not_retried(server: RedisServer, r: redis.Redis) -> None:
    r.set(f"{PREFIX}identity:a-bad", "not a hash")
    stage = make_stage(server)
    out = run(
        stage,
        [
            ev("m1", typ="identify", anon="a-bad", user="u-1"),
            ev("m2", typ="identify", anon="a-ok", user="u-2"),
        ],
    )
    assert out.user_keys == ["u-1", "u-2"]
    assert r.get(f"{PREFIX}identity:a-bad") == b"not a hash"  # someone else's key: left alone
    assert r.hget(f"{PREFIX}identity:a-ok", "user_id") == b"u-2"  # the rest of the pipeline applied
    c = stage.counters
    assert (c.redis_poison, c.links_pending, c.identity_fallbacks) == (1, 0, 0)  # refused, not queued
    assert run(stage, [ev("m3", anon="a-bad")], first_offset=2).user_keys == ["u-1"]  # memory applies
    assert (c.redis_poison, c.links_pending) == (1, 0)  # no retry of the refused write


def test_huge_identity_hash_costs_one_field_read(server: RedisServer, r: redis.Redis) -> None:
    key = f"{PREFIX}identity:a-huge"
    for start in range(0, 200_000, 20_000):
        r.hset(key, mapping={f"junk{i}": "x" * 20 for i in range(start, start + 20_000)})
    r.hset(key, mapping={"user_id": "u-huge", "partition": 0, "offset": 0, "event_time_ms": T0})
    stage = make_stage(server, timeout_s=0.05)
    assert run(stage, [ev("m1", anon="a-huge")], first_offset=1).user_keys == ["u-huge"]
    assert stage.counters.identity_fallbacks == 0 and stage.counters.redis_poison == 0


def _plant_profile(r: redis.Redis, kind: str, key: str) -> None:
    if kind == "string":
        r.set(key, "plan=pro")
    elif kind == "list":
        r.rpush(key, "plan", "pro")
    elif kind == "invalid_utf8_value":
        r.hset(key, mapping={"plan": b"\xc3\x28"})
    elif kind == "invalid_utf8_field":
        r.hset(key, mapping={b"\xff": "pro"})
    elif kind == "too_many_fields":
        r.hset(key, mapping={f"trait{i}": "v" for i in range(50_000)})
    elif kind == "too_many_bytes":
        r.hset(key, mapping={"bio": "x" * 1_000_000})
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["string", "list", "invalid_utf8_value", "invalid_utf8_field", "too_many_fields", "too_many_bytes"],
)
def test_poison_profile_value_is_counted_and_ignored(server: RedisServer, r: redis.Redis, kind: str) -> None:
    r.hset(f"{PREFIX}profile:a-good", mapping={"plan": "pro"})
    _plant_profile(r, kind, f"{PREFIX}profile:a-bad")
    stage = make_stage(server, timeout_s=0.5)
    out = run(stage, [ev("m1", anon="a-bad"), ev("m2", anon="a-good")], first_offset=1)
    assert out.kinds == [OK, OK]
    bad, good = (orjson.loads(p) for p in out.payloads)
    assert (bad["profile"], bad["profile_status"]) == ({}, "missing")
    assert (good["profile"], good["profile_status"]) == ({"plan": "pro"}, "ok")
    assert stage.counters.redis_poison == 1 and stage.counters.profile_fallbacks == 0
