"""Deterministic clickstream simulator for the ``events.raw`` topic, with its ground truth.

Pure: no Kafka, no Flink, no wall clock, no global random state. :func:`generate` turns a
:class:`SimConfig` into the exact sequence of Kafka records (key, value bytes, record timestamp) a
collector would have produced, plus a :class:`Truth` describing what a correct pipeline must make of
them. The same config always yields the same bytes.

Traffic model (a travel shop, ``https://shop.example``):

* human visitors (one ``anonymous_id`` per device) with multi-page sessions separated by idle gaps,
  landing from search, ads (gclid/msclkid), social (fbclid), e-mail, referrals or directly; browsing
  deals and products, adding to cart, checking out, sometimes ordering; logging in (``identify``) or
  signing up (``alias`` + ``identify``); some accounts use two devices; some ``Order Completed`` events
  come from the backend with only a ``user_id``;
* "deal hunters" who view the same deal 4-6 times within 25 minutes (the airline promo case);
* crawlers and scrapers (Googlebot, bingbot, AhrefsBot, curl, python-requests, HeadlessChrome): many
  page views, seconds apart;
* realistic user agents, IPs from real allocated ranges in eleven countries, locales, currencies;
* delivery effects: normal latency, out-of-order delivery (seconds to minutes), late delivery (hours,
  with ``sent_at`` at delivery time), clients with skewed clocks (minutes to days, recovered by
  ``timestamp_corrected = received_at - (sent_at - timestamp)``), byte-identical redeliveries within
  10 minutes, and malformed records with a known DLQ ``error_code``.

Record checks, in the ingest job's order (the truth follows it): size cap on the raw value bytes
(``size_exceeded``) -> UTF-8 decode (``invalid_utf8``) -> JSON parse, must be an object
(``invalid_json``) -> JSON Schema ``udfs/schemas/raw_event.schema.json`` (``schema_violation``) ->
timestamp normalisation and range check (``timestamp_out_of_range``: corrected timestamp more than
24 h after or more than 30 days before ``received_at``) -> dedup on ``message_id`` (first produced
wins). Timestamps are ISO-8601 strings with millisecond precision (``Z`` or a UTC offset) or epoch
milliseconds (numbers); ``received_at`` is the Kafka record timestamp.
"""

from __future__ import annotations

import base64
import gc
import logging
import math
import random
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote_plus, urlencode

import orjson

from devstack.reference_rules import Cleanup, ExpectedFire, RefEvent, evaluate
from udfs.identity import identity_link, record_key, resolve_user_key
from udfs.rules import CountWhen, Rule, Rules, SequenceWhen

log = logging.getLogger(__name__)

INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"
SCHEMA_VIOLATION = "schema_violation"
SIZE_EXCEEDED = "size_exceeded"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
#: DLQ ``error_code`` values the simulator produces, in the ingest job's check order.
ERROR_CODES: tuple[str, ...] = (
    SIZE_EXCEEDED,
    INVALID_UTF8,
    INVALID_JSON,
    SCHEMA_VIOLATION,
    TIMESTAMP_OUT_OF_RANGE,
)
#: A corrected timestamp later than ``received_at`` + this is out of range.
MAX_FUTURE_MS = 24 * 3600 * 1000
#: A corrected timestamp earlier than ``received_at`` - this is out of range.
MAX_PAST_MS = 30 * 24 * 3600 * 1000

TRUTH_FORMAT = "clickpulse-sim-truth/1"
DEFAULT_START = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)

_MS_H = 3600 * 1000
_MS_DAY = 24 * _MS_H
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Share of malformed records per error code (largest-remainder split, every code at least once
# when there are at least five malformed records).
_MALFORMED_WEIGHTS: dict[str, float] = {
    INVALID_JSON: 0.28,
    INVALID_UTF8: 0.12,
    SCHEMA_VIOLATION: 0.35,
    SIZE_EXCEEDED: 0.10,
    TIMESTAMP_OUT_OF_RANGE: 0.15,
}


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. Every field has a default; fractions are of the quantities documented."""

    #: Total Kafka records produced, including duplicates and malformed records.
    events: int = 10_000
    #: Seed of the only random source (``random.Random(seed)``).
    seed: int = 42
    #: Simulated clock start (UTC-aware); every record timestamp lies in ``[start, start + span]``.
    #: A CLI producing "now" should pass ``now - span`` (Kafka rejects record timestamps more than
    #: ``message.timestamp.after.max.ms``, 1 h by default on recent brokers, in the future).
    start: datetime = DEFAULT_START
    #: Length of simulated time in seconds; default ``events / 2500`` hours clamped to [2 h, 5 days],
    #: so small runs span hours and 200k records span more than three days.
    span_s: int | None = None
    #: Approximate number of human visitors (devices); default derived from ``events`` (about one
    #: per 13 human events). It cannot exceed the number of sessions (about one per 8 human events),
    #: and more visitors are created when the span leaves too little room for return visits.
    users: int | None = None
    #: Share of all records that are byte-identical redeliveries of an earlier valid record.
    duplicate_fraction: float = 0.03
    #: Share of all records that are malformed (split across :data:`ERROR_CODES`).
    malformed_fraction: float = 0.02
    #: Share of valid unique events delivered 1-12 hours after they happened.
    late_fraction: float = 0.01
    #: Share of valid unique events delivered 5 s - 5 min after they happened (out of order).
    out_of_order_fraction: float = 0.05
    #: Share of valid unique events sent by bots (crawlers and scrapers).
    bot_fraction: float = 0.03
    #: Share of human devices whose clock is off by minutes (85 %) or days (15 %); approximate, since
    #: the 3 % of devices whose old SDK sends no ``sent_at`` always have a correct clock.
    skewed_clock_fraction: float = 0.03
    #: Payload size cap in bytes; ``size_exceeded`` records are larger, every other record smaller.
    max_payload_bytes: int = 32 * 1024
    #: Inactivity gap closing a session, for the expected-sessions truth (>= gap starts a new one).
    session_gap_s: int = 1800
    #: Maximum session length, for the expected-sessions truth (>= this starts a new one).
    session_max_s: int = 24 * 3600
    #: Site the simulated pages belong to.
    site: str = "https://shop.example"

    def __post_init__(self) -> None:
        if self.events < 1:
            raise ValueError("events must be >= 1")
        if self.start.tzinfo is None or self.start.utcoffset() is None:
            raise ValueError("start must be timezone-aware")
        for f in fields(self):
            if f.name.endswith("_fraction"):
                value = getattr(self, f.name)
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{f.name} must be within [0, 1]")
        if self.duplicate_fraction + self.malformed_fraction >= 0.9:
            raise ValueError("duplicate_fraction + malformed_fraction must stay below 0.9")
        if self.max_payload_bytes < 4096:
            raise ValueError("max_payload_bytes must be >= 4096 (valid events are up to ~2 KiB)")
        if self.span_s is not None and self.span_s < 3600:
            raise ValueError("span_s must be >= 3600")

    @classmethod
    def ending_at(cls, end: datetime, **kwargs: Any) -> SimConfig:
        """A config whose simulated period ends at ``end`` (e.g. now), so no record is in the future."""
        probe = cls(**kwargs)
        return cls(**{**kwargs, "start": end - probe.span})

    @property
    def span(self) -> timedelta:
        """Simulated duration covered by the record timestamps."""
        if self.span_s is not None:
            return timedelta(seconds=self.span_s)
        hours = min(max(self.events / 2500.0, 2.0), 120.0)
        return timedelta(seconds=round(hours * 3600))

    @property
    def end(self) -> datetime:
        """Latest possible record timestamp (``start + span``)."""
        return self.start + self.span

    @property
    def start_ms(self) -> int:
        """``start`` as epoch milliseconds."""
        return _dt_to_ms(self.start)

    @property
    def end_ms(self) -> int:
        """``end`` as epoch milliseconds."""
        return _dt_to_ms(self.end)

    def counts(self) -> tuple[int, int, int]:
        """``(valid_unique, duplicates, malformed)`` record counts this config produces."""
        duplicates = round(self.events * self.duplicate_fraction)
        malformed = round(self.events * self.malformed_fraction)
        valid = self.events - duplicates - malformed
        if valid < 1:
            raise ValueError("config leaves no valid events")
        return valid, duplicates, malformed

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view of the config, with derived values resolved."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["start"] = _iso(self.start_ms)
        out["span_s"] = int(self.span.total_seconds())
        out["end"] = _iso(self.end_ms)
        out["max_future_ms"] = MAX_FUTURE_MS
        out["max_past_ms"] = MAX_PAST_MS
        return out


class SimRecord(NamedTuple):
    """One Kafka record for ``events.raw``."""

    #: ``anonymous_id`` if present else ``user_id`` (UTF-8); ``None`` for some garbage records.
    key: bytes | None
    #: Payload bytes exactly as produced (possibly invalid UTF-8 or invalid JSON).
    value: bytes
    #: Kafka record timestamp: simulated time the collector received it (``received_at``), epoch ms.
    timestamp_ms: int


class TruthEvent(NamedTuple):
    """A valid, unique event as the pipeline must see it."""

    position: int  #: index of its (first) record in the produced sequence
    message_id: str
    user_key: str
    type: str
    event: str | None
    timestamp_ms: int  #: skew-corrected event time
    received_at_ms: int
    is_bot: bool


class TruthInvalid(NamedTuple):
    """A malformed record: where it is, the DLQ ``error_code`` and what is wrong with it."""

    position: int  #: index in the produced sequence
    code: str
    detail: str


class TruthDuplicate(NamedTuple):
    """A redelivered copy and the position of the valid record it repeats."""

    position: int
    original_position: int
    message_id: str


class TruthLate(NamedTuple):
    """A valid event delivered long after it happened; ``delay_ms`` = received_at - corrected timestamp."""

    position: int
    message_id: str
    delay_ms: int


class TruthSession(NamedTuple):
    """An expected session: first and last corrected event time and number of events."""

    start_ms: int
    end_ms: int
    events: int


@dataclass(frozen=True)
class Truth:
    """Ground truth of one simulation. Serialise with :meth:`to_json`, load with :meth:`from_json`.

    Positions are indexes into the produced record sequence. ``valid`` lists the unique valid events
    (first delivery) with their resolved ``user_key`` and skew-corrected ``timestamp_ms``; sessions
    are computed over those timestamps regardless of lateness. ``users`` counts ``user_keys``,
    ``anonymous_ids``, ``identified_users``, ``human_devices``, ``bot_runs`` and
    ``skewed_clock_devices``. ``aggregates`` holds ``events_by_type``, ``track_events`` (per event
    name), ``page_views``, ``orders``, ``revenue`` (per currency), ``bot_events``, ``events_per_day``,
    ``daily_active_users`` (distinct user_keys per UTC day, bots included),
    ``daily_active_users_humans``, ``sessions_per_day`` (by session start), ``deal_promo`` (the
    ARCHITECTURE ``deal_promo`` rule evaluated on event time: ``fires`` = ``[user_key, deal_id,
    fired_at_ms]`` when the 4th view of a deal by a user_key falls within 30 min (inclusive) of the
    first, then a 24 h cooldown), ``cart_adds_without_order_30m`` and ``traffic_sources`` (landing
    sessions per simulated source).
    """

    config: dict[str, Any]
    records: int
    valid: list[TruthEvent]  #: unique valid events in produced order
    duplicates: list[TruthDuplicate]
    invalid: list[TruthInvalid]
    late: list[TruthLate]
    out_of_order: list[str]  #: message_ids delivered seconds to minutes out of order
    users: dict[str, int]
    sessions: dict[str, list[TruthSession]]  #: per user_key, in time order
    aggregates: dict[str, Any] = field(default_factory=dict)

    @property
    def unique_valid(self) -> int:
        """Number of valid unique events."""
        return len(self.valid)

    @property
    def duplicate_count(self) -> int:
        """Number of redelivered copies."""
        return len(self.duplicates)

    @cached_property
    def invalid_counts(self) -> dict[str, int]:
        """Malformed records per error code (every code of :data:`ERROR_CODES` present)."""
        counts = dict.fromkeys(ERROR_CODES, 0)
        for item in self.invalid:
            counts[item.code] = counts.get(item.code, 0) + 1
        return counts

    @cached_property
    def unique_message_ids(self) -> list[str]:
        """message_ids of the valid unique events, in produced order."""
        return [e.message_id for e in self.valid]

    @cached_property
    def expected_user_key(self) -> dict[str, str]:
        """user_key per valid unique message_id."""
        return {e.message_id: e.user_key for e in self.valid}

    @property
    def session_count(self) -> int:
        """Expected number of sessions."""
        return sum(len(s) for s in self.sessions.values())

    def to_json(self) -> bytes:
        """Serialise to compact, deterministic JSON (columnar lists for the big tables)."""
        doc: dict[str, Any] = {
            "format": TRUTH_FORMAT,
            "config": self.config,
            "records": self.records,
            "unique_valid": self.unique_valid,
            "duplicates": {
                "count": self.duplicate_count,
                "position": [d.position for d in self.duplicates],
                "original_position": [d.original_position for d in self.duplicates],
                "message_id": [d.message_id for d in self.duplicates],
            },
            "invalid": {
                "count": len(self.invalid),
                "by_code": self.invalid_counts,
                "position": [i.position for i in self.invalid],
                "code": [i.code for i in self.invalid],
                "detail": [i.detail for i in self.invalid],
            },
            "late": {
                "count": len(self.late),
                "position": [x.position for x in self.late],
                "message_id": [x.message_id for x in self.late],
                "delay_ms": [x.delay_ms for x in self.late],
            },
            "out_of_order": {"count": len(self.out_of_order), "message_id": self.out_of_order},
            "users": self.users,
            "events": {
                "position": [e.position for e in self.valid],
                "message_id": [e.message_id for e in self.valid],
                "user_key": [e.user_key for e in self.valid],
                "type": [e.type for e in self.valid],
                "event": [e.event for e in self.valid],
                "timestamp_ms": [e.timestamp_ms for e in self.valid],
                "received_at_ms": [e.received_at_ms for e in self.valid],
                "is_bot": [e.is_bot for e in self.valid],
            },
            "sessions": {
                "count": self.session_count,
                "by_user_key": {
                    k: [[s.start_ms, s.end_ms, s.events] for s in v] for k, v in self.sessions.items()
                },
            },
            "aggregates": self.aggregates,
        }
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes | str) -> Truth:
        """Load a truth document written by :meth:`to_json`."""
        doc = orjson.loads(data)
        if doc.get("format") != TRUTH_FORMAT:
            raise ValueError(f"not a {TRUTH_FORMAT} document")
        ev = doc["events"]
        valid = [
            TruthEvent(*row)
            for row in zip(
                ev["position"],
                ev["message_id"],
                ev["user_key"],
                ev["type"],
                ev["event"],
                ev["timestamp_ms"],
                ev["received_at_ms"],
                ev["is_bot"],
                strict=True,
            )
        ]
        dup = doc["duplicates"]
        inv = doc["invalid"]
        late = doc["late"]
        return cls(
            config=doc["config"],
            records=doc["records"],
            valid=valid,
            duplicates=[
                TruthDuplicate(*r)
                for r in zip(dup["position"], dup["original_position"], dup["message_id"], strict=True)
            ],
            invalid=[TruthInvalid(*r) for r in zip(inv["position"], inv["code"], inv["detail"], strict=True)],
            late=[
                TruthLate(*r)
                for r in zip(late["position"], late["message_id"], late["delay_ms"], strict=True)
            ],
            out_of_order=list(doc["out_of_order"]["message_id"]),
            users=doc["users"],
            sessions={k: [TruthSession(*s) for s in v] for k, v in doc["sessions"]["by_user_key"].items()},
            aggregates=doc["aggregates"],
        )


# --------------------------------------------------------------------------------------------------
# time helpers


def _dt_to_ms(dt: datetime) -> int:
    delta = dt - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


_MINUTE_PREFIX: dict[int, str] = {}  # epoch minute -> "YYYY-MM-DDTHH:MM:" (a few thousand entries per run)


def _iso(ms: int, offset_min: int = 0) -> str:
    """ISO-8601 with milliseconds; ``Z`` for UTC, else the local time with its ``±hh:mm`` offset."""
    minute, rest = divmod(ms + offset_min * 60_000, 60_000)
    prefix = _MINUTE_PREFIX.get(minute)
    if prefix is None:
        prefix = _MINUTE_PREFIX[minute] = (_EPOCH + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:")
    ss, frac = divmod(rest, 1000)
    if offset_min == 0:
        return f"{prefix}{ss:02d}.{frac:03d}Z"
    sign = "+" if offset_min > 0 else "-"
    oh, om = divmod(abs(offset_min), 60)
    return f"{prefix}{ss:02d}.{frac:03d}{sign}{oh:02d}:{om:02d}"


def _day(ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=ms)).date().isoformat()


# --------------------------------------------------------------------------------------------------
# static world: countries, devices, bots, catalog, traffic sources

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Country:
    code: str
    weight: float
    locales: tuple[str, ...]
    currency: str
    usd_rate: float
    utc_offset_min: int
    ip_prefixes: tuple[str, ...]  # /16 prefixes verified with geoip2fast to resolve to ``code``
    google: str
    names: tuple[str, ...]


_COUNTRIES: tuple[_Country, ...] = (
    _Country("US", 34, ("en-US", "en-US", "es-US"), "USD", 1.0, -300,
             ("73.162", "24.5", "98.207", "108.28", "69.181", "71.192", "173.73"),
             "https://www.google.com/", ("Emily Johnson", "Michael Smith", "Ashley Brown", "David García")),
    _Country("GB", 10, ("en-GB",), "GBP", 0.79, 0,
             ("86.150", "90.200", "109.150", "2.96", "31.48"),
             "https://www.google.co.uk/", ("Oliver Taylor", "Amelia Wilson", "Harry Evans")),
    _Country("DE", 10, ("de-DE",), "EUR", 0.95, 60,
             ("79.200", "91.64", "84.150", "93.200", "87.123", "80.133"),
             "https://www.google.de/", ("Jürgen Müller", "Anna Schäfer", "Lukas Weiß")),
    _Country("FR", 7, ("fr-FR",), "EUR", 0.95, 60,
             ("90.8", "86.200", "92.150", "2.10", "81.250", "78.120"),
             "https://www.google.fr/", ("Élodie Moreau", "Lucas Lefèvre", "Chloé Dubois")),
    _Country("ES", 5, ("es-ES", "ca-ES"), "EUR", 0.95, 60,
             ("83.32", "88.20", "79.152", "81.40", "80.30"),
             "https://www.google.es/", ("José García", "Lucía Fernández", "Martín Núñez")),
    _Country("NL", 4, ("nl-NL",), "EUR", 0.95, 60,
             ("77.160", "84.80", "145.53", "86.80", "62.45"),
             "https://www.google.nl/", ("Daan de Vries", "Sanne Jansen")),
    _Country("JP", 5, ("ja-JP",), "JPY", 150.0, 540,
             ("153.200", "126.10", "60.100", "219.100", "180.10"),
             "https://www.google.co.jp/", ("佐藤 健", "鈴木 花子", "Haruto Tanaka")),
    _Country("BR", 6, ("pt-BR",), "BRL", 5.8, -180,
             ("177.100", "179.200", "187.10", "189.40"),
             "https://www.google.com.br/", ("João Silva", "Ana Souza", "Conceição Lima")),
    _Country("IN", 7, ("en-IN", "hi-IN"), "INR", 84.0, 330,
             ("49.36", "106.200", "117.200", "122.170"),
             "https://www.google.co.in/", ("Aarav Sharma", "Priya Patel", "Rohan Gupta")),
    _Country("AU", 4, ("en-AU",), "AUD", 1.55, 660,
             ("1.120", "101.160", "58.160", "110.140", "120.150"),
             "https://www.google.com.au/", ("Jack Thompson", "Charlotte White")),
    _Country("CA", 5, ("en-CA", "fr-CA"), "CAD", 1.4, -300,
             ("99.230", "70.50", "174.88", "142.112", "24.114"),
             "https://www.google.ca/", ("Liam Tremblay", "Emma Roy", "Noah Côté")),
)  # fmt: skip

# (user agent, device type, weight)
_HUMAN_UAS: tuple[tuple[str, str, float], ...] = (
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36", "desktop", 20),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36", "desktop", 7),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0", "desktop", 4),
    ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", "desktop", 1),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/18.1 Safari/605.1.15", "desktop", 5),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0", "desktop", 6),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/18.1 Mobile/15E148 Safari/604.1", "mobile", 18),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1", "mobile", 3),
    ("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Mobile Safari/537.36", "mobile", 17),
    ("Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36", "mobile", 5),
    ("Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0", "mobile", 1),
    ("Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.7 Mobile/15E148 Safari/604.1", "tablet", 6),
    ("Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36", "tablet", 3),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _BotKind:
    name: str
    weight: float
    user_agents: tuple[str, ...]
    ip_prefixes: tuple[str, ...]  # /24 prefixes
    interval_s: tuple[float, float]
    pages: tuple[int, int]
    locale: str | None


_BOTS: tuple[_BotKind, ...] = (
    _BotKind("googlebot", 30,
             ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
              "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; "
              "+http://www.google.com/bot.html) Chrome/131.0.6778.69 Safari/537.36",
              "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 "
              "(KHTML, like Gecko) Chrome/131.0.6778.69 Mobile Safari/537.36 (compatible; Googlebot/2.1; "
              "+http://www.google.com/bot.html)"),
             tuple(f"66.249.{i}" for i in range(64, 80)), (1.0, 8.0), (60, 400), None),
    _BotKind("bingbot", 15, ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",),
             ("157.55.39", "40.77.167", "207.46.13"), (2.0, 10.0), (40, 250), None),
    _BotKind("ahrefsbot", 15, ("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",),
             ("54.36.148", "54.36.149"), (0.5, 3.0), (80, 500), None),
    _BotKind("curl", 10, ("curl/8.5.0", "curl/7.81.0"), ("3.80.10", "52.90.1", "159.89.10"),
             (0.05, 0.4), (20, 200), None),
    _BotKind("python-requests", 15, ("python-requests/2.32.3", "python-requests/2.31.0"),
             ("52.90.1", "167.99.20", "159.89.10"), (0.1, 0.8), (30, 300), None),
    _BotKind("headlesschrome", 15,
             ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "HeadlessChrome/131.0.0.0 Safari/537.36",),
             ("34.120.1", "3.80.10"), (0.8, 4.0), (20, 150), "en-US"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Deal:
    deal_id: str
    slug: str
    title: str
    base_usd: float
    weight: float


@dataclass(frozen=True, slots=True)
class _Product:
    product_id: str
    name: str
    category: str
    deal: _Deal | None
    usd: float


_DEALS: tuple[_Deal, ...] = (
    _Deal("LAS-DEC", "las-vegas-december", "Las Vegas in December", 129.0, 14),
    _Deal("NYC-JAN", "new-york-january", "New York winter break", 189.0, 8),
    _Deal("CUN-FEB", "cancun-february", "Cancún beach escape", 249.0, 8),
    _Deal("LIS-MAR", "lisbon-march", "Lisbon city break", 99.0, 6),
    _Deal("BCN-APR", "barcelona-april", "Barcelona spring weekend", 119.0, 6),
    _Deal("TYO-MAY", "tokyo-may", "Tokyo in May", 649.0, 5),
    _Deal("PAR-JUN", "paris-june", "Paris in June", 139.0, 6),
    _Deal("HNL-JUL", "honolulu-july", "Honolulu summer", 499.0, 4),
    _Deal("REK-AUG", "reykjavik-august", "Reykjavík & the Golden Circle", 299.0, 3),
    _Deal("ZRH-NOV", "zurich-november", "Zürich Christmas markets", 159.0, 4),
    _Deal("GRU-DEC", "sao-paulo-december", "São Paulo New Year", 599.0, 3),
    _Deal("SYD-OCT", "sydney-october", "Sydney & the Blue Mountains", 899.0, 3),
)

_PRODUCT_KINDS: tuple[tuple[str, str, float], ...] = (
    ("flights", "Return flight", 1.0),
    ("hotels", "3 nights hotel", 1.6),
    ("packages", "Flight + hotel package", 2.3),
    ("car-rental", "Car rental, 3 days", 0.55),
)


def _build_catalog() -> tuple[_Product, ...]:
    products: list[_Product] = []
    sku = 1001
    for deal in _DEALS:
        for category, label, mult in _PRODUCT_KINDS:
            name = f"{label} – {deal.title}"
            products.append(_Product(f"sku_{sku}", name, category, deal, round(deal.base_usd * mult, 2)))
            sku += 1
    for name, category, usd in (
        ("Travel insurance, annual", "extras", 79.0),
        ("Airport lounge pass", "extras", 39.0),
        ("Extra checked bag", "extras", 45.0),
        ("eSIM 10 GB worldwide", "extras", 24.0),
        ("Gift card", "gift-cards", 100.0),
    ):
        products.append(_Product(f"sku_{sku}", name, category, None, usd))
        sku += 1
    return tuple(products)


_CATALOG = _build_catalog()
_PRODUCTS_BY_DEAL: dict[str, tuple[_Product, ...]] = {
    d.deal_id: tuple(p for p in _CATALOG if p.deal is d) for d in _DEALS
}
_SEARCH_TERMS = (
    "cheap flights las vegas", "las vegas december", "new york hotel", "cancún all inclusive",
    "lisbon weekend", "tokyo flights", "paris hotel", "last minute deals", "christmas markets zürich",
    "family holiday", "ski trip", "são paulo réveillon",
)  # fmt: skip
_CAMPAIGNS = (
    "winter_sun_2026", "black_friday_2026", "cyber_monday_2026", "dec_deals", "retargeting_q4",
    "brand_search", "las_vegas_dec",
)  # fmt: skip
_HELP_TOPICS = ("baggage", "refunds", "change-booking", "payment-methods", "covid-travel")
_LIBRARY = {"name": "analytics.js", "version": "next-1.72.0"}
_SERVER_LIBRARY = {"name": "analytics-python", "version": "2.3.3"}
_SOCIAL = (
    ("https://l.facebook.com/", "facebook", True),
    ("https://m.facebook.com/", "facebook", True),
    ("https://l.instagram.com/", "instagram", True),
    ("https://t.co/", "twitter", False),
    ("https://www.linkedin.com/", "linkedin", False),
)
_REFERRALS = (
    "https://www.tripadvisor.com/ShowTopic-g45963-i10-k14623.html",
    "https://www.reddit.com/r/travel/comments/1gx2k9q/cheap_vegas_in_december/",
    "https://www.lonelyplanet.com/articles/best-time-to-visit-las-vegas",
    "https://news.ycombinator.com/item?id=42212345",
    "https://www.theguardian.com/travel/2026/nov/20/winter-city-breaks",
)
_AFFILIATES = (
    ("https://www.travelzoo.com/", "travelzoo"),
    ("https://www.secretflying.com/", "secretflying"),
    ("https://www.holidaypirates.com/", "holidaypirates"),
)
_EMAIL_REFERRERS = (None, None, "https://mail.google.com/", "https://outlook.live.com/")
_TRAFFIC_SOURCES = (
    ("direct", 24.0),
    ("organic_search", 24.0),
    ("paid_search", 14.0),
    ("social", 12.0),
    ("email", 10.0),
    ("referral", 9.0),
    ("affiliate", 4.0),
    ("display", 3.0),
)
_UUID_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}
_CLICK_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _cum(weights: Iterable[float]) -> list[float]:
    out: list[float] = []
    acc = 0.0
    for w in weights:
        acc += w
        out.append(acc)
    return out


_COUNTRY_CUM = _cum(c.weight for c in _COUNTRIES)
_UA_CUM = _cum(u[2] for u in _HUMAN_UAS)
_BOT_CUM = _cum(b.weight for b in _BOTS)
_DEAL_CUM = _cum(d.weight for d in _DEALS)
_SOURCE_CUM = _cum(s[1] for s in _TRAFFIC_SOURCES)


# --------------------------------------------------------------------------------------------------
# simulation state


class _Visitor:
    """One device (one anonymous_id): a human browser or a bot run."""

    __slots__ = (
        "anonymous_id", "ua", "device", "bot", "ip", "locale", "country", "ts_style", "skew_ms",
        "account", "identified", "sends_user_id", "last_end_ms", "traits", "sent_at",
    )  # fmt: skip

    def __init__(self, anonymous_id: str, ua: str, device: str, bot: str | None, ip: str,
                 locale: str | None, country: _Country) -> None:  # fmt: skip
        self.anonymous_id = anonymous_id
        self.ua = ua
        self.device = device
        self.bot = bot
        self.ip = ip
        self.locale = locale
        self.country = country
        self.ts_style = "iso"  # iso | offset | epoch
        self.skew_ms = 0
        self.account: str | None = None
        self.identified = False
        self.sends_user_id = True
        self.last_end_ms = 0
        self.traits: dict[str, Any] = {}
        self.sent_at = "yes"  # yes | null | omit: old SDKs do not send sent_at (their clocks are right)


class _Pending:
    """A valid event before delivery: its payload (timestamps filled in later) and timing."""

    __slots__ = ("payload", "true_ms", "visitor", "server", "sent_at", "protected", "recv_ms", "corrected_ms",
                 "mode", "value", "key")  # fmt: skip

    def __init__(self, payload: dict[str, Any], true_ms: int, visitor: _Visitor, server: bool) -> None:
        self.payload = payload
        self.true_ms = true_ms
        self.visitor = visitor
        self.server = server
        self.sent_at = "yes"  # yes | null | omit
        self.protected = payload["type"] in ("identify", "alias")
        self.recv_ms = 0
        self.corrected_ms = 0
        self.mode = "normal"  # normal | ooo | late
        self.value = b""
        self.key: bytes | None = None


class _Session:
    """Mutable per-session browsing state."""

    __slots__ = ("v", "t", "url", "page", "events", "cart", "source", "product", "hunter_deal")

    def __init__(self, v: _Visitor, t: int) -> None:
        self.v = v
        self.t = t
        self.url: str | None = None
        self.page: dict[str, Any] = {}
        self.events: list[_Pending] = []
        self.cart: list[tuple[_Product, float]] = []
        self.source = "direct"
        self.product: _Product | None = None
        self.hunter_deal: _Deal | None = None


class _Sim:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)  # noqa: S311 - reproducible simulation, not crypto
        self.start_ms = cfg.start_ms
        self.end_ms = cfg.end_ms
        self.span_ms = self.end_ms - self.start_ms
        self.site = cfg.site.rstrip("/")
        self.visitors: list[_Visitor] = []
        self.accounts: list[str] = []
        self.account_ids: set[str] = set()
        self.order_seq = 0
        self.source_counts: Counter[str] = Counter()
        self.prices: dict[tuple[str, str], float] = {}

    # ---- small random helpers

    def ri(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (a faster ``randint``)."""
        return lo + int(self.rng.random() * (hi - lo + 1))

    def pick(self, items: Sequence[_T], cum: list[float]) -> _T:
        return self.rng.choices(items, cum_weights=cum)[0]

    def uuid(self) -> str:
        h = self.rng.randbytes(16).hex()
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_UUID_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"

    def token(self, n: int) -> str:
        return "".join(self.rng.choices(_CLICK_ID_ALPHABET, k=n))

    def log_uniform(self, lo: float, hi: float) -> float:
        return math.exp(self.rng.uniform(math.log(lo), math.log(hi)))

    def dwell_ms(self) -> int:
        # median ~40 s, long tail, capped well below the session gap
        return int(min(max(self.rng.lognormvariate(math.log(40.0), 0.95), 3.0), 20 * 60.0) * 1000)

    # ---- visitors

    def new_human(self) -> _Visitor:
        rng = self.rng
        country = self.pick(_COUNTRIES, _COUNTRY_CUM)
        ua, device, _ = self.pick(_HUMAN_UAS, _UA_CUM)
        ip = f"{rng.choice(country.ip_prefixes)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        v = _Visitor(self.uuid(), ua, device, None, ip, rng.choice(country.locales), country)
        r = rng.random()
        if r < 0.03:
            v.ts_style = "epoch"
        elif r < 0.07:
            v.ts_style = "offset"
        if rng.random() < 0.03:
            v.sent_at = rng.choice(("null", "omit"))
        elif rng.random() < self.cfg.skewed_clock_fraction:
            sign = rng.choice((-1, 1))
            if rng.random() < 0.15:
                v.skew_ms = sign * int(self.log_uniform(25 * _MS_H, 3 * _MS_DAY))
            else:
                v.skew_ms = sign * int(self.log_uniform(2 * 60_000, 6 * _MS_H))
        if rng.random() < 0.4:
            if self.accounts and rng.random() < 0.15:
                v.account = rng.choice(self.accounts)  # second device of an existing customer
            else:
                v.account = self.new_account()
            v.traits = self.traits_for(v)
        v.sends_user_id = rng.random() < 0.6
        self.visitors.append(v)
        return v

    def new_account(self) -> str:
        while True:
            uid = f"usr_{self.rng.randrange(100_000, 10_000_000)}"
            if uid not in self.account_ids:
                self.account_ids.add(uid)
                self.accounts.append(uid)
                return uid

    def traits_for(self, v: _Visitor) -> dict[str, Any]:
        name = self.rng.choice(v.country.names)
        handle = v.account or "user"
        return {
            "name": name,
            "email": f"{handle}@example.com",
            "plan": self.rng.choice(("free", "free", "silver", "gold")),
            "country": v.country.code,
        }

    def diurnal_start(self, country: _Country, latest_ms: int) -> int:
        """A start time in [start, latest] weighted by local time of day (busy afternoons/evenings)."""
        rng = self.rng
        span = max(latest_ms - self.start_ms, 1)
        while True:
            t = self.start_ms + int(rng.random() * span)
            hour = ((t // _MS_H) + country.utc_offset_min / 60.0) % 24
            w = 0.12 + 0.88 * (0.5 - 0.5 * math.cos(2 * math.pi * (hour - 5.0) / 24))
            if rng.random() < w:
                return t

    # ---- payload builders

    def payload(
        self, v: _Visitor, kind: str, event: str | None = None, *, server: bool = False
    ) -> dict[str, Any]:
        d: dict[str, Any] = {"message_id": self.uuid(), "type": kind}
        if event is not None:
            d["event"] = event
        if server:
            d["user_id"] = v.account
        else:
            d["anonymous_id"] = v.anonymous_id
            if v.identified and v.sends_user_id and v.account:
                d["user_id"] = v.account
        d["timestamp"] = None
        d["sent_at"] = None
        return d

    def emit(self, s: _Session, d: dict[str, Any], *, server: bool = False) -> _Pending:
        v = s.v
        if server:
            d["context"] = {"ip": "52.90.1.17", "library": _SERVER_LIBRARY}
        else:
            d["context"] = {
                "ip": v.ip,
                "user_agent": v.ua,
                "locale": v.locale,
                "page": s.page,
                "library": _LIBRARY,
            }
        p = _Pending(d, s.t, v, server)
        if server:
            p.sent_at = self.rng.choice(("yes", "null", "omit"))
        else:
            p.sent_at = v.sent_at
        s.events.append(p)
        return p

    def page(self, s: _Session, path: str, title: str, name: str, query: dict[str, str] | None = None,
             referrer: str | None = None, properties: dict[str, Any] | None = None) -> None:  # fmt: skip
        url = self.site + path
        if query:
            url += ("&" if "?" in path else "?") + urlencode(query)
        ref = s.url if referrer is None and s.url is not None else referrer
        s.page = {"url": url, "path": path.split("?", 1)[0], "referrer": ref, "title": title}
        s.url = url
        d = self.payload(s.v, "page")
        d["name"] = name
        d["properties"] = properties if properties is not None else {}
        self.emit(s, d)

    def track(self, s: _Session, event: str, properties: dict[str, Any], *, server: bool = False) -> None:
        d = self.payload(s.v, "track", event, server=server)
        d["properties"] = properties
        self.emit(s, d, server=server)

    # ---- browsing steps

    def price(self, v: _Visitor, p: _Product) -> float:
        key = (p.product_id, v.country.code)
        price = self.prices.get(key)
        if price is None:
            local = p.usd * v.country.usd_rate
            price = float(round(local)) if v.country.currency in ("JPY", "INR") else round(local, 2)
            self.prices[key] = price
        return price

    def product_props(self, s: _Session, p: _Product) -> dict[str, Any]:
        props: dict[str, Any] = {"product_id": p.product_id}
        if p.deal is not None:
            props["deal_id"] = p.deal.deal_id
        props.update(
            {
                "name": p.name,
                "category": p.category,
                "price": self.price(s.v, p),
                "currency": s.v.country.currency,
            }
        )
        return props

    def view_product(self, s: _Session, p: _Product, *, referrer: str | None = None,
                     query: dict[str, str] | None = None) -> None:  # fmt: skip
        self.page(s, f"/p/{p.product_id}", f"{p.name} | SkyHop", "Product", query, referrer,
                  {"category": p.category})  # fmt: skip
        s.t += self.ri(150, 1500)
        self.track(s, "Product Viewed", self.product_props(s, p))
        s.product = p

    def view_deal(self, s: _Session, deal: _Deal, *, referrer: str | None = None,
                  query: dict[str, str] | None = None) -> None:  # fmt: skip
        price = self.price(s.v, _PRODUCTS_BY_DEAL[deal.deal_id][0])
        title = f"{deal.title} – from {price:g} {s.v.country.currency} | SkyHop"
        self.page(s, f"/deals/{deal.slug}", title, "Deal", query, referrer, {"deal_id": deal.deal_id})

    def random_product(self, near: _Product | None = None) -> _Product:
        rng = self.rng
        if near is not None and near.deal is not None and rng.random() < 0.35:
            return rng.choice(_PRODUCTS_BY_DEAL[near.deal.deal_id])
        if rng.random() < 0.12:
            return rng.choice(_CATALOG[-5:])
        deal = self.pick(_DEALS, _DEAL_CUM)
        return rng.choice(_PRODUCTS_BY_DEAL[deal.deal_id])

    def land(self, s: _Session) -> None:
        """First page of a session: traffic source decides referrer, campaign parameters and landing page."""
        rng = self.rng
        v = s.v
        source = self.pick([x[0] for x in _TRAFFIC_SOURCES], _SOURCE_CUM)
        if s.hunter_deal is not None and source not in ("email", "direct", "paid_search"):
            source = "email"
        s.source = source
        self.source_counts[source] += 1
        referrer: str | None = None
        query: dict[str, str] = {}
        campaign = rng.choice(_CAMPAIGNS)
        if source == "organic_search":
            r = rng.random()
            referrer = v.country.google if r < 0.75 else ("https://www.bing.com/" if r < 0.9 else
                                                          "https://duckduckgo.com/")  # fmt: skip
        elif source == "paid_search":
            term = rng.choice(_SEARCH_TERMS)
            if rng.random() < 0.8:
                referrer = v.country.google
                if rng.random() < 0.7:
                    query = {"utm_source": "google", "utm_medium": "cpc", "utm_campaign": campaign,
                             "utm_term": term, "utm_content": f"text_ad_{self.ri(1, 4)}"}  # fmt: skip
                query["gclid"] = "Cj0KCQiA" + self.token(60)
            else:
                referrer = "https://www.bing.com/"
                query = {"utm_source": "bing", "utm_medium": "cpc", "utm_campaign": campaign,
                         "utm_term": term, "msclkid": f"{rng.getrandbits(128):032x}"}  # fmt: skip
        elif source == "social":
            referrer, network, adds_fbclid = rng.choice(_SOCIAL)
            if referrer == "https://t.co/":
                referrer += self.token(10)
            if rng.random() < 0.4:
                query = {"utm_source": network, "utm_medium": "paid_social", "utm_campaign": campaign,
                         "utm_content": rng.choice(("carousel_1", "video_15s", "story_a"))}  # fmt: skip
            if adds_fbclid:
                query["fbclid"] = "IwAR" + self.token(56)
        elif source == "email":
            referrer = rng.choice(_EMAIL_REFERRERS)
            query = {"utm_source": "newsletter", "utm_medium": "email", "utm_campaign": campaign,
                     "utm_content": rng.choice(("hero", "cta_button", "deal_grid"))}  # fmt: skip
        elif source == "referral":
            referrer = rng.choice(_REFERRALS)
        elif source == "affiliate":
            referrer, partner = rng.choice(_AFFILIATES)
            query = {"utm_source": partner, "utm_medium": "affiliate", "utm_campaign": campaign}
        elif source == "display":
            referrer = "https://tpc.googlesyndication.com/"
            query = {"utm_source": "google", "utm_medium": "display", "utm_campaign": "retargeting_q4",
                     "gclid": "EAIaIQobChMI" + self.token(56)}  # fmt: skip
        # landing page
        if s.hunter_deal is not None:
            self.view_deal(s, s.hunter_deal, referrer=referrer, query=query)
            return
        r = rng.random()
        if source == "direct" and r < 0.6 or source == "organic_search" and r < 0.3:
            title = "SkyHop – cheap flights, hotels & holiday deals"
            self.page(s, "/", title, "Home", query, referrer)
        elif r < 0.65:
            self.view_deal(s, self.pick(_DEALS, _DEAL_CUM), referrer=referrer, query=query)
        else:
            self.view_product(s, self.random_product(), referrer=referrer, query=query)

    def login(self, s: _Session) -> None:
        v = s.v
        self.page(s, "/login", "Sign in | SkyHop", "Login")
        s.t += self.ri(8_000, 60_000)
        v.identified = True
        d = self.payload(v, "identify")
        d["user_id"] = v.account
        d["traits"] = v.traits
        self.emit(s, d)

    def signup(self, s: _Session) -> None:
        v = s.v
        self.page(s, "/signup", "Create your account | SkyHop", "Signup")
        s.t += self.ri(20_000, 120_000)
        v.account = self.new_account()
        v.traits = self.traits_for(v)
        if self.rng.random() < 0.5:
            d = self.payload(v, "alias")
            d["previous_id"] = v.anonymous_id
            d["user_id"] = v.account
            self.emit(s, d)
            s.t += self.ri(50, 400)
        v.identified = True
        d = self.payload(v, "identify")
        d["user_id"] = v.account
        d["traits"] = v.traits
        self.emit(s, d)
        s.t += self.ri(50, 400)
        self.track(s, "Signed Up", {"method": self.rng.choice(("email", "google", "apple"))})

    def add_to_cart(self, s: _Session, p: _Product) -> None:
        props = self.product_props(s, p)
        props["quantity"] = 1
        s.cart.append((p, props["price"]))
        self.track(s, "Product Added", props)

    def checkout(self, s: _Session) -> bool:
        """Checkout Started and, sometimes, Order Completed. Returns True when the visitor ordered."""
        rng = self.rng
        v = s.v
        self.page(s, "/checkout", "Checkout | SkyHop", "Checkout")
        s.t += self.ri(300, 2000)
        self.order_seq += 1
        order_id = f"ORD-{self.order_seq:07d}"
        value = round(sum(price for _, price in s.cart), 2)
        products = [{"product_id": p.product_id, "price": price, "quantity": 1} for p, price in s.cart]
        self.track(s, "Checkout Started", {"order_id": order_id, "value": value,
                                           "currency": v.country.currency, "products": products})  # fmt: skip
        if rng.random() >= 0.55:
            return False  # abandoned at checkout
        s.t += self.ri(40_000, 6 * 60_000)
        props = {"order_id": order_id, "revenue": value, "currency": v.country.currency, "products": products}
        if v.identified and v.account and rng.random() < 0.3:
            self.track(s, "Order Completed", props, server=True)  # sent by the backend: user_id only
            s.t += self.ri(300, 3000)
        else:
            self.track(s, "Order Completed", props)
            s.t += self.ri(200, 1500)
        self.page(s, f"/checkout/confirmation?order={order_id}", "Thank you for booking! | SkyHop",
                  "Order Confirmation")  # fmt: skip
        s.cart.clear()
        return True

    def human_session(self, v: _Visitor, t0: int, hunter: _Deal | None) -> list[_Pending]:
        rng = self.rng
        s = _Session(v, t0)
        s.hunter_deal = hunter
        self.land(s)
        if hunter is not None:
            # the airline promo case: the same deal viewed 4-6 times within ~20 minutes
            for i in range(self.ri(4, 6)):
                s.t += self.ri(15_000, 90_000)
                if i and rng.random() < 0.5:
                    if rng.random() < 0.5:
                        self.view_deal(s, hunter)
                    else:
                        self.page(s, "/deals", "Travel deals | SkyHop", "Deals")
                    s.t += self.ri(15_000, 90_000)
                self.view_product(s, rng.choice(_PRODUCTS_BY_DEAL[hunter.deal_id]))
        bounce = 0.3
        steps = 0
        while True:
            steps += 1
            if rng.random() < (bounce if steps == 1 else 0.17):
                break
            r = rng.random() * 100
            if r < 16 and s.product is not None:
                s.t += self.ri(4_000, 60_000)
                self.add_to_cart(s, s.product)
                s.product = None
                continue
            s.t += self.dwell_ms()
            if 16 <= r < 34 and s.cart:
                if rng.random() < 0.25:
                    self.page(s, "/cart", "Your cart | SkyHop", "Cart")
                    s.t += self.dwell_ms()
                if self.checkout(s) and rng.random() < 0.6:
                    break
            elif 34 <= r < 42 and v.account is not None and not v.identified:
                self.login(s)
            elif 42 <= r < 43 and v.account is None:
                self.signup(s)
            else:
                self.browse(s)
        return s.events

    def browse(self, s: _Session) -> None:
        """One ordinary page view: product (with Product Viewed), deal, search, deal list, account, help."""
        rng = self.rng
        r = rng.random() * 100
        if r < 55:
            self.view_product(s, self.random_product(s.product))
        elif r < 72:
            self.view_deal(s, self.pick(_DEALS, _DEAL_CUM))
        elif r < 83:
            term = rng.choice(_SEARCH_TERMS)
            self.page(s, f"/search?q={quote_plus(term)}", f"Search results for “{term}” | SkyHop", "Search")
        elif r < 91:
            self.page(s, "/deals", "Travel deals | SkyHop", "Deals")
        elif r < 95 and s.v.identified:
            self.page(s, "/account/trips", "My trips | SkyHop", "Account")
        else:
            topic = rng.choice(_HELP_TOPICS)
            self.page(s, f"/help/{topic}", f"Help: {topic.replace('-', ' ')} | SkyHop", "Help")

    def bot_run(self, kind: _BotKind, n: int) -> list[_Pending]:
        rng = self.rng
        ip = f"{rng.choice(kind.ip_prefixes)}.{rng.randrange(1, 255)}"
        country = _COUNTRIES[0] if not ip.startswith(("54.36", "159.89")) else _COUNTRIES[2]
        v = _Visitor(self.uuid(), rng.choice(kind.user_agents), "bot", kind.name, ip, kind.locale, country)
        self.visitors.append(v)
        lo, hi = kind.interval_s
        duration = int(n * (lo + hi) / 2 * 1000) + 60_000
        latest = max(self.end_ms - duration - 120_000, self.start_ms + 1)
        s = _Session(v, self.start_ms + int(rng.random() * (latest - self.start_ms)))
        paths: list[tuple[str, str, str]] = [("/", "SkyHop – cheap flights, hotels & holiday deals", "Home"),
                                             ("/deals", "Travel deals | SkyHop", "Deals")]  # fmt: skip
        paths += [(f"/deals/{d.slug}", f"{d.title} | SkyHop", "Deal") for d in _DEALS]
        paths += [(f"/p/{p.product_id}", f"{p.name} | SkyHop", "Product") for p in _CATALOG]
        paths += [(f"/help/{t}", f"Help: {t} | SkyHop", "Help") for t in _HELP_TOPICS]
        follows_links = kind.name == "headlesschrome"
        for _ in range(n):
            path, title, name = rng.choice(paths)
            if not follows_links:
                s.url = None
            self.page(s, path, title, name)
            s.t += int(rng.uniform(lo, hi) * 1000)
        return s.events


# --------------------------------------------------------------------------------------------------
# generation


def _split(total: int, weights: dict[str, float], rng: random.Random) -> list[str]:
    """Exactly ``total`` codes split by weights (largest remainder), each code once if total >= len."""
    codes = list(weights)
    base = dict.fromkeys(codes, 1 if total >= len(codes) else 0)
    rest = total - sum(base.values())
    raw = {c: rest * weights[c] for c in codes}
    for c in codes:
        base[c] += int(raw[c])
    left = total - sum(base.values())
    for c in sorted(codes, key=lambda c: raw[c] - int(raw[c]), reverse=True)[:left]:
        base[c] += 1
    out = [c for c in codes for _ in range(base[c])]
    rng.shuffle(out)
    return out


def generate(cfg: SimConfig | None = None) -> tuple[list[SimRecord], Truth]:
    """Simulate ``cfg.events`` raw records and their ground truth. Deterministic in ``cfg``.

    Records are in production order (non-decreasing ``timestamp_ms``); produce them in this order.
    The cyclic garbage collector is paused while generating (millions of short-lived acyclic objects).
    """
    cfg = cfg or SimConfig()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _generate(cfg)
    finally:
        if was_enabled:
            gc.enable()


def _generate(cfg: SimConfig) -> tuple[list[SimRecord], Truth]:
    sim = _Sim(cfg)
    rng = sim.rng
    n_valid, n_dup, n_bad = cfg.counts()
    end_ms = sim.end_ms

    # 1. valid events: bots first, then human sessions until the budget is used
    pending: list[_Pending] = []
    bot_budget = round(n_valid * cfg.bot_fraction)
    left = bot_budget
    while left > 0:
        kind = sim.pick(_BOTS, _BOT_CUM)
        n = min(left, rng.randint(*kind.pages))
        pending.extend(sim.bot_run(kind, n))
        left -= n

    human_budget = n_valid - bot_budget
    sessions_est = max(human_budget / 8.0, 1.0)
    target_users = cfg.users if cfg.users is not None else max(1, round(human_budget / 13.0))
    p_return = min(max(1.0 - target_users / sessions_est, 0.0), 0.95)
    returning: list[_Visitor] = []
    new_visitors = 0
    hunter_every = 100
    sessions = 0
    hunters_due = 1
    latest_start = end_ms - 20 * 60_000
    done = 0
    while done < human_budget:
        v: _Visitor | None = None
        t0 = 0
        if returning and (rng.random() < p_return or (cfg.users is not None and new_visitors >= cfg.users)):
            i = rng.randrange(len(returning))
            cand = returning[i]
            gap = sim.log_uniform(35 * 60_000, 4 * _MS_H) if rng.random() < 0.45 else sim.log_uniform(
                4 * _MS_H, 3 * _MS_DAY)  # fmt: skip
            t0 = cand.last_end_ms + int(gap)
            if t0 > latest_start:
                earliest = cand.last_end_ms + 35 * 60_000
                if earliest > latest_start:
                    returning[i] = returning[-1]
                    returning.pop()
                    continue
                t0 = rng.randint(earliest, latest_start)
            v = cand
        if v is None:
            v = sim.new_human()
            new_visitors += 1
            t0 = sim.diurnal_start(v.country, latest_start)
            returning.append(v)
        hunter: _Deal | None = None
        if hunters_due > 0 and t0 < end_ms - 45 * 60_000:
            hunter = _DEALS[0] if rng.random() < 0.6 else sim.pick(_DEALS, _DEAL_CUM)
            hunters_due -= 1
        evs = sim.human_session(v, t0, hunter)
        sessions += 1
        if sessions % hunter_every == 0:
            hunters_due += 1
        v.last_end_ms = evs[-1].true_ms
        evs = [e for e in evs if e.true_ms <= end_ms - 60_000][: human_budget - done]
        pending.extend(evs)
        done += len(evs)

    # 2. delivery: late, out of order, normal; skewed client clocks
    idx_late: set[int] = set()
    n_late = round(n_valid * cfg.late_fraction)
    cands = [i for i, p in enumerate(pending) if not p.protected and p.true_ms + _MS_H + 5_000 <= end_ms]
    for i in rng.sample(cands, min(n_late, len(cands))):
        p = pending[i]
        p.mode = "late"
        p.recv_ms = p.true_ms + int(sim.log_uniform(_MS_H, min(12 * _MS_H, end_ms - p.true_ms - 2_000)))
        idx_late.add(i)
    n_ooo = round(n_valid * cfg.out_of_order_fraction)
    cands = [
        i
        for i, p in enumerate(pending)
        if not p.protected and i not in idx_late and p.true_ms + 7_000 <= end_ms and not p.server
    ]
    for i in rng.sample(cands, min(n_ooo, len(cands))):
        p = pending[i]
        p.mode = "ooo"
        p.recv_ms = p.true_ms + int(sim.log_uniform(5_000, min(300_000, end_ms - p.true_ms - 1_000)))

    for p in pending:
        v = p.visitor
        if p.mode == "normal":
            send_true = p.true_ms + sim.ri(5, 800)
            p.recv_ms = send_true + sim.ri(15, 400)
        else:
            send_true = p.recv_ms - sim.ri(15, 400)
        skew = 0 if p.server else v.skew_ms
        ts_client = p.true_ms + skew
        sent_client = send_true + skew
        d = p.payload
        style = "iso" if p.server else v.ts_style
        if style == "epoch":
            d["timestamp"] = ts_client
            d["sent_at"] = sent_client
        else:
            off = v.country.utc_offset_min if style == "offset" else 0
            d["timestamp"] = _iso(ts_client, off)
            d["sent_at"] = _iso(sent_client, off)
        if p.sent_at == "yes":
            p.corrected_ms = p.recv_ms - (sent_client - ts_client)
        else:
            p.corrected_ms = ts_client
            if p.sent_at == "null":
                d["sent_at"] = None
            else:
                del d["sent_at"]
        p.value = orjson.dumps(d)
        k = record_key(d)
        p.key = k.encode() if k is not None else None
        del d["context"]  # serialised; the truth does not need it (keeps memory down)

    # 3. assemble the delivery stream: (recv, seq, kind, ref)
    stream: list[tuple[int, int, str, Any]] = [(p.recv_ms, i, "valid", p) for i, p in enumerate(pending)]
    seq = len(stream)
    bad = _Malformed(sim, [v for v in sim.visitors if v.bot is None] or [sim.new_human()])
    for code in _split(n_bad, _MALFORMED_WEIGHTS, rng):
        recv = sim.start_ms + 1_000 + int(rng.random() * (sim.span_ms - 1_000))
        key, value, detail = bad.make(code, recv)
        stream.append((recv, seq, "invalid", (key, value, code, detail)))
        seq += 1
    dup_src = rng.sample(range(len(pending)), n_dup) if n_dup <= len(pending) else [
        rng.randrange(len(pending)) for _ in range(n_dup)]  # fmt: skip
    for i in dup_src:
        p = pending[i]
        delay = sim.ri(1_000, 30_000) if rng.random() < 0.65 else sim.ri(30_000, 600_000)
        stream.append((min(p.recv_ms + delay, end_ms), seq, "dup", i))
        seq += 1
    stream.sort(key=lambda x: (x[0], x[1]))

    records, truth = _build_truth(cfg, sim, pending, stream, idx_late)
    log.debug(
        "simulated %d records (%d valid, %d duplicates, %d malformed)", len(records), n_valid, n_dup, n_bad
    )
    return records, truth


# --------------------------------------------------------------------------------------------------
# malformed records


class _Malformed:
    """Builds one malformed record for a given error code, from a realistic template event."""

    _JSON_VARIANTS = ("truncated", "truncated", "not_json", "python_repr", "batch_array", "json_string",
                      "json_number", "json_null", "empty")  # fmt: skip
    _UTF8_VARIANTS = ("latin1", "latin1", "gzip_bytes", "cesu8_surrogates", "truncated_multibyte")
    _SCHEMA_VARIANTS = (
        "missing_message_id", "empty_message_id", "numeric_message_id", "missing_identity",
        "null_identity", "empty_anonymous_id", "track_without_event", "empty_event_name", "timestamp_bool",
        "missing_timestamp", "properties_string", "traits_list", "type_screen", "type_group", "missing_type",
        "context_string", "alias_without_previous_id", "numeric_user_id",
    )  # fmt: skip
    _RANGE_VARIANTS = ("epoch_zero", "year_1970", "future_no_sent_at", "stale_offline_queue",
                       "future_after_correction")  # fmt: skip
    _GARBAGE = (b"ping", b"<html><body><h1>502 Bad Gateway</h1></body></html>", b"undefined",
                b"OK", b"--boundary\r\nContent-Disposition: form-data")  # fmt: skip

    def __init__(self, sim: _Sim, humans: list[_Visitor]) -> None:
        self.sim = sim
        self.rng = sim.rng
        self.humans = humans

    def template(self, recv: int, *, track: bool | None = None) -> tuple[_Visitor, dict[str, Any]]:
        rng = self.rng
        v = rng.choice(self.humans)
        deal = rng.choice(_DEALS)
        p = rng.choice(_PRODUCTS_BY_DEAL[deal.deal_id])
        url = f"{self.sim.site}/p/{p.product_id}"
        sent = recv - rng.randint(15, 400)
        ts = sent - rng.randint(5, 800)
        use_track = rng.random() < 0.5 if track is None else track
        d: dict[str, Any] = {"message_id": self.sim.uuid(), "type": "track" if use_track else "page"}
        if use_track:
            d["event"] = "Product Viewed"
        d["anonymous_id"] = v.anonymous_id
        d["timestamp"] = _iso(ts)
        d["sent_at"] = _iso(sent)
        d["context"] = {
            "ip": v.ip,
            "user_agent": v.ua,
            "locale": v.locale,
            "page": {
                "url": url,
                "path": f"/p/{p.product_id}",
                "referrer": None,
                "title": f"{p.name} | SkyHop",
            },
            "library": _LIBRARY,
        }
        d["properties"] = {
            "product_id": p.product_id,
            "deal_id": deal.deal_id,
            "price": p.usd,
            "currency": "USD",
        }
        return v, d

    def make(self, code: str, recv: int) -> tuple[bytes | None, bytes, str]:
        rng = self.rng
        if code == INVALID_JSON:
            variant = rng.choice(self._JSON_VARIANTS)
            v, d = self.template(recv)
            key: bytes | None = v.anonymous_id.encode()
            if variant == "truncated":
                text = orjson.dumps(d).decode()
                value = text[: rng.randint(1, len(text) - 2)].encode()
            elif variant == "not_json":
                value, key = rng.choice(self._GARBAGE), None
            elif variant == "python_repr":
                value = repr(d).encode()
            elif variant == "batch_array":
                value = orjson.dumps([d])
            elif variant == "json_string":
                value = orjson.dumps(orjson.dumps(d).decode())
            elif variant == "json_number":
                value = b"1"
            elif variant == "json_null":
                value = b"null"
            else:
                value, key = b"", None
            return key, value, variant
        if code == INVALID_UTF8:
            variant = rng.choice(self._UTF8_VARIANTS)
            v, d = self.template(recv)
            key = v.anonymous_id.encode()
            if variant == "latin1":
                d["context"]["page"]["title"] = "Zürich Christmas markets – Flüge ab 159 € | SkyHop"
                value = orjson.dumps(d).decode().encode("latin-1", errors="replace")
            elif variant == "gzip_bytes":
                value, key = (
                    b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + rng.randbytes(rng.randint(80, 600)),
                    None,
                )
            elif variant == "cesu8_surrogates":
                d["context"]["page"]["title"] = "Great deal @@ | SkyHop"
                value = orjson.dumps(d).replace(b"@@", b"\xed\xa0\xbd\xed\xb8\x80")
            else:
                d["context"]["page"]["title"] = "Caf@@"
                value = orjson.dumps(d).replace(b"@@", b"\xc3")
            return key, value, variant
        if code == SCHEMA_VIOLATION:
            variant = rng.choice(self._SCHEMA_VARIANTS)
            v, d = self.template(recv, track=variant not in ("alias_without_previous_id",))
            self._break_schema(d, variant)
            k = record_key(d)
            return (k.encode() if k else None), orjson.dumps(d), variant
        if code == SIZE_EXCEEDED:
            variant = rng.choice(("screenshot_property", "dom_snapshot_property", "avatar_trait"))
            v, d = self.template(recv, track=True)
            cap = self.sim.cfg.max_payload_bytes
            target = cap + rng.randint(1, 2 * cap)
            holder: dict[str, Any] = (
                d.setdefault("traits", {}) if variant == "avatar_trait" else d["properties"]
            )
            field_name = {"screenshot_property": "screenshot", "dom_snapshot_property": "dom_snapshot"}.get(
                variant, "avatar"
            )
            holder[field_name] = ""
            n = target - len(orjson.dumps(d))  # the filler is ASCII that JSON does not escape
            prefix = "" if variant == "dom_snapshot_property" else "data:image/png;base64,"
            holder[field_name] = (prefix + base64.b64encode(rng.randbytes(n * 3 // 4 + 3)).decode())[:n]
            return v.anonymous_id.encode(), orjson.dumps(d), variant
        if code == TIMESTAMP_OUT_OF_RANGE:
            variant = rng.choice(self._RANGE_VARIANTS)
            v, d = self.template(recv)
            sent = recv - rng.randint(15, 400)
            if variant == "epoch_zero":
                d["timestamp"] = 0
                del d["sent_at"]
            elif variant == "year_1970":
                d["timestamp"] = "1970-01-01T00:00:00.000Z"
                d["sent_at"] = None
            elif variant == "future_no_sent_at":
                d["timestamp"] = _iso(recv + rng.randint(2 * _MS_DAY, 400 * _MS_DAY))
                del d["sent_at"]
            elif variant == "stale_offline_queue":
                d["sent_at"] = _iso(sent)
                d["timestamp"] = _iso(sent - rng.randint(31 * _MS_DAY, 120 * _MS_DAY))
            else:
                d["sent_at"] = _iso(sent)
                d["timestamp"] = _iso(sent + rng.randint(25 * _MS_H, 10 * _MS_DAY))
            return v.anonymous_id.encode(), orjson.dumps(d), variant
        raise ValueError(f"unknown error code {code!r}")

    def _break_schema(self, d: dict[str, Any], variant: str) -> None:
        if variant == "missing_message_id":
            del d["message_id"]
        elif variant == "empty_message_id":
            d["message_id"] = ""
        elif variant == "numeric_message_id":
            d["message_id"] = self.rng.randrange(10**9)
        elif variant == "missing_identity":
            del d["anonymous_id"]
        elif variant == "null_identity":
            d["anonymous_id"] = None
            d["user_id"] = None
        elif variant == "empty_anonymous_id":
            d["anonymous_id"] = ""
        elif variant == "track_without_event":
            del d["event"]
        elif variant == "empty_event_name":
            d["event"] = ""
        elif variant == "timestamp_bool":
            d["timestamp"] = True
        elif variant == "missing_timestamp":
            del d["timestamp"]
        elif variant == "properties_string":
            d["properties"] = "x"
        elif variant == "traits_list":
            d["traits"] = ["vip"]
        elif variant == "type_screen":
            d["type"] = "screen"
            d.pop("event", None)
            d["name"] = "Deal Details"
        elif variant == "type_group":
            d["type"] = "group"
            d.pop("event", None)
            d["group_id"] = "org_1234"
        elif variant == "missing_type":
            del d["type"]
        elif variant == "context_string":
            d["context"] = "web"
        elif variant == "alias_without_previous_id":
            d["type"] = "alias"
            d["user_id"] = f"usr_{self.rng.randrange(100_000, 10_000_000)}"
        elif variant == "numeric_user_id":
            d["user_id"] = self.rng.randrange(1, 10**6)
        else:
            raise ValueError(variant)


# --------------------------------------------------------------------------------------------------
# truth


def _build_truth(
    cfg: SimConfig,
    sim: _Sim,
    pending: list[_Pending],
    stream: list[tuple[int, int, str, Any]],
    idx_late: set[int],
) -> tuple[list[SimRecord], Truth]:
    records: list[SimRecord] = []
    valid: list[TruthEvent] = []
    invalid: list[TruthInvalid] = []
    duplicates: list[TruthDuplicate] = []
    late: list[TruthLate] = []
    out_of_order: list[str] = []
    links: dict[str, str] = {}
    index_of: dict[int, int] = {}
    valid_pending: list[_Pending] = []
    for index, (recv, _seq, kind, ref) in enumerate(stream):
        if kind == "valid":
            p: _Pending = ref
            records.append(SimRecord(p.key, p.value, recv))
            d = p.payload
            user_key = resolve_user_key(d.get("user_id"), d.get("anonymous_id"), links)
            if p.protected:  # identify / alias
                link = identity_link(d)
                if link is not None:
                    links[link[0]] = link[1]
            index_of[_seq] = index
            valid.append(TruthEvent(index, d["message_id"], user_key, d["type"], d.get("event"),
                                    p.corrected_ms, recv, p.visitor.bot is not None))  # fmt: skip
            valid_pending.append(p)
            if _seq in idx_late:
                late.append(TruthLate(index, d["message_id"], recv - p.corrected_ms))
            elif p.mode == "ooo":
                out_of_order.append(d["message_id"])
        elif kind == "dup":
            orig = pending[ref]
            records.append(SimRecord(orig.key, orig.value, recv))
            duplicates.append(TruthDuplicate(index, index_of[ref], orig.payload["message_id"]))
        else:
            key, value, code, detail = ref
            records.append(SimRecord(key, value, recv))
            invalid.append(TruthInvalid(index, code, detail))

    gap_ms = cfg.session_gap_s * 1000
    max_ms = cfg.session_max_s * 1000
    sessions = expected_sessions(((e.user_key, e.timestamp_ms) for e in valid), gap_ms, max_ms)

    anon_ids = {p.payload.get("anonymous_id") for p in valid_pending} - {None}
    user_ids = {p.payload.get("user_id") for p in valid_pending} - {None}
    users = {
        "user_keys": len({e.user_key for e in valid}),
        "anonymous_ids": len(anon_ids),
        "identified_users": len(user_ids),
        "human_devices": sum(1 for v in sim.visitors if v.bot is None and v.anonymous_id in anon_ids),
        "bot_runs": sum(1 for v in sim.visitors if v.bot is not None),
        "skewed_clock_devices": sum(1 for v in sim.visitors if v.skew_ms and v.anonymous_id in anon_ids),
    }
    aggregates = _aggregates(cfg, valid, valid_pending, sessions)
    aggregates["traffic_sources"] = dict(sorted(sim.source_counts.items()))
    truth = Truth(
        config=cfg.to_dict(),
        records=len(records),
        valid=valid,
        duplicates=duplicates,
        invalid=invalid,
        late=late,
        out_of_order=out_of_order,
        users=users,
        sessions=sessions,
        aggregates=aggregates,
    )
    return records, truth


def expected_sessions(
    events: Iterable[tuple[str, int]], gap_ms: int, max_ms: int = _MS_DAY
) -> dict[str, list[TruthSession]]:
    """Group ``(user_key, timestamp_ms)`` pairs into sessions per user_key.

    A new session starts when the time since the previous event is >= ``gap_ms`` (Flink
    session-window semantics: windows ``[t, t + gap)`` merge only when they overlap) or when the time since
    the session's first event is >= ``max_ms``. Keys are returned sorted.
    """
    per_key: dict[str, list[int]] = defaultdict(list)
    for key, ts in events:
        per_key[key].append(ts)
    out: dict[str, list[TruthSession]] = {}
    for key in sorted(per_key):
        times = sorted(per_key[key])
        result: list[TruthSession] = []
        start = last = times[0]
        n = 0
        for ts in times:
            if n and (ts - last >= gap_ms or ts - start >= max_ms):
                result.append(TruthSession(start, last, n))
                start, n = ts, 0
            last = ts
            n += 1
        result.append(TruthSession(start, last, n))
        out[key] = result
    return out


def _aggregates(
    cfg: SimConfig,
    valid: list[TruthEvent],
    pending: list[_Pending],
    sessions: dict[str, list[TruthSession]],
) -> dict[str, Any]:
    by_type: Counter[str] = Counter()
    track: Counter[str] = Counter()
    per_day: Counter[str] = Counter()
    dau: dict[str, set[str]] = defaultdict(set)
    dau_h: dict[str, set[str]] = defaultdict(set)
    revenue: dict[str, float] = defaultdict(float)
    orders = 0
    bot_events = 0
    deal_views: dict[tuple[str, str], list[int]] = defaultdict(list)
    adds: dict[str, list[int]] = defaultdict(list)
    order_times: dict[str, list[int]] = defaultdict(list)
    day_cache: dict[int, str] = {}
    for e, p in zip(valid, pending, strict=True):
        by_type[e.type] += 1
        dn = e.timestamp_ms // _MS_DAY
        day = day_cache.get(dn)
        if day is None:
            day = day_cache[dn] = _day(e.timestamp_ms)
        per_day[day] += 1
        dau[day].add(e.user_key)
        if e.is_bot:
            bot_events += 1
        else:
            dau_h[day].add(e.user_key)
        if e.type == "track" and e.event is not None:
            track[e.event] += 1
            props = p.payload.get("properties") or {}
            if e.event == "Order Completed":
                orders += 1
                revenue[props["currency"]] += props["revenue"]
                order_times[e.user_key].append(e.timestamp_ms)
            elif e.event == "Product Viewed" and "deal_id" in props:
                deal_views[(e.user_key, props["deal_id"])].append(e.timestamp_ms)
            elif e.event == "Product Added":
                adds[e.user_key].append(e.timestamp_ms)

    # deal_promo rule: >= 4 Product Viewed of one deal by one user_key within 30 min, 24 h cooldown
    within, need, cooldown = 30 * 60_000, 4, _MS_DAY
    fires: list[list[Any]] = []
    for (user_key, deal_id), times in sorted(deal_views.items()):
        times.sort()
        next_allowed = -1
        for j in range(need - 1, len(times)):
            if times[j] - times[j - need + 1] <= within and times[j] >= next_allowed:
                fires.append([user_key, deal_id, times[j]])
                next_allowed = times[j] + cooldown
    fires.sort(key=lambda f: (f[2], f[0], f[1]))

    # cart_abandoned rule: Product Added with no Order Completed by the same user_key within 30 min after it
    abandoned = 0
    for user_key, times in adds.items():
        done = sorted(order_times.get(user_key, ()))
        for t in times:
            if not any(t <= o <= t + within for o in done):
                abandoned += 1

    sessions_per_day: Counter[str] = Counter()
    for items in sessions.values():
        for s in items:
            sessions_per_day[_day(s.start_ms)] += 1
    return {
        "events_by_type": dict(sorted(by_type.items())),
        "track_events": dict(sorted(track.items())),
        "page_views": by_type["page"],
        "orders": orders,
        "revenue": {k: round(v, 2) for k, v in sorted(revenue.items())},
        "bot_events": bot_events,
        "events_per_day": dict(sorted(per_day.items())),
        "daily_active_users": {k: len(v) for k, v in sorted(dau.items())},
        "daily_active_users_humans": {k: len(v) for k, v in sorted(dau_h.items())},
        "sessions_per_day": dict(sorted(sessions_per_day.items())),
        "deal_promo": {
            "event": "Product Viewed",
            "group_by": "properties.deal_id",
            "count_at_least": need,
            "within_ms": within,
            "cooldown_ms": cooldown,
            "fires": fires,
        },
        "cart_adds_without_order_30m": abandoned,
    }


#: Top-level paths of an enriched event that :func:`expected_trigger_fires` can fill from a raw record.
_RAW_RULE_PATHS = frozenset({"message_id", "type", "event", "user_key", "anonymous_id", "user_id",
                             "properties", "traits"})  # fmt: skip


def expected_trigger_fires(
    records: Sequence[SimRecord],
    truth: Truth,
    rules: Rules,
    *,
    watermark_delay_ms: int = 2000,
) -> list[ExpectedFire]:
    """The trigger fires a pipeline should make of this simulation under ``rules``.

    The reference evaluator :mod:`devstack.reference_rules` (written from ADR 002, independently of the
    reducer the job runs) decides over the valid unique events in the order they were produced (per
    user, the order a triggers job reads them), with the truth's ``user_key`` and corrected event time.
    The watermark before each event is the running maximum event time minus ``watermark_delay_ms``; at
    the end the run is drained (the end of the input is the end of event time). Only the decisions and
    the ``action_id`` values are meaningful (there is no ``fired_at``).

    This is the order-of-arrival semantics of ADR 002, not event-time order: a late event does not
    complete a window that the watermark has already closed. A job that reads its input in bigger
    out-of-order chunks than the produced order (a backlog replayed at thousands of simulated minutes
    per second) can decide a few borderline cases differently. Rules may only use paths a raw record
    has (``properties.*``, ``traits.*``, ``type``, ``event``, ids): enrichment fields are not simulated
    here, so other paths raise ``ValueError``.
    """
    _check_rule_paths(rules)
    events = [_trigger_event(records, item) for item in truth.valid]
    marks, newest = [], -(2**62)
    for event in events:
        newest = max(newest, event.ts_ms)
        marks.append(newest - watermark_delay_ms)
    return evaluate(events, marks, rules, "eager")


def _check_rule_paths(rules: Rules) -> None:
    for rule in rules:
        for path in _rule_paths(rule):
            if path[0] not in _RAW_RULE_PATHS:
                raise ValueError(f"rule {rule.id}: path {'.'.join(path)} is not available from raw records")


def _trigger_event(records: Sequence[SimRecord], item: TruthEvent) -> RefEvent:
    """The event a triggers job sees for ``item``: its raw fields, the truth's user_key and event time."""
    raw = orjson.loads(records[item.position].value)
    record = {k: raw.get(k) for k in _RAW_RULE_PATHS}
    record.update(user_key=item.user_key, event_time_ms=item.timestamp_ms)
    name, kind = record.get("event"), record.get("type")
    return RefEvent(
        message_id=item.message_id,
        name=name if isinstance(name, str) else None,
        type=kind if isinstance(kind, str) else None,
        user_key=item.user_key,
        ts_ms=item.timestamp_ms,
        record=record,
    )


class TriggerArrival(NamedTuple):
    """How the enriched events reached a triggers job, as observed after a run.

    ``partitions``: per partition of ``events.enriched`` (keyed by ``user_key``, so one user's events are
    in one partition, in the order the job reads them), the message ids in offset order. ``sent_at``:
    message id → wall-clock second its first copy was handed to the producer. ``lag_s``: the largest
    delay seen between producing an event and the triggers job deciding on it (``fired_at`` of the
    actions it completed) — how far the job's view of event time may trail what was produced.
    """

    partitions: Sequence[Sequence[str]]
    sent_at: Mapping[str, float]
    lag_s: float


class TriggerExpectation(NamedTuple):
    """What a triggers job must have decided, given how its input arrived.

    ``fires``: the decisions for every ``(rule_id, user_key)`` that is not order-sensitive.
    ``sensitive``: the pairs whose decisions depend on when the job's watermark passed a deadline or
    window end relative to the user's own events (within ``slack_s`` of wall time either way), or on
    when within its minute the clean-up of an expired window, cooldown or last visit ran; their
    outcome is legitimately either, so they are reported, not compared. ``slack_s``: the bound used.
    """

    fires: list[ExpectedFire]
    sensitive: frozenset[tuple[str, str]]
    slack_s: float


def expected_trigger_decisions(
    records: Sequence[SimRecord],
    truth: Truth,
    rules: Rules,
    arrival: TriggerArrival,
    *,
    watermark_delay_ms: int = 2000,
    emit_interval_s: float = 0.2,
) -> TriggerExpectation:
    """The trigger fires a pipeline must have made, given the observed ``arrival`` of its input.

    Decisions come from the reference evaluator (:mod:`devstack.reference_rules`, written from ADR 002
    independently of the reducer the job runs). Per-user order is exact: the reference sees each user's
    events in the partition order the job read them, so count and returning decisions have one right
    answer. Sequence deadlines and clean-up timers fire on the watermark, which depends on how the job
    interleaved its partitions and when it emitted watermarks; that is bracketed, per partition, between

    * **early**: the watermark as far as it can possibly be when a record is processed — the partition's
      own newest earlier event time minus ``watermark_delay_ms`` (the job's watermark is the minimum over
      its partitions, and a record is processed before any watermark that counts it), and
    * **late**: the least it can be — the minimum over partitions of the newest event time among records
      produced at least ``slack_s`` earlier (``slack_s = arrival.lag_s + emit_interval_s + 1``), i.e.
      what the job had certainly read and turned into a watermark by then.

    Users whose fires differ between the two, or between an eager and a lazy clean-up of expired
    pieces (see :mod:`devstack.reference_rules`), are ``sensitive``; for every other ``(rule, user)``
    all agree and so must the job. A drained run fires every pending timer at the end, as here.
    """
    _check_rule_paths(rules)
    slack_s = arrival.lag_s + emit_interval_s + 1.0
    by_id = {item.message_id: item for item in truth.valid}
    parts: list[list[tuple[float, int, RefEvent]]] = []  # per partition: (available at, event time, event)
    for ids in arrival.partitions:
        items: list[tuple[float, int, RefEvent]] = []
        available = -math.inf
        for mid in ids:
            item = by_id.get(mid)
            if item is None:  # not a valid unique event of this simulation: nothing to decide on
                continue
            available = max(available, arrival.sent_at.get(mid, available))
            items.append((available, item.timestamp_ms, _trigger_event(records, item)))
        if items:
            parts.append(items)
    # per partition: availability times and the running maximum event time, for the late bound
    avail = [[a for a, _, _ in items] for items in parts]
    newest: list[list[int]] = []
    for items in parts:
        run, acc = -(2**62), []
        for _, ts, _ in items:
            run = max(run, ts)
            acc.append(run)
        newest.append(acc)

    def late_watermark(at: float) -> int:
        low = 2**62
        for times, maxima in zip(avail, newest, strict=True):
            i = bisect_right(times, at)
            low = min(low, maxima[i - 1] if i else -(2**62))
        return low - watermark_delay_ms

    outcomes: list[dict[tuple[str, str], set[str]]] = []
    certain: list[ExpectedFire] = []
    cleanups: tuple[Cleanup, ...] = ("eager", "lazy")  # when within its minute the clean-up ran: either
    for bound in ("early", "late"):
        for cleanup in cleanups:
            decided: dict[tuple[str, str], set[str]] = defaultdict(set)
            for items, maxima in zip(parts, newest, strict=True):
                events = [e for _, _, e in items]
                marks = [-(2**62)] + [m - watermark_delay_ms for m in maxima[:-1]]
                if bound == "late":
                    marks = [
                        min(e, late_watermark(a - slack_s)) for (a, _, _), e in zip(items, marks, strict=True)
                    ]
                for f in evaluate(events, marks, rules, cleanup):
                    decided[(f.rule_id, f.user_key)].add(f.action_id)
                    if not outcomes:
                        certain.append(f)
            outcomes.append(decided)
    keys = set().union(*(o.keys() for o in outcomes))
    sensitive = frozenset(
        k for k in keys if any(o.get(k, set()) != outcomes[0].get(k, set()) for o in outcomes)
    )
    fires = [f for f in certain if (f.rule_id, f.user_key) not in sensitive]
    return TriggerExpectation(fires, sensitive, slack_s)


def _rule_paths(rule: Rule) -> list[tuple[str, ...]]:
    w = rule.when
    if isinstance(w, CountWhen):
        return [*w.group_by, *(p for p, _ in w.match.where)]
    if isinstance(w, SequenceWhen):
        return [p for m in (w.first, w.then_not) for p, _ in m.where]
    return [p for p, _ in w.match.where]
