"""Identity resolution for raw events: which ``user_key`` an event belongs to.

The rule (shared by the ingest job and the simulator's ground truth):

* ``user_key`` is the event's ``user_id`` when it has a non-empty one;
* otherwise the ``user_id`` linked to its ``anonymous_id`` by an *earlier* valid ``identify``
  (``anonymous_id`` + ``user_id``) or ``alias`` (``previous_id`` -> ``user_id``) event;
* otherwise the ``anonymous_id``.

"Earlier" means earlier in the order the records were produced. Raw records are keyed by
``anonymous_id`` (when present), so all events of one visitor sit on one partition and that order is
well defined per key. Links are a single hop (``previous_id`` is looked up as an anonymous id, links are
not chained) and a later link for the same anonymous id replaces the earlier one. Empty strings count as
absent. The caller owns the link state (a dict in tests and the simulator, keyed state in Flink); apply
:func:`identity_link` *after* resolving the event that carries it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _text(value: Any) -> str | None:
    """Return ``value`` if it is a non-empty string, else ``None``."""
    return value if isinstance(value, str) and value else None


def identity_link(event: Mapping[str, Any]) -> tuple[str, str] | None:
    """Return the ``(anonymous_id, user_id)`` link a valid event establishes, or ``None``.

    ``identify`` with both ids links its ``anonymous_id``; ``alias`` links its ``previous_id``.
    Other event types never create links.
    """
    kind = event.get("type")
    user_id = _text(event.get("user_id"))
    if user_id is None:
        return None
    if kind == "identify":
        anonymous_id = _text(event.get("anonymous_id"))
        return (anonymous_id, user_id) if anonymous_id is not None else None
    if kind == "alias":
        previous_id = _text(event.get("previous_id"))
        return (previous_id, user_id) if previous_id is not None and previous_id != user_id else None
    return None


def resolve_user_key(user_id: Any, anonymous_id: Any, links: Mapping[str, str]) -> str:
    """Resolve the ``user_key`` of one event given the links established by earlier events.

    Raises ``ValueError`` when the event has neither id (schema validation rejects those first).
    """
    uid = _text(user_id)
    if uid is not None:
        return uid
    aid = _text(anonymous_id)
    if aid is None:
        raise ValueError("event has neither user_id nor anonymous_id")
    return links.get(aid, aid)


def record_key(event: Mapping[str, Any]) -> str | None:
    """Kafka record key of a raw event: ``anonymous_id`` if present, else ``user_id`` (else ``None``)."""
    return _text(event.get("anonymous_id")) or _text(event.get("user_id"))
