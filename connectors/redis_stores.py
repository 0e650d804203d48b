"""Redis-backed identity links and user profiles for the ingest stage.

Keys (one hash per id, so operators can inspect and fix them with redis-cli):

* ``<prefix>identity:<anonymous_id>`` -> ``{user_id, partition, offset, event_time_ms}``
* ``<prefix>profile:<user_key>``      -> any ``HSET`` fields (traits maintained by other systems)

Every call is one pipelined round trip with a socket timeout (the latency bound) and no client-side
retries; a timeout or a connection error raises :class:`udfs.ingest.StoreUnavailable`, and the stage
fails open.

Redis is shared with other systems, so any key may hold something else than what we wrote. Pipelines
run with ``raise_on_error=False``: a key that is not usable (``WRONGTYPE``, invalid UTF-8, a field
missing or not a number, a profile too big to embed in an event) comes back as
:class:`udfs.ingest.Poison` for that key alone, and the other lookups of the batch go on. Identity
reads fetch only the four link fields (``HMGET``), so a huge hash under an identity key costs nothing;
profile reads fetch at most ``max_fields + 1`` fields (``HRANDFIELD`` with a positive count returns the
whole hash when it is smaller, Redis >= 6.2), so a huge profile hash is refused without transferring it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from udfs.ingest import Link, Poison, StoreUnavailable

LINK_FIELDS = ["user_id", "partition", "offset", "event_time_ms"]
MAX_USER_ID_CHARS = 128  # the raw event schema's maxLength of user_id
PROFILE_MAX_FIELDS = 256
PROFILE_MAX_BYTES = 64 * 1024  # the profile is embedded in every enriched event of the user


def client(url: str, *, timeout_s: float = 0.05) -> redis.Redis:
    """A Redis client whose every command is bounded by ``timeout_s`` and never retried (a retry with
    back-off would hold up the batch; the stage retries pending writes on its next batch)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=max(timeout_s, 0.2),
        retry_on_timeout=False,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


def _execute(pipe: Any) -> list[Any]:
    """Run ``pipe``: per-command ``WRONGTYPE`` replies stay in place; anything else means unavailable."""
    try:
        rows: list[Any] = pipe.execute(raise_on_error=False)
    except redis.RedisError as e:
        raise StoreUnavailable(str(e)) from e
    for row in rows:
        if isinstance(row, redis.ResponseError) and not str(row).startswith("WRONGTYPE"):
            raise StoreUnavailable(str(row))  # OOM, READONLY, ...: the store, not the key
    return rows


def _wrong_type(row: redis.ResponseError) -> Poison:
    return Poison(f"wrong type: {row}")


def parse_link(row: Sequence[bytes | None]) -> Link | Poison | None:
    """A link from the ``HMGET`` reply of :data:`LINK_FIELDS`; ``None`` when the key holds none."""
    if all(v is None for v in row):
        return None
    raw_user, partition, offset, event_time_ms = row
    if not raw_user:
        return Poison("identity hash without user_id")
    try:
        user_id = raw_user.decode("utf-8")
    except UnicodeDecodeError:
        return Poison("user_id is not UTF-8")
    if len(user_id) > MAX_USER_ID_CHARS:
        return Poison(f"user_id longer than {MAX_USER_ID_CHARS} characters")
    try:
        return Link(user_id, int(partition or b""), int(offset or b""), int(event_time_ms or b""))
    except ValueError:
        return Poison("partition, offset or event_time_ms missing or not an integer")


def parse_profile(row: Any, max_fields: int, max_bytes: int) -> dict[str, str] | Poison | None:
    """A profile from the ``HRANDFIELD key max_fields+1 WITHVALUES`` reply; ``None`` when empty."""
    pairs = list(row.items()) if isinstance(row, dict) else list(zip(row[::2], row[1::2], strict=True))
    if not pairs:
        return None
    if len(pairs) > max_fields:
        return Poison(f"profile hash with more than {max_fields} fields")
    if sum(len(f) + len(v) for f, v in pairs) > max_bytes:
        return Poison(f"profile larger than {max_bytes} bytes")
    try:
        return {f.decode("utf-8"): v.decode("utf-8") for f, v in pairs}
    except UnicodeDecodeError:
        return Poison("profile field or value is not UTF-8")


class RedisIdentityStore:
    """:class:`udfs.ingest.IdentityStore` on Redis hashes."""

    def __init__(self, r: redis.Redis, prefix: str = "clickpulse:") -> None:
        """Use client ``r``; keys start with ``prefix``."""
        self.r = r
        self.prefix = prefix

    def get_many(self, anonymous_ids: Sequence[str]) -> dict[str, Link | Poison]:
        """Links (or :class:`udfs.ingest.Poison`) of those ids that have one."""
        pipe = self.r.pipeline(transaction=False)
        for aid in anonymous_ids:
            pipe.hmget(f"{self.prefix}identity:{aid}", LINK_FIELDS)
        rows = _execute(pipe)
        out: dict[str, Link | Poison] = {}
        for aid, row in zip(anonymous_ids, rows, strict=True):
            got = _wrong_type(row) if isinstance(row, redis.ResponseError) else parse_link(row)
            if got is not None:
                out[aid] = got
        return out

    def put_many(self, links: Mapping[str, Link]) -> dict[str, Poison]:
        """Store links (last write wins); returns the ids whose key is not a hash (left untouched)."""
        pipe = self.r.pipeline(transaction=False)
        for aid, link in links.items():
            pipe.hset(
                f"{self.prefix}identity:{aid}",
                mapping={
                    "user_id": link.user_id,
                    "partition": link.partition,
                    "offset": link.offset,
                    "event_time_ms": link.event_time_ms,
                },
            )
        rows = _execute(pipe)
        return {
            aid: _wrong_type(row)
            for aid, row in zip(links, rows, strict=True)
            if isinstance(row, redis.ResponseError)
        }


class RedisProfileStore:
    """:class:`udfs.ingest.ProfileStore` on Redis hashes."""

    def __init__(
        self,
        r: redis.Redis,
        prefix: str = "clickpulse:",
        *,
        max_fields: int = PROFILE_MAX_FIELDS,
        max_bytes: int = PROFILE_MAX_BYTES,
    ) -> None:
        """Use client ``r``; keys start with ``prefix``; larger profiles are :class:`Poison`."""
        self.r = r
        self.prefix = prefix
        self.max_fields = max_fields
        self.max_bytes = max_bytes

    def get_many(self, user_keys: Sequence[str]) -> dict[str, dict[str, str] | Poison]:
        """Profiles (or :class:`udfs.ingest.Poison`) of those keys that have one."""
        pipe = self.r.pipeline(transaction=False)
        for k in user_keys:
            pipe.hrandfield(f"{self.prefix}profile:{k}", self.max_fields + 1, withvalues=True)
        rows = _execute(pipe)
        out: dict[str, dict[str, str] | Poison] = {}
        for k, row in zip(user_keys, rows, strict=True):
            got = (
                _wrong_type(row)
                if isinstance(row, redis.ResponseError)
                else parse_profile(row, self.max_fields, self.max_bytes)
            )
            if got is not None:
                out[k] = got
        return out
