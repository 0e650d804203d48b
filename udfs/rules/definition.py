"""Trigger rule definitions as data: parsing, validation and the destination allowlist.

One schema serves the YAML rules file (``rules: [...]``) and the compacted ``rules`` Kafka topic (one
JSON rule per record, keyed by rule id; a tombstone removes the rule). Three condition forms exist::

    when: {event: Product Viewed, group_by: [properties.deal_id], count_at_least: 4, within: 30m}
    when: {sequence: {first: Product Added, then_not: Order Completed, within: 30m}}
    when: {returning_after: 7d}

``where`` maps dotted paths, resolved from the root of the enriched event (``properties.deal_id``,
``utm_source``, ``country``), to the JSON scalar they must equal. Every rule names a webhook; its URL
host must pass an :class:`Allowlist` (default: loopback only) or the rule is refused at load time.
Webhook secrets are never part of a rule: ``secret_env`` names the environment variable the job reads,
and only a webhook secret variable (:func:`check_secret_env`): a rule cannot make dispatch sign with
``CLICKHOUSE_URL``, a password or a setting whose value anyone can guess.

Everything raises :class:`RuleError` with the rule id and the offending field, e.g.
``rule 'deal_promo': when.within: expected a duration like 30m, got 'abc'``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import orjson
import yaml

__all__ = [
    "ACTIVITY_EXCLUDED_TYPES",
    "LOOPBACK_ONLY",
    "Allowlist",
    "CountWhen",
    "EventMatcher",
    "ReturningWhen",
    "Rule",
    "RuleError",
    "Rules",
    "Scalar",
    "SequenceWhen",
    "SECRET_ENV_PREFIX",
    "WebhookAction",
    "When",
    "check_secret_env",
    "load_rules_file",
    "lookup_path",
    "parse_duration_ms",
    "parse_rule",
    "parse_rules_document",
    "rule_from_topic_value",
]

Scalar: TypeAlias = str | int | float | bool | None

#: Event ``type`` values that never count as user activity for ``returning_after`` without an ``event``.
ACTIVITY_EXCLUDED_TYPES = frozenset({"identify", "alias"})

_MISSING = object()
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
#: Every variable a webhook secret may be read from starts with this (the default one is exactly this).
SECRET_ENV_PREFIX = "CLICKPULSE_WEBHOOK_SECRET"  # noqa: S105 - a variable name, not a secret
_SECRET_ENV_NAME = re.compile(rf"{SECRET_ENV_PREFIX}(?:_[A-Z0-9]+)*")
_PATH_SEGMENT = re.compile(r"[^.\s]+")
_MAX_WEBHOOK_TIMEOUT_S = 120.0
_DEFAULT_REMEMBER_FOR_MS = 90 * _UNIT_MS["d"]


class RuleError(ValueError):
    """A rule (or rules document) is invalid. The message names the rule id and the field."""


class _FieldError(Exception):
    """Internal: a field-level problem, turned into :class:`RuleError` with the rule id attached."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


# --------------------------------------------------------------------------------------------------
# durations and paths


def parse_duration_ms(value: object) -> int:
    """Parse a duration such as ``30s``, ``30m``, ``24h``, ``7d``, ``2w``, ``500ms`` or ``1h30m``.

    Returns a positive number of milliseconds. Raises :class:`ValueError` for anything else (numbers
    without a unit are refused on purpose: ``within: 30`` is ambiguous).
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like 30m, got {value!r}")
    text = value.strip().lower().replace(" ", "")
    parts = list(_DURATION_PART.finditer(text))
    if not text or "".join(p.group(0) for p in parts) != text:
        raise ValueError(f"expected a duration like 30m, got {value!r}")
    total = sum(int(p.group(1)) * _UNIT_MS[p.group(2)] for p in parts)
    if total <= 0:
        raise ValueError(f"duration must be greater than zero, got {value!r}")
    return total


def lookup_path(record: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """Return the value at a dotted path (already split) in ``record``, or ``None`` when absent.

    Intermediate values that are JSON object strings (``properties`` stored as text) are decoded.
    """
    current: Any = record
    for segment in path:
        if isinstance(current, str) and current.startswith("{"):
            try:
                current = orjson.loads(current)
            except orjson.JSONDecodeError:
                return None
        if not isinstance(current, Mapping):
            return None
        current = current.get(segment, _MISSING)
        if current is _MISSING:
            return None
    return current


def _scalar_equal(actual: object, expected: Scalar) -> bool:
    # JSON semantics: true != 1, 1 == 1.0, "1" != 1.
    if isinstance(actual, bool) or isinstance(expected, bool):
        return isinstance(actual, bool) and isinstance(expected, bool) and actual is expected
    return bool(actual == expected)


# --------------------------------------------------------------------------------------------------
# secret variables


def check_secret_env(name: object, reserved: Iterable[str] = ()) -> str:
    """Return ``name`` when it may name a webhook secret variable, else raise :class:`ValueError` saying why.

    A secret variable is ``CLICKPULSE_WEBHOOK_SECRET`` or ``CLICKPULSE_WEBHOOK_SECRET_<SUFFIX>`` (upper
    case, digits and underscores, as :func:`connectors.settings.environment` normalises names), never
    one ending in ``_ENV`` (``CLICKPULSE_WEBHOOK_SECRET_ENV`` *names* a variable, its value is
    guessable) and never one of ``reserved`` (the declared settings variables, passed in by the caller:
    settings are configuration, not secrets). Nothing else can be read as an HMAC key, so neither a rule
    from the file or the ``rules`` topic nor a setting can make dispatch sign with ``CLICKHOUSE_URL``.
    """
    if not isinstance(name, str) or not _SECRET_ENV_NAME.fullmatch(name):
        raise ValueError(
            f"expected a webhook secret variable, {SECRET_ENV_PREFIX} or {SECRET_ENV_PREFIX}_<SUFFIX> "
            f"(upper case, digits, underscores), got {_show(name)}"
        )
    if name.endswith("_ENV"):
        raise ValueError(f"{name} names a variable (a setting ending in _ENV), it holds no secret")
    if name in set(reserved):
        raise ValueError(f"{name} is a settings variable, not a secret")
    return name


# --------------------------------------------------------------------------------------------------
# allowlist


@dataclass(frozen=True)
class Allowlist:
    """Webhook destinations a rule may name.

    ``hosts`` are exact host names (case-insensitive) or ``*.suffix`` patterns; ``networks`` match IP
    literals in the URL. Host names are matched by name only and never resolved (so a name is allowed
    only when listed, whatever it resolves to).
    """

    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        """Build an allowlist from entries like ``localhost``, ``*.example.com``, ``10.0.0.0/8``, ``::1``."""
        hosts: set[str] = set()
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            body = entry[2:] if entry.startswith("*.") else entry
            if not body or any(not _PATH_SEGMENT.fullmatch(p) for p in body.split(".")) or "/" in body:
                raise ValueError(f"not a host name, IP address or CIDR: {raw!r}")
            hosts.add(entry)
        return cls(hosts=frozenset(hosts), networks=tuple(networks))

    def allows_host(self, host: str) -> bool:
        """True when ``host`` (name or IP literal, without brackets) is allowed."""
        host = host.lower().rstrip(".")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host in self.hosts or any(
                pattern.startswith("*.") and host.endswith(pattern[1:]) for pattern in self.hosts
            )
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c in net for c in candidates for net in self.networks if c.version == net.version)

    def check_url(self, url: str) -> tuple[str, str, int]:
        """Validate a webhook URL; return its ``(scheme, host, port)`` or raise :class:`ValueError`."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError("URL has no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in the URL are not allowed (sign with secret_env instead)")
        if parts.fragment:
            raise ValueError("URL must not have a #fragment")
        if not self.allows_host(parts.hostname):
            raise ValueError(f"host {parts.hostname!r} is not in the destination allowlist")
        return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


#: The default allowlist: loopback only.
LOOPBACK_ONLY = Allowlist.parse(["localhost", "127.0.0.0/8", "::1"])


# --------------------------------------------------------------------------------------------------
# rule data


@dataclass(frozen=True)
class EventMatcher:
    """Matches events by name (``None`` = any activity event) and property equality filters."""

    event: str | None
    where: tuple[tuple[tuple[str, ...], Scalar], ...] = ()

    def matches(self, name: str | None, event_type: str | None, record: Mapping[str, Any]) -> bool:
        """True when the event called ``name`` of type ``event_type`` with fields ``record`` matches."""
        if self.event is None:
            if event_type in ACTIVITY_EXCLUDED_TYPES:
                return False
        elif name != self.event:
            return False
        return all(_scalar_equal(lookup_path(record, path), value) for path, value in self.where)

    def canonical(self) -> dict[str, Any]:
        """JSON-able canonical form (used for fingerprints)."""
        return {"event": self.event, "where": [[".".join(p), v] for p, v in self.where]}


@dataclass(frozen=True)
class CountWhen:
    """At least ``count_at_least`` matching events per group within a sliding ``within_ms`` window."""

    match: EventMatcher
    group_by: tuple[tuple[str, ...], ...]
    count_at_least: int
    within_ms: int

    def canonical(self) -> dict[str, Any]:
        """JSON-able canonical form (used for fingerprints)."""
        return {
            "form": "count",
            "match": self.match.canonical(),
            "group_by": [".".join(p) for p in self.group_by],
            "count_at_least": self.count_at_least,
            "within_ms": self.within_ms,
        }


@dataclass(frozen=True)
class SequenceWhen:
    """A ``first`` event not followed by a ``then_not`` event within ``within_ms``."""

    first: EventMatcher
    then_not: EventMatcher
    within_ms: int

    def canonical(self) -> dict[str, Any]:
        """JSON-able canonical form (used for fingerprints)."""
        return {
            "form": "sequence",
            "first": self.first.canonical(),
            "then_not": self.then_not.canonical(),
            "within_ms": self.within_ms,
        }


@dataclass(frozen=True)
class ReturningWhen:
    """A matching event after at least ``after_ms`` without one.

    The last-seen time is remembered for ``remember_for_ms``; a user absent longer than that is treated
    as new (no fire), which is what keeps per-user state bounded.
    """

    after_ms: int
    remember_for_ms: int
    match: EventMatcher

    def canonical(self) -> dict[str, Any]:
        """JSON-able canonical form (used for fingerprints)."""
        return {
            "form": "returning",
            "after_ms": self.after_ms,
            "remember_for_ms": self.remember_for_ms,
            "match": self.match.canonical(),
        }


When: TypeAlias = CountWhen | SequenceWhen | ReturningWhen


@dataclass(frozen=True)
class WebhookAction:
    """Where a fire is delivered. ``secret_env`` names the env var holding the HMAC secret."""

    url: str
    secret_env: str | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class Rule:
    """A validated trigger rule.

    ``fingerprint`` hashes the condition (``when``) only: when it changes, the user state kept for the
    rule is dropped; changing the webhook, cooldown or ``enabled`` keeps it.
    """

    id: str
    when: When
    action: WebhookAction
    enabled: bool = True
    cooldown_ms: int | None = None
    once: bool = False
    description: str | None = None
    fingerprint: str = field(default="", compare=False)

    def compiled(self) -> dict[str, Any]:
        """The rule as the JVM trigger operator reads it (``dev.clickpulse.operators.triggers``): the
        condition's canonical form plus ``id``, ``fingerprint``, ``enabled``, ``once``, ``cooldown_ms``
        and ``events`` (:meth:`event_names`, sorted, or ``None``). Webhook fields are left out: delivery
        is the dispatch loop's business, which reads the rules itself."""
        names = self.event_names()
        return {
            **self.when.canonical(),
            "id": self.id,
            "fingerprint": self.fingerprint,
            "enabled": self.enabled,
            "once": self.once,
            "cooldown_ms": self.cooldown_ms,
            "events": sorted(names) if names is not None else None,
        }

    def event_names(self) -> frozenset[str] | None:
        """Event names this rule looks at; ``None`` when any event can matter."""
        w = self.when
        if isinstance(w, CountWhen):
            return frozenset({w.match.event}) if w.match.event is not None else None
        if isinstance(w, SequenceWhen):
            names = {w.first.event, w.then_not.event}
            return None if None in names else frozenset(n for n in names if n is not None)
        return frozenset({w.match.event}) if w.match.event is not None else None


@dataclass(frozen=True)
class Rules:
    """The current rule set, by id. Immutable: updates return a new :class:`Rules`."""

    by_id: Mapping[str, Rule] = field(default_factory=dict)

    @classmethod
    def of(cls, rules: Iterable[Rule]) -> Rules:
        """Build from rules; duplicate ids raise :class:`RuleError`."""
        by_id: dict[str, Rule] = {}
        for rule in rules:
            if rule.id in by_id:
                raise RuleError(f"rule {rule.id!r}: id: duplicate rule id")
            by_id[rule.id] = rule
        return cls(by_id=by_id)

    def __iter__(self) -> Iterator[Rule]:
        """Iterate over every rule, enabled or not, in insertion order."""
        return iter(self.by_id.values())

    def __len__(self) -> int:
        """Count every rule, enabled or not."""
        return len(self.by_id)

    def get(self, rule_id: str) -> Rule | None:
        """The rule with this id, or ``None``."""
        return self.by_id.get(rule_id)

    def active(self) -> list[Rule]:
        """Enabled rules, in insertion order."""
        return [r for r in self.by_id.values() if r.enabled]

    def with_rule(self, rule: Rule) -> Rules:
        """A copy with ``rule`` added or replacing the rule with the same id."""
        return Rules(by_id={**self.by_id, rule.id: rule})

    def without(self, rule_id: str) -> Rules:
        """A copy without the rule ``rule_id`` (no error when absent)."""
        return Rules(by_id={k: v for k, v in self.by_id.items() if k != rule_id})

    def apply_topic_record(
        self, key: bytes | str, value: bytes | str | None, allowlist: Allowlist = LOOPBACK_ONLY
    ) -> Rules:
        """Apply one ``rules`` topic record (upsert, or removal for a tombstone)."""
        rule_id = key.decode() if isinstance(key, bytes) else key
        rule = rule_from_topic_value(key, value, allowlist)
        return self.without(rule_id) if rule is None else self.with_rule(rule)

    def relevant_events(self) -> frozenset[str] | None:
        """Event names any enabled rule can use, for a cheap pre-filter before Python.

        ``None`` means every event may matter (a ``returning_after`` rule without ``event``): do not
        filter by name then. An empty set means no rule is active.
        """
        names: set[str] = set()
        for rule in self.active():
            rule_names = rule.event_names()
            if rule_names is None:
                return None
            names |= rule_names
        return frozenset(names)


# --------------------------------------------------------------------------------------------------
# parsing


def _expect_mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _FieldError(path, f"expected a mapping, got {_show(value)}")
    for key in value:
        if not isinstance(key, str):
            raise _FieldError(path, f"keys must be strings, got {key!r}")
    return value


def _check_keys(
    obj: Mapping[str, Any], path: str, allowed: Iterable[str], required: Iterable[str] = ()
) -> None:
    allowed_set = set(allowed)
    for key in obj:
        if key not in allowed_set:
            prefix = f"{path}." if path else ""
            raise _FieldError(f"{prefix}{key}", f"unknown field (allowed: {', '.join(sorted(allowed_set))})")
    for key in required:
        if key not in obj:
            prefix = f"{path}." if path else ""
            raise _FieldError(f"{prefix}{key}", "required")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _duration(obj: Mapping[str, Any], key: str, path: str) -> int:
    try:
        return parse_duration_ms(obj[key])
    except ValueError as exc:
        raise _FieldError(f"{path}.{key}" if path else key, str(exc)) from None


def _nonempty_str(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _FieldError(path, f"expected a non-empty string, got {_show(value)}")
    return value


def _parse_path(value: object, path: str) -> tuple[str, ...]:
    text = _nonempty_str(value, path)
    segments = tuple(text.split("."))
    if any(not _PATH_SEGMENT.fullmatch(s) for s in segments):
        raise _FieldError(path, f"expected a dotted path like properties.deal_id, got {_show(value)}")
    return segments


def _parse_where(value: object, path: str) -> tuple[tuple[tuple[str, ...], Scalar], ...]:
    if value is None:
        return ()
    where = _expect_mapping(value, path)
    out: list[tuple[tuple[str, ...], Scalar]] = []
    for key, expected in where.items():
        key_path = f"{path}.{key}"
        segments = _parse_path(key, key_path)
        if expected is not None and not isinstance(expected, str | int | float | bool):
            raise _FieldError(key_path, f"expected a string, number, boolean or null, got {_show(expected)}")
        out.append((segments, expected))
    return tuple(sorted(out, key=lambda kv: kv[0]))


def _parse_matcher(value: object, path: str) -> EventMatcher:
    if isinstance(value, str):
        return EventMatcher(event=_nonempty_str(value, path))
    obj = _expect_mapping(value, path)
    _check_keys(obj, path, ("event", "where"), required=("event",))
    return EventMatcher(
        event=_nonempty_str(obj["event"], f"{path}.event"),
        where=_parse_where(obj.get("where"), f"{path}.where"),
    )


def _parse_when(value: object) -> When:
    when = _expect_mapping(value, "when")
    if "sequence" in when:
        _check_keys(when, "when", ("sequence",))
        seq = _expect_mapping(when["sequence"], "when.sequence")
        _check_keys(
            seq, "when.sequence", ("first", "then_not", "within"), required=("first", "then_not", "within")
        )
        first = _parse_matcher(seq["first"], "when.sequence.first")
        then_not = _parse_matcher(seq["then_not"], "when.sequence.then_not")
        if first == then_not:
            raise _FieldError("when.sequence.then_not", "must differ from first")
        return SequenceWhen(
            first=first, then_not=then_not, within_ms=_duration(seq, "within", "when.sequence")
        )
    if "returning_after" in when:
        _check_keys(when, "when", ("returning_after", "remember_for", "event", "where"))
        after_ms = _duration(when, "returning_after", "when")
        remember_ms = (
            _duration(when, "remember_for", "when")
            if "remember_for" in when
            else max(_DEFAULT_REMEMBER_FOR_MS, 2 * after_ms)
        )
        if remember_ms <= after_ms:
            raise _FieldError("when.remember_for", "must be longer than returning_after")
        event = _nonempty_str(when["event"], "when.event") if "event" in when else None
        match = EventMatcher(event=event, where=_parse_where(when.get("where"), "when.where"))
        return ReturningWhen(after_ms=after_ms, remember_for_ms=remember_ms, match=match)
    _check_keys(
        when,
        "when",
        ("event", "where", "group_by", "count_at_least", "within"),
        required=("event",),
    )
    match = EventMatcher(
        event=_nonempty_str(when["event"], "when.event"), where=_parse_where(when.get("where"), "when.where")
    )
    raw_group = when.get("group_by") or []
    if isinstance(raw_group, str):
        raw_group = [raw_group]
    if not isinstance(raw_group, list):
        raise _FieldError("when.group_by", f"expected a list of dotted paths, got {_show(raw_group)}")
    group_by = tuple(_parse_path(p, f"when.group_by[{i}]") for i, p in enumerate(raw_group))
    if len(set(group_by)) != len(group_by):
        raise _FieldError("when.group_by", "duplicate path")
    count = when.get("count_at_least", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10_000:
        raise _FieldError("when.count_at_least", f"expected an integer from 1 to 10000, got {_show(count)}")
    if "within" in when:
        within_ms = _duration(when, "within", "when")
    elif count == 1:
        within_ms = 1
    else:
        raise _FieldError("when.within", "required when count_at_least > 1")
    return CountWhen(match=match, group_by=group_by, count_at_least=count, within_ms=within_ms)


def _parse_action(value: object, allowlist: Allowlist) -> WebhookAction:
    action = _expect_mapping(value, "action")
    _check_keys(action, "action", ("webhook",), required=("webhook",))
    hook = _expect_mapping(action["webhook"], "action.webhook")
    _check_keys(hook, "action.webhook", ("url", "secret_env", "timeout"), required=("url",))
    url = _nonempty_str(hook["url"], "action.webhook.url").strip()
    try:
        allowlist.check_url(url)
    except ValueError as exc:
        raise _FieldError("action.webhook.url", str(exc)) from None
    secret_env = hook.get("secret_env")
    if secret_env is not None:
        try:
            secret_env = check_secret_env(secret_env)
        except ValueError as exc:
            raise _FieldError("action.webhook.secret_env", str(exc)) from None
    timeout_s: float | None = None
    if "timeout" in hook:
        raw = hook["timeout"]
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            timeout_s = float(raw)
        else:
            timeout_s = _duration(hook, "timeout", "action.webhook") / 1000.0
        if not 0 < timeout_s <= _MAX_WEBHOOK_TIMEOUT_S:
            raise _FieldError("action.webhook.timeout", f"must be between 0 and {_MAX_WEBHOOK_TIMEOUT_S:g}s")
    return WebhookAction(url=url, secret_env=secret_env, timeout_s=timeout_s)


def _fingerprint(when: When) -> str:
    return hashlib.sha256(orjson.dumps(when.canonical(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _rule_label(obj: object, fallback: str) -> str:
    if isinstance(obj, Mapping):
        rid = obj.get("id")
        if isinstance(rid, str) and rid:
            return f"rule {rid!r}"
    return fallback


def parse_rule(obj: object, allowlist: Allowlist = LOOPBACK_ONLY, *, label: str = "rule") -> Rule:
    """Validate one rule definition (a mapping as in the YAML file) into a :class:`Rule`.

    ``label`` names the rule in errors when it has no usable id (e.g. ``rule #3``).
    """
    try:
        rule = _expect_mapping(obj, "")
        _check_keys(
            rule,
            "",
            ("id", "description", "enabled", "when", "cooldown", "once", "action"),
            required=("id", "when", "action"),
        )
        rid = rule["id"]
        if not isinstance(rid, str) or not _RULE_ID.fullmatch(rid):
            raise _FieldError("id", f"expected letters, digits and _ . : - (max 128), got {_show(rid)}")
        enabled = rule.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _FieldError("enabled", f"expected true or false, got {_show(enabled)}")
        once = rule.get("once", False)
        if not isinstance(once, bool):
            raise _FieldError("once", f"expected true or false, got {_show(once)}")
        cooldown_ms = _duration(rule, "cooldown", "") if rule.get("cooldown") is not None else None
        if once and cooldown_ms is not None:
            raise _FieldError("cooldown", "cooldown and once: true are mutually exclusive")
        description = rule.get("description")
        if description is not None and not isinstance(description, str):
            raise _FieldError("description", f"expected a string, got {_show(description)}")
        when = _parse_when(rule["when"])
        action = _parse_action(rule["action"], allowlist)
    except _FieldError as exc:
        where = _rule_label(obj, label)
        raise RuleError(f"{where}: {exc.path or '(rule)'}: {exc.message}") from None
    return Rule(
        id=rid,
        when=when,
        action=action,
        enabled=enabled,
        cooldown_ms=cooldown_ms,
        once=once,
        description=description,
        fingerprint=_fingerprint(when),
    )


def parse_rules_document(doc: object, allowlist: Allowlist = LOOPBACK_ONLY) -> list[Rule]:
    """Validate a whole rules document ``{"rules": [...]}`` (``None`` = empty file = no rules)."""
    if doc is None:
        return []
    if not isinstance(doc, Mapping) or set(doc) - {"rules"}:
        raise RuleError("rules file: expected a mapping with a single key 'rules'")
    items = doc.get("rules") or []
    if not isinstance(items, list):
        raise RuleError("rules file: rules: expected a list of rules")
    rules = [parse_rule(item, allowlist, label=f"rule #{i}") for i, item in enumerate(items)]
    Rules.of(rules)  # duplicate check
    return rules


def load_rules_file(path: str | Path, allowlist: Allowlist = LOOPBACK_ONLY) -> list[Rule]:
    """Load and validate a YAML (or JSON) rules file with a top-level ``rules:`` list."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"rules file {Path(path).name}: not valid YAML: {exc}") from None
    return parse_rules_document(doc, allowlist)


def rule_from_topic_value(
    key: bytes | str, value: bytes | str | None, allowlist: Allowlist = LOOPBACK_ONLY
) -> Rule | None:
    """Decode one record of the compacted ``rules`` topic.

    ``key`` is the rule id; ``value`` is one rule as JSON (``id`` may be omitted, and must equal the
    key when present). A tombstone (``None``) returns ``None``: the caller removes the rule.
    """
    rule_id = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else key
    if value is None:
        return None
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise RuleError(f"rule {rule_id!r}: (value): not valid JSON: {exc}") from None
    if isinstance(obj, dict):
        if "id" not in obj:
            obj = {"id": rule_id, **obj}
        elif obj["id"] != rule_id:
            raise RuleError(f"rule {rule_id!r}: id: does not match the record key (got {_show(obj['id'])})")
    return parse_rule(obj, allowlist, label=f"rule {rule_id!r}")
