"""The ingest stage's side of store faults, with fake stores: pending link writes and poison values.

The Redis side (real server killed and restarted, real poison keys) is in
``tests/integration/test_redis_faults.py``; here the bookkeeping is the point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson
import pytest

from tests.unit.test_ingest_stage import ev, run
from udfs.ingest import OK, IngestOptions, IngestStage, Link, Poison, StoreUnavailable

pytestmark = [pytest.mark.unit, pytest.mark.fault]


class FlakyIdentityStore:
    """In-memory identity store that can be switched off, refuse some ids, or return poison."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}
        self.up = True
        self.refuse: set[str] = set()
        self.poison: dict[str, Poison] = {}
        self.writes: list[list[str]] = []

    def get_many(self, anonymous_ids: Sequence[str]) -> Mapping[str, Link | Poison]:
        if not self.up:
            raise StoreUnavailable("down")
        out: dict[str, Link | Poison] = {a: self.poison[a] for a in anonymous_ids if a in self.poison}
        out.update({a: self.links[a] for a in anonymous_ids if a in self.links})
        return out

    def put_many(self, links: Mapping[str, Link]) -> Mapping[str, Poison]:
        if not self.up:
            raise StoreUnavailable("down")
        self.writes.append(list(links))
        self.links.update({a: link for a, link in links.items() if a not in self.refuse})
        return {a: Poison("wrong type") for a in links if a in self.refuse}


def identify(n: int) -> bytes:
    return ev(f"id{n}", typ="identify", anon=f"a-{n}", user=f"u-{n}")


def test_pending_links_are_bounded_drop_oldest_and_drain_in_chunks() -> None:
    store = FlakyIdentityStore()
    stage = IngestStage(IngestOptions(pending_links_max=3, link_write_batch=2), store)
    store.up = False
    out = run(stage, [identify(n) for n in range(1, 6)])
    assert out.kinds == [OK] * 5
    c = stage.counters
    assert (c.links_pending, c.links_dropped, c.identity_fallbacks) == (3, 2, 5)

    store.up = True
    run(stage, [ev("p1", anon="a-9")], first_offset=10)
    assert store.writes == [["a-3", "a-4"]]  # oldest first, one chunk per batch
    assert (c.links_pending, c.links_flushed) == (1, 2)
    run(stage, [ev("p2", anon="a-9")], first_offset=11)
    assert store.writes[-1] == ["a-5"] and (c.links_pending, c.links_flushed) == (0, 3)
    assert set(store.links) == {"a-3", "a-4", "a-5"}  # a-1, a-2 dropped (counted)...
    assert run(stage, [ev("p3", anon="a-1")], first_offset=12).user_keys == ["u-1"]  # ...yet apply here


def test_relinked_id_keeps_only_its_newest_pending_link() -> None:
    store = FlakyIdentityStore()
    stage = IngestStage(IngestOptions(), store)
    store.up = False
    run(stage, [ev("m1", typ="identify", user="u-1"), ev("m2", typ="identify", user="u-2")])
    assert stage.counters.links_pending == 1
    store.up = True
    assert stage.flush_links() == 0  # what the job calls on close
    assert store.links["a-1"] == Link("u-2", 0, 1, store.links["a-1"].event_time_ms)


def test_refused_write_is_poison_and_not_retried() -> None:
    store = FlakyIdentityStore()
    store.refuse.add("a-1")
    stage = IngestStage(IngestOptions(), store)
    run(stage, [ev("m1", typ="identify", user="u-1")])
    run(stage, [ev("m2")], first_offset=1)
    assert store.writes == [["a-1"]]
    c = stage.counters
    assert (c.redis_poison, c.links_pending, c.identity_fallbacks) == (1, 0, 0)


def test_pending_links_survive_the_link_cache_being_cleared() -> None:
    store = FlakyIdentityStore()
    stage = IngestStage(IngestOptions(link_cache_size=1), store)
    store.up = False
    run(stage, [identify(1), identify(2)])
    store.up = True
    store.links["a-3"] = Link("u-3", 0, 0, 0)
    # the cache is over its size: cleared, but the unwritten links must still apply
    out = run(stage, [ev("m1", anon="a-3"), ev("m2", anon="a-1")], first_offset=5)
    assert out.user_keys == ["u-3", "u-1"]


def test_poison_values_read_as_nothing_and_are_counted() -> None:
    store = FlakyIdentityStore()
    store.poison["a-1"] = Poison("identity hash without user_id")
    store.links["a-2"] = Link("u-2", 0, 0, 0)

    class PoisonProfiles:  # a ProfileStore whose one profile is poison
        def get_many(self, user_keys: Sequence[str]) -> Mapping[str, dict[str, str] | Poison]:
            return {k: (Poison("not a hash") if k == "a-1" else {"plan": "pro"}) for k in user_keys}

    stage = IngestStage(IngestOptions(), store, PoisonProfiles())
    out = run(stage, [ev("m1", anon="a-1"), ev("m2", anon="a-2")], first_offset=1)
    assert out.user_keys == ["a-1", "u-2"]
    bad, good = (orjson.loads(p) for p in out.payloads)
    assert (bad["profile"], bad["profile_status"]) == ({}, "missing")
    assert good["profile_status"] == "ok"
    assert stage.counters.redis_poison == 2  # one identity lookup, one profile lookup
    run(stage, [ev("m3", anon="a-1")], first_offset=3)
    assert stage.counters.redis_poison == 3  # looked up again (like a missing link); profile is cached
