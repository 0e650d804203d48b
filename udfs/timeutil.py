"""Timestamp parsing and formatting for event times (always UTC, epoch milliseconds).

Raw events carry times either as ISO-8601 strings with an explicit UTC offset (``Z`` or ``+02:00``)
or as epoch milliseconds (JSON numbers). Everything downstream works with integer epoch milliseconds
and renders them as ``YYYY-MM-DDTHH:MM:SS.mmmZ``.

Parsing is strict: naive date-times (no offset), date-only strings, numeric strings, booleans,
non-finite numbers and anything :func:`datetime.fromisoformat` rejects raise :class:`TimestampError`.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

__all__ = [
    "MAX_EPOCH_MS",
    "MIN_EPOCH_MS",
    "TimestampError",
    "format_ms",
    "format_ms_or_none",
    "parse_iso8601_ms",
    "parse_timestamp_ms",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)

#: Smallest / largest epoch-ms value accepted (0001-01-01T00:00:00.000Z .. 9999-12-31T23:59:59.999Z).
MIN_EPOCH_MS = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // _ONE_MS
MAX_EPOCH_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // _ONE_MS

# Characters that may appear in an ISO-8601 date-time accepted here (extended or basic format,
# week dates, fractional seconds with '.' or ',', offsets). Anything else is garbage.
_ISO_CHARS = "0123456789-:.,+TWZ "
# Separators allowed between date and time in the extended calendar form (RFC 3339 allows ' ').
_DATE_TIME_SEPARATORS = frozenset("T ")


class TimestampError(ValueError):
    """Raised when a value is not an acceptable event timestamp."""


def parse_iso8601_ms(value: str) -> int:
    """Parse an ISO-8601 date-time with ``Z`` or a UTC offset into UTC epoch milliseconds.

    Sub-millisecond digits are truncated (floored). Raises :class:`TimestampError` for garbage,
    naive date-times and date-only values.
    """
    if not value or value.strip(_ISO_CHARS):
        raise TimestampError(f"not an ISO-8601 date-time: {value!r}")
    # datetime.fromisoformat (3.11) accepts any character between date and time; only allow T/space.
    if len(value) > 10 and value[4] == "-" and value[5] != "W" and value[10] not in _DATE_TIME_SEPARATORS:
        raise TimestampError(f"bad date/time separator in {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise TimestampError(f"not an ISO-8601 date-time: {value!r} ({exc})") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise TimestampError(f"date-time without UTC offset (add 'Z' or '+hh:mm'): {value!r}")
    ms = (parsed - _EPOCH) // _ONE_MS
    if not MIN_EPOCH_MS <= ms <= MAX_EPOCH_MS:
        raise TimestampError(f"date-time out of range: {value!r}")
    return ms


def parse_timestamp_ms(value: object) -> int:
    """Parse an event timestamp (ISO-8601 string or epoch-ms number) into UTC epoch milliseconds.

    Fractional milliseconds are floored. Booleans, negative or non-finite numbers, numbers beyond
    year 9999 and every other type raise :class:`TimestampError`.
    """
    if isinstance(value, str):
        return parse_iso8601_ms(value)
    if isinstance(value, bool):
        raise TimestampError("boolean is not a timestamp")
    if isinstance(value, int):
        ms = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise TimestampError(f"non-finite timestamp: {value!r}")
        ms = math.floor(value)
    else:
        raise TimestampError(f"timestamp must be an ISO-8601 string or epoch ms, got {type(value).__name__}")
    if not 0 <= ms <= MAX_EPOCH_MS:
        raise TimestampError(f"epoch ms out of range: {value!r}")
    return ms


def _second_prefix(seconds: int) -> str:
    try:
        text = (_EPOCH + timedelta(seconds=seconds)).isoformat()
    except OverflowError:
        raise TimestampError(f"epoch seconds out of range: {seconds!r}") from None
    return text[:-6]  # isoformat of an aware UTC datetime ends with '+00:00'


# Events of a stream cluster in time: cache the "YYYY-MM-DDTHH:MM:SS" prefix per epoch second.
_PREFIX_CACHE: dict[int, str] = {}
_PREFIX_CACHE_MAX = 8192


def format_ms(ms: int) -> str:
    """Format UTC epoch milliseconds as ISO-8601 with milliseconds and ``Z``.

    Example: ``format_ms(0) == "1970-01-01T00:00:00.000Z"``. Raises :class:`TimestampError` when
    the value is outside years 1..9999.
    """
    seconds, millis = divmod(int(ms), 1000)
    prefix = _PREFIX_CACHE.get(seconds)
    if prefix is None:
        prefix = _second_prefix(seconds)
        if len(_PREFIX_CACHE) >= _PREFIX_CACHE_MAX:
            _PREFIX_CACHE.clear()
        _PREFIX_CACHE[seconds] = prefix
    return f"{prefix}.{millis:03d}Z"


def format_ms_or_none(ms: int | None) -> str | None:
    """Like :func:`format_ms` but passes ``None`` through."""
    return None if ms is None else format_ms(ms)
