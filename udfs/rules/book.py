"""The rule book: which rules are in force, which events they need, where their actions go.

Rule records. The ``rules`` topic is compacted and keyed by rule id, so per id only the record with the
highest offset counts (a tombstone removes the rule). :class:`RuleRecord` keeps that offset, and
:func:`effective_rules` overlays the records on the rules of the ``--rules`` file. Because "newest
offset wins" (:func:`newer`), records can be applied in any order and more than once: the triggers job
starts from a snapshot of the topic (``connectors.actions.read_rule_records``) and then replays the
topic through Flink's broadcast state (:func:`encode_rule_record` / :func:`decode_rule_record`) without
ever going back to an older version of a rule.

Event filter. :func:`resolve_event_filter` turns the job's ``CLICKPULSE_TRIGGERS_EVENT_FILTER`` setting
into the event names the JVM pre-filter keeps (or ``None`` for no filter).

Destinations. :func:`destination_for` resolves a rule's webhook into a :class:`Destination`: its URL,
timeout and HMAC secret, read from an environment mapping passed in (never from ``os.environ`` here),
and only from a webhook secret variable (:func:`udfs.rules.definition.check_secret_env`, checked again
here whatever built the rule).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

from udfs.rules.definition import (
    LOOPBACK_ONLY,
    SECRET_ENV_PREFIX,
    Allowlist,
    Rule,
    RuleError,
    Rules,
    check_secret_env,
    rule_from_topic_value,
)

__all__ = [
    "DEFAULT_SECRET_ENV",
    "Destination",
    "RuleRecord",
    "compile_rule_record",
    "decode_rule_record",
    "destination_for",
    "effective_rules",
    "encode_rule_record",
    "newer",
    "resolve_event_filter",
]

#: Environment variable holding the HMAC secret for rules that do not name ``secret_env``.
DEFAULT_SECRET_ENV = SECRET_ENV_PREFIX


# --------------------------------------------------------------------------------------------------
# rule records


@dataclass(frozen=True)
class RuleRecord:
    """One ``rules`` topic record: its partition, offset and value (``None`` = tombstone)."""

    partition: int
    offset: int
    value: bytes | None


def newer(candidate: RuleRecord, current: RuleRecord | None) -> bool:
    """True when ``candidate`` supersedes ``current`` (same rule id): a higher offset in the same partition.

    A record from another partition (the topic was repartitioned, so the id moved) always supersedes.
    """
    if current is None:
        return True
    if candidate.partition != current.partition:
        return True
    return candidate.offset > current.offset


def encode_rule_record(record: RuleRecord) -> str:
    """Compact JSON text for Flink broadcast state: ``[partition, offset, value text or null]``."""
    text = record.value.decode("utf-8", errors="replace") if record.value is not None else None
    return orjson.dumps([record.partition, record.offset, text]).decode()


def decode_rule_record(data: str | bytes) -> RuleRecord:
    """Inverse of :func:`encode_rule_record`."""
    partition, offset, text = orjson.loads(data)
    return RuleRecord(int(partition), int(offset), text.encode("utf-8") if text is not None else None)


def compile_rule_record(rule_id: str, record: RuleRecord, allowlist: Allowlist = LOOPBACK_ONLY) -> str:
    """A ``rules`` topic record, validated here, as the JVM trigger operator reads it.

    Compact JSON ``[partition, offset, rule, error]``: ``rule`` is :meth:`Rule.compiled` (``null`` for a
    tombstone or an invalid record) and ``error`` the :class:`RuleError` text of an invalid record. The
    JVM operator applies these exactly as :func:`effective_rules` applies the raw records ("newest offset
    wins", an invalid record leaves no rule with that id), so rule validation has one implementation.
    """
    try:
        rule = rule_from_topic_value(rule_id, record.value, allowlist)
    except RuleError as exc:
        return orjson.dumps([record.partition, record.offset, None, str(exc)]).decode()
    compiled = rule.compiled() if rule is not None else None
    return orjson.dumps([record.partition, record.offset, compiled, None]).decode()


def effective_rules(
    file_rules: Iterable[Rule], records: Mapping[str, RuleRecord], allowlist: Allowlist = LOOPBACK_ONLY
) -> tuple[Rules, dict[str, str]]:
    """The rules in force: the file's rules overlaid with the topic's records, by rule id.

    A topic record replaces the file's rule with the same id; a tombstone removes it. An invalid record
    leaves **no** rule with that id (the error is returned, by rule id): firing an outdated definition
    after its owner tried to change it would be worse than not firing.
    """
    by_id: dict[str, Rule] = {rule.id: rule for rule in file_rules}
    errors: dict[str, str] = {}
    for rule_id, record in records.items():
        try:
            rule = rule_from_topic_value(rule_id, record.value, allowlist)
        except RuleError as exc:
            errors[rule_id] = str(exc)
            by_id.pop(rule_id, None)
            continue
        if rule is None:
            by_id.pop(rule_id, None)
        else:
            by_id[rule_id] = rule
    return Rules(by_id=by_id), errors


# --------------------------------------------------------------------------------------------------
# event filter


def resolve_event_filter(setting: str, rules: Rules) -> frozenset[str] | None:
    """``none`` -> no filter; ``auto`` -> the events today's rules use; else the comma-separated names."""
    text = setting.strip()
    if text.lower() in ("", "none"):
        return None
    if text.lower() == "auto":
        names = rules.relevant_events()
        return names if names else None  # no rule yet (or one needing every event): no filter
    return frozenset(n.strip() for n in text.split(",") if n.strip())


# --------------------------------------------------------------------------------------------------
# destinations


@dataclass(frozen=True)
class Destination:
    """Where to POST one rule's actions. The secret never appears in ``repr``."""

    url: str
    secret: bytes = field(repr=False)
    timeout_s: float = 5.0
    rule_id: str = ""

    @property
    def key(self) -> str:
        """The isolation key ``scheme://host:port`` (``invalid`` when the URL does not parse)."""
        try:
            parts = urlsplit(self.url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return "invalid"
        host = parts.hostname or ""
        return f"{parts.scheme}://[{host}]:{port}" if ":" in host else f"{parts.scheme}://{host}:{port}"


def destination_for(
    rule: Rule,
    environ: Mapping[str, str],
    *,
    default_secret_env: str = DEFAULT_SECRET_ENV,
    default_timeout_s: float = 5.0,
    reserved_env: Iterable[str] = (),
) -> Destination:
    """Resolve a rule's webhook into a :class:`Destination`, reading its secret from ``environ``.

    Uses ``action.webhook.secret_env`` or, when the rule names none, ``default_secret_env``. Raises
    :class:`RuleError` (naming the variable, never its value) when that name may not hold a webhook
    secret (:func:`udfs.rules.definition.check_secret_env`; ``reserved_env`` are the declared settings
    variables) or the secret is missing or empty: unsigned webhooks are not sent, and nothing but a
    webhook secret is used as the HMAC key.
    """
    named = bool(rule.action.secret_env)
    env_name = rule.action.secret_env or default_secret_env
    try:
        check_secret_env(env_name, reserved_env)
    except ValueError as exc:
        field_name = "action.webhook.secret_env" if named else "default_secret_env"
        raise RuleError(f"rule {rule.id!r}: {field_name}: {exc}") from None
    secret = environ.get(env_name, "")
    if not secret:
        raise RuleError(
            f"rule {rule.id!r}: action.webhook.secret_env: environment variable {env_name} is not set"
        )
    return Destination(
        url=rule.action.url,
        secret=secret.encode("utf-8"),
        timeout_s=rule.action.timeout_s or default_timeout_s,
        rule_id=rule.id,
    )
