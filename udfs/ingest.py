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
"""

from __future__ import annotations

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


class IdentityStore(Protocol):
    """Durable ``anonymous_id -> Link`` map (Redis in production)."""

    def get_many(self, anonymous_ids: Sequence[str]) -> dict[str, Link]:
        """Links for those ids that have one; raises ``StoreUnavailable`` when the store is down."""
        ...

    def put_many(self, links: Mapping[str, Link]) -> None:
        """Store links (last write wins); raises ``StoreUnavailable`` when the store is down."""
        ...


class ProfileStore(Protocol):
    """User profiles (traits) keyed by user_key."""

    def get_many(self, user_keys: Sequence[str]) -> dict[str, dict[str, str]]:
        """Profiles of those keys that have one; raises ``StoreUnavailable`` when slow or down."""
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

    def put_many(self, links: Mapping[str, Link]) -> None:
        """Store links."""
        self.links.update(links)


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


@dataclass
class IngestCounters:
    """What the stage has seen (exported as Flink metrics and logged periodically)."""

    records_in: int = 0
    valid: int = 0
    dlq: Counter[str] = field(default_factory=Counter)
    identity_links: int = 0
    identity_fallbacks: int = 0
    profile_fallbacks: int = 0

    def line(self) -> str:
        """One-line summary for the periodic log."""
        dlq = " ".join(f"{k}={v}" for k, v in sorted(self.dlq.items())) or "-"
        return (
            f"in={self.records_in} valid={self.valid} dlq={sum(self.dlq.values())} [{dlq}] "
            f"links={self.identity_links} identity_fallbacks={self.identity_fallbacks} "
            f"profile_fallbacks={self.profile_fallbacks}"
        )


class Output(NamedTuple):
    """Columns of one processed batch, aligned with the input."""

    kinds: list[str]
    message_ids: list[str]
    user_keys: list[str]
    payloads: list[bytes]


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
        new_links: dict[str, Link] = {}
        valid_idx: list[int] = []
        for i, res in enumerate(results):
            if isinstance(res, Invalid):
                self.counters.dlq[str(res.error_code)] += 1
                key = keys[i] if keys is not None else None
                kinds.append(DLQ)
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
        if new_links:
            try:
                self.identity.put_many(new_links)
            except StoreUnavailable:
                self.counters.identity_fallbacks += len(new_links)
                log.warning("identity store unavailable; %d links kept only in memory", len(new_links))
        return Output(kinds, mids, ukeys, payloads)

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
            self._links.clear()  # bounded memory; the store still has every link
        try:
            self._links.update(self.identity.get_many(sorted(missing)))
        except StoreUnavailable:
            self.counters.identity_fallbacks += len(missing)

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
                prof = fetched.get(k)
                self._profiles[k] = (expires, prof)
                out[k] = (prof or {}, "ok" if prof else "missing")
        return out
