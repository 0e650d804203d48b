"""Redis-backed identity links and user profiles for the ingest stage.

Keys (one hash per id, so operators can inspect and fix them with redis-cli):

* ``<prefix>identity:<anonymous_id>`` -> ``{user_id, partition, offset, event_time_ms}``
* ``<prefix>profile:<user_key>``      -> any ``HSET`` fields (traits maintained by other systems)

Every call is one pipelined round trip with a socket timeout (the latency bound); a timeout or a
connection error raises :class:`udfs.ingest.StoreUnavailable`, and the stage fails open.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import redis

from udfs.ingest import Link, StoreUnavailable


def client(url: str, *, timeout_s: float = 0.05) -> redis.Redis:
    """A Redis client whose every command is bounded by ``timeout_s``."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=max(timeout_s, 0.2),
        retry_on_timeout=False,
        health_check_interval=30,
    )


class RedisIdentityStore:
    """:class:`udfs.ingest.IdentityStore` on Redis hashes."""

    def __init__(self, r: redis.Redis, prefix: str = "clickpulse:") -> None:
        """Use client ``r``; keys start with ``prefix``."""
        self.r = r
        self.prefix = prefix

    def get_many(self, anonymous_ids: Sequence[str]) -> dict[str, Link]:
        """Links of those ids that have one."""
        try:
            pipe = self.r.pipeline(transaction=False)
            for aid in anonymous_ids:
                pipe.hgetall(f"{self.prefix}identity:{aid}")
            rows = pipe.execute()
        except redis.RedisError as e:
            raise StoreUnavailable(str(e)) from e
        out: dict[str, Link] = {}
        for aid, row in zip(anonymous_ids, rows, strict=True):
            if row:
                out[aid] = Link(
                    row[b"user_id"].decode(),
                    int(row[b"partition"]),
                    int(row[b"offset"]),
                    int(row[b"event_time_ms"]),
                )
        return out

    def put_many(self, links: Mapping[str, Link]) -> None:
        """Store links (last write wins)."""
        try:
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
            pipe.execute()
        except redis.RedisError as e:
            raise StoreUnavailable(str(e)) from e


class RedisProfileStore:
    """:class:`udfs.ingest.ProfileStore` on Redis hashes."""

    def __init__(self, r: redis.Redis, prefix: str = "clickpulse:") -> None:
        """Use client ``r``; keys start with ``prefix``."""
        self.r = r
        self.prefix = prefix

    def get_many(self, user_keys: Sequence[str]) -> dict[str, dict[str, str]]:
        """Profiles of those keys that have one."""
        try:
            pipe = self.r.pipeline(transaction=False)
            for k in user_keys:
                pipe.hgetall(f"{self.prefix}profile:{k}")
            rows = pipe.execute()
        except redis.RedisError as e:
            raise StoreUnavailable(str(e)) from e
        return {
            k: {f.decode(): v.decode("utf-8", "replace") for f, v in row.items()}
            for k, row in zip(user_keys, rows, strict=True)
            if row
        }
