"""The header every keyed reducer reads from an enriched event: message id, user key, event time.

Sessionization (:mod:`udfs.sessions`) and rule evaluation (:mod:`udfs.rules`) key enriched events by
``user_key`` and order them by event time; both build their own ``Event`` on top of
:meth:`EventHeader.from_record`, so a record is accepted or refused the same way (and with the same
:class:`EventError` message) by every job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from udfs.timeutil import TimestampError, parse_timestamp_ms

__all__ = ["EventError", "EventHeader"]


class EventError(ValueError):
    """An enriched record lacks what keyed logic needs (message_id, user_key, event time)."""


class EventHeader(NamedTuple):
    """The identity and event time of one enriched event."""

    message_id: str
    user_key: str
    ts_ms: int

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EventHeader:
        """Read from an enriched event dict (``event_time_ms``, else ISO-8601 or epoch-ms ``timestamp``).

        Raises :class:`EventError` when ``message_id`` or ``user_key`` is missing or empty, or when
        there is no ``event_time_ms`` and ``timestamp`` does not parse.
        """
        message_id = record.get("message_id")
        user_key = record.get("user_key")
        if not isinstance(message_id, str) or not message_id:
            raise EventError("enriched event without message_id")
        if not isinstance(user_key, str) or not user_key:
            raise EventError(f"enriched event {message_id} without user_key")
        fast = record.get("event_time_ms")  # set by the enricher, same instant as ``timestamp``
        if type(fast) is int:
            return cls(message_id, user_key, fast)
        try:
            ts_ms = parse_timestamp_ms(record.get("timestamp"))
        except TimestampError as exc:
            raise EventError(f"enriched event {message_id}: timestamp: {exc}") from None
        return cls(message_id, user_key, ts_ms)
