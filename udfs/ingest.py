"""The ingest stage as pure record logic: raw Kafka records in, one classified output per record.

Each raw record yields exactly one of:

* ``("ok", message_id, user_key, enriched_json)`` — valid; the job deduplicates these on
  ``message_id`` in the JVM and writes the first copy to ``events.enriched``;
* ``("dlq", "", record_key, dlq_json)`` — invalid; written to ``events.dlq`` with the original payload.

Identity stitching happens here, in partition order, *before* deduplication: raw records are keyed by
``anonymous_id``, so every event of a visitor arrives on one partition and one subtask sees them in
produced order. Links (``anonymous_id -> user_id``) are kept in an :class:`IdentityStore` together
with the ``(partition, offset)`` of the record that created them; a link is applied only to records
*after* that position. That makes a replay from a checkpoint resolve exactly as the first run did,
even though the store (Redis) already holds links created after the checkpoint.

Profiles (user traits, ``HGETALL``-style) come from a :class:`ProfileStore` with a local cache; when
it is slow or down the event passes with ``profile_status = "fallback"`` and a counter goes up.

The store is never trusted to be up or sane:

* links made while the identity store is down are kept in a bounded pending-write buffer and written
  on later batches once it answers again (``links_pending``/``links_flushed``/``links_dropped``); a
  batch never waits for the store beyond one bounded round trip;
* a value the stage cannot use (wrong Redis type, undecodable, malformed, too big) comes back from the
  store as :class:`Poison`: counted (``redis_poison``), logged once per key, and treated as no link /
  no profile.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import orjson

from udfs.dlq import dlq_record_for
from udfs.enrich import DEFAULT_OPTIONS, EnrichOptions, enrich
from udfs.identity import identity_link
from udfs.validation import DEFAULT_MAX_BYTES, DEFAULT_MAX_FUTURE_S, DEFAULT_MAX_PAST_S, Invalid, validate

log = logging.getLogger(__name__)

OK = "ok"
DLQ = "dlq"


class Link(NamedTuple):
    """An identity link and where in the stream it was established."""

    user_id: str
    partition: int
    offset: int
    event_time_ms: int


class Poison(NamedTuple):
    """A stored value the stage cannot use (wrong type, undecodable, malformed, too big).

    Stores return it in place of a link or profile, so one bad key never fails the other lookups of a
    batch; the stage counts it and carries on as if the key held nothing.
    """

    reason: str


class IdentityStore(Protocol):
    """Durable ``anonymous_id -> Link`` map (Redis in production)."""

    def get_many(self, anonymous_ids: Sequence[str]) -> Mapping[str, Link | Poison]:
        """Links (or :class:`Poison`) for those ids that have one; raises ``StoreUnavailable`` when the
        store is down."""
        ...

    def put_many(self, links: Mapping[str, Link]) -> Mapping[str, Poison]:
        """Store links (last write wins); returns the ids whose key cannot take a link (written never,
        so not worth retrying); raises ``StoreUnavailable`` when the store is down."""
        ...


class ProfileStore(Protocol):
    """User profiles (traits) keyed by user_key."""

    def get_many(self, user_keys: Sequence[str]) -> Mapping[str, dict[str, str] | Poison]:
        """Profiles (or :class:`Poison`) of those keys that have one; raises ``StoreUnavailable`` when
        slow or down."""
        ...


class StoreUnavailable(Exception):
    """The backing store did not answer within its latency bound."""


class MemoryIdentityStore:
    """In-memory :class:`IdentityStore` (tests, and runs without Redis)."""

    def __init__(self) -> None:
        """Start empty."""
        self.links: dict[str, Link] = {}

    def get_many(self, anonymous_ids: Sequence[str]) -> dict[str, Link]:
        """Links present for ``anonymous_ids``."""
        return {a: self.links[a] for a in anonymous_ids if a in self.links}

    def put_many(self, links: Mapping[str, Link]) -> Mapping[str, Poison]:
        """Store links."""
        self.links.update(links)
        return {}


class MemoryProfileStore:
    """In-memory :class:`ProfileStore`."""

    def __init__(self, profiles: Mapping[str, dict[str, str]] | None = None) -> None:
        """Start with ``profiles``."""
        self.profiles = dict(profiles or {})

    def get_many(self, user_keys: Sequence[str]) -> dict[str, dict[str, str]]:
        """Profiles present for ``user_keys``."""
        return {k: self.profiles[k] for k in user_keys if k in self.profiles}


@dataclass(frozen=True)
class IngestOptions:
    """Validation and enrichment settings of the ingest stage (all documented in jobs/ingest.py)."""

    source_topic: str = "events.raw"
    max_bytes: int = DEFAULT_MAX_BYTES
    max_future_s: int = DEFAULT_MAX_FUTURE_S
    max_past_s: int = DEFAULT_MAX_PAST_S
    enrich: EnrichOptions = DEFAULT_OPTIONS
    link_cache_size: int = 500_000
    profile_cache_size: int = 100_000
    profile_cache_ttl_s: float = 300.0
    pending_links_max: int = 100_000
    """Links not yet written to the identity store (store down) kept for a later write; beyond it the
    oldest are dropped (and counted)."""
    link_write_batch: int = 5_000
    """At most this many links go to the identity store per batch (a backlog drains over batches)."""


@dataclass
class IngestCounters:
    """What the stage has seen (exported as Flink metrics and logged periodically)."""

    records_in: int = 0
    valid: int = 0
    dlq: Counter[str] = field(default_factory=Counter)
    identity_links: int = 0
    identity_fallbacks: int = 0
    profile_fallbacks: int = 0
    redis_poison: int = 0
    """Store values that could not be used (see :class:`Poison`), one per lookup or refused write."""
    links_pending: int = 0
    """Links waiting for the identity store to come back (a level, not a running count)."""
    links_flushed: int = 0
    """Links written on a later batch than the one that made them (after an outage)."""
    links_dropped: int = 0
    """Links never written: the pending buffer was full (they still apply in this process's memory)."""

    def line(self) -> str:
        """One-line summary for the periodic log."""
        dlq = " ".join(f"{k}={v}" for k, v in sorted(self.dlq.items())) or "-"
        return (
            f"in={self.records_in} valid={self.valid} dlq={sum(self.dlq.values())} [{dlq}] "
            f"links={self.identity_links} identity_fallbacks={self.identity_fallbacks} "
            f"profile_fallbacks={self.profile_fallbacks} redis_poison={self.redis_poison} "
            f"links_pending={self.links_pending} links_flushed={self.links_flushed} "
            f"links_dropped={self.links_dropped}"
        )


class Output(NamedTuple):
    """Columns of one processed batch, aligned with the input."""

    kinds: list[str]
    message_ids: list[str]
    user_keys: list[str]
    payloads: list[bytes]
    event_times: list[int]
    """The valid events' ``event_time_ms`` (as in the payload), 0 for DLQ rows: the pipeline's keyed parts
    take their rowtime from it instead of parsing the JSON again."""


def _link_applies(link: Link, partition: int, offset: int, event_time_ms: int) -> bool:
    if link.partition == partition:
        return link.offset < offset
    return link.event_time_ms <= event_time_ms  # link made on another partition: fall back to time


class IngestStage:
    """Validate, stitch identity and enrich batches of raw records (see the module docstring)."""

    def __init__(
        self,
        options: IngestOptions,
        identity: IdentityStore,
        profiles: ProfileStore | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        """Use ``identity``/``profiles`` as stores; ``clock`` drives the profile cache TTL."""
        self.options = options
        self.identity = identity
        self.profiles = profiles
        self.clock = clock
        self.counters = IngestCounters()
        self._links: dict[str, Link] = {}
        self._profiles: dict[str, tuple[float, dict[str, str] | None]] = {}
        # links not yet in the identity store, oldest first (insertion order of the dict)
        self._pending: dict[str, Link] = {}
        self._writes_failing = self._drops_logged = False
        self._poison_logged: set[str] = set()

    # ------------------------------------------------------------------------------------ batch
    def process_batch(
        self,
        values: Sequence[bytes | None],
        received_at_ms: Sequence[int],
        partitions: Sequence[int],
        offsets: Sequence[int],
        keys: Sequence[bytes | None] | None = None,
    ) -> Output:
        """Process one batch of raw records (in partition order); one output per record."""
        opts = self.options
        n = len(values)
        results: list[Any] = [
            validate(
                v if v is not None else b"",
                received_at_ms=int(received_at_ms[i]),
                max_bytes=opts.max_bytes,
                max_future_s=opts.max_future_s,
                max_past_s=opts.max_past_s,
            )
            for i, v in enumerate(values)
        ]
        self.counters.records_in += n
        self._prefetch_links(results)

        kinds: list[str] = []
        mids: list[str] = []
        ukeys: list[str] = []
        payloads: list[bytes] = []
        event_times: list[int] = []
        new_links: dict[str, Link] = {}
        valid_idx: list[int] = []
        for i, res in enumerate(results):
            if isinstance(res, Invalid):
                self.counters.dlq[str(res.error_code)] += 1
                key = keys[i] if keys is not None else None
                kinds.append(DLQ)
                event_times.append(0)
                mids.append("")
                ukeys.append(key.decode("utf-8", "replace") if key else "")
                payloads.append(
                    dlq_record_for(
                        values[i] if values[i] is not None else b"",
                        res,
                        source_topic=opts.source_topic,
                        partition=int(partitions[i]),
                        offset=int(offsets[i]),
                        received_at_ms=int(received_at_ms[i]),
                    )
                )
                continue
            data = res.data
            user_key = self._resolve(data, int(partitions[i]), int(offsets[i]), res.event_time_ms)
            link = identity_link(data)
            if link is not None:
                made = Link(link[1], int(partitions[i]), int(offsets[i]), res.event_time_ms)
                self._links[link[0]] = made
                new_links[link[0]] = made
                self.counters.identity_links += 1
            kinds.append(OK)
            event_times.append(res.event_time_ms)
            mids.append(str(data["message_id"]))
            ukeys.append(user_key)
            payloads.append(b"")
            valid_idx.append(i)
        self.counters.valid += len(valid_idx)

        profiles = self._profiles_for([ukeys[i] for i in valid_idx])
        for i in valid_idx:
            record = enrich(results[i], ukeys[i], opts.enrich)
            profile, status = profiles.get(ukeys[i], ({}, "missing"))
            record["profile"] = profile
            record["profile_status"] = status
            payloads[i] = orjson.dumps(record)
        self._write_links(new_links)
        return Output(kinds, mids, ukeys, payloads, event_times)

    def flush_links(self) -> int:
        """Try once to write pending links (e.g. on shutdown); returns how many are still pending."""
        self._write_links({})
        return len(self._pending)

    # --------------------------------------------------------------------------------- identity
    def _prefetch_links(self, results: Sequence[Any]) -> None:
        missing = {
            aid
            for r in results
            if not isinstance(r, Invalid)
            and not r.data.get("user_id")
            and (aid := r.data.get("anonymous_id"))
            and aid not in self._links
        }
        if not missing:
            return
        if len(self._links) > self.options.link_cache_size:
            self._links.clear()  # bounded memory; the store has every link but the pending ones
            self._links.update(self._pending)
        try:
            fetched = self.identity.get_many(sorted(missing))
        except StoreUnavailable:
            self.counters.identity_fallbacks += len(missing)
            return
        for aid, got in fetched.items():
            if isinstance(got, Poison):
                self._poisoned("identity", aid, got)
            else:
                self._links[aid] = got

    def _write_links(self, new_links: Mapping[str, Link]) -> None:
        """Queue ``new_links`` behind the pending ones and write the oldest chunk; never raises."""
        pending = self._pending
        for aid, link in new_links.items():
            pending.pop(aid, None)  # a newer link for the same id replaces the queued one, at the end
            pending[aid] = link
        overflow = len(pending) - self.options.pending_links_max
        if overflow > 0:
            for aid in list(itertools.islice(pending, overflow)):
                del pending[aid]
            self.counters.links_dropped += overflow
            if not self._drops_logged:
                self._drops_logged = True
                log.warning(
                    "identity store unavailable and %d links pending: dropping the oldest (counted as "
                    "links_dropped; they still apply in memory here, but are not stored)",
                    self.options.pending_links_max,
                )
        if pending:
            chunk = dict(itertools.islice(pending.items(), self.options.link_write_batch))
            try:
                refused = self.identity.put_many(chunk)
            except StoreUnavailable as e:
                self.counters.identity_fallbacks += len(new_links)
                if not self._writes_failing:
                    log.warning("identity store unavailable (%s); keeping links for a later write", e)
                self._writes_failing = True
            else:
                late = sum(1 for aid in chunk if aid not in new_links and aid not in refused)
                for aid in chunk:
                    del pending[aid]
                for aid, poison in refused.items():
                    self._poisoned("identity", aid, poison)  # kept in memory; a retry would fail again
                self.counters.links_flushed += late
                if self._writes_failing:
                    log.warning(
                        "identity store back: wrote %d delayed links, %d still pending", late, len(pending)
                    )
                self._writes_failing = self._drops_logged = False
        self.counters.links_pending = len(pending)

    def _poisoned(self, kind: str, key: str, poison: Poison) -> None:
        self.counters.redis_poison += 1
        seen = f"{kind}:{key}"
        if seen not in self._poison_logged and len(self._poison_logged) < 1000:
            self._poison_logged.add(seen)
            log.warning("unusable %s value for %r in the store, ignored: %s", kind, key, poison.reason)

    def _resolve(self, data: Mapping[str, Any], partition: int, offset: int, event_time_ms: int) -> str:
        uid = data.get("user_id")
        if isinstance(uid, str) and uid:
            return uid
        aid = str(data.get("anonymous_id") or "")
        link = self._links.get(aid)
        if link is not None and _link_applies(link, partition, offset, event_time_ms):
            return link.user_id
        return aid

    # --------------------------------------------------------------------------------- profiles
    def _profiles_for(self, user_keys: Sequence[str]) -> dict[str, tuple[dict[str, str], str]]:
        if self.profiles is None:
            return {}
        now = self.clock()
        out: dict[str, tuple[dict[str, str], str]] = {}
        stale: list[str] = []
        for k in set(user_keys):
            hit = self._profiles.get(k)
            if hit is not None and hit[0] > now:
                out[k] = (hit[1] or {}, "ok" if hit[1] else "missing")
            else:
                stale.append(k)
        if stale:
            try:
                fetched = self.profiles.get_many(stale)
            except StoreUnavailable:
                stale_set = set(stale)
                self.counters.profile_fallbacks += sum(1 for k in user_keys if k in stale_set)
                for k in stale:
                    out[k] = ({}, "fallback")
                return out
            expires = now + self.options.profile_cache_ttl_s
            if len(self._profiles) + len(stale) > self.options.profile_cache_size:
                self._profiles.clear()
            for k in stale:
                got = fetched.get(k)
                prof = None
                if isinstance(got, Poison):
                    self._poisoned("profile", k, got)
                else:
                    prof = got
                self._profiles[k] = (expires, prof)
                out[k] = (prof or {}, "ok" if prof else "missing")
        return out
