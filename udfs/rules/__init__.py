"""Trigger rules: what a rule is and how it is evaluated. Pure logic: no Flink, Kafka or HTTP here.

Import from this package (``from udfs.rules import Rules, step``); the modules say what lives where:

- :mod:`udfs.rules.definition`: the rule schema as data. Parsing and validation of the YAML rules
  file and of ``rules`` topic values (:func:`parse_rule`, :func:`load_rules_file`,
  :func:`rule_from_topic_value`), the condition forms (:class:`CountWhen`, :class:`SequenceWhen`,
  :class:`ReturningWhen`), :class:`Rules`, the destination :class:`Allowlist`, which variables may
  hold a webhook secret (:func:`check_secret_env`) and :class:`RuleError`.
- :mod:`udfs.rules.evaluate`: rule evaluation as a pure per-user reducer, the specification any other
  implementation must match: :func:`step` / :func:`on_timer` over :class:`UserState`, the
  :class:`Event` it reads, the :class:`Fire` it emits (``action_id`` from :func:`action_id_for`) and
  the keyed-state encoding :func:`dump_state` / :func:`load_state`.
- :mod:`udfs.rules.book`: the rule book around them. The rules in force (:func:`effective_rules`:
  the ``--rules`` file overlaid by ``rules`` topic records, :class:`RuleRecord`, "newest offset wins"
  by :func:`newer`, their broadcast-state encoding), the event names the rules need
  (:func:`resolve_event_filter`) and where a rule's actions go (:func:`destination_for`: URL, timeout
  and HMAC secret, read from an environment mapping passed in).

The I/O around them lives elsewhere: ``connectors.actions`` (reading the ``rules`` topic, the dispatch
loop), ``connectors.webhook`` (signing and HTTP delivery), ``jobs.triggers`` (the Flink operator).
"""

from __future__ import annotations

from udfs.rules.book import (
    DEFAULT_SECRET_ENV,
    Destination,
    RuleRecord,
    compile_rule_record,
    decode_rule_record,
    destination_for,
    effective_rules,
    encode_rule_record,
    newer,
    resolve_event_filter,
)
from udfs.rules.definition import (
    ACTIVITY_EXCLUDED_TYPES,
    LOOPBACK_ONLY,
    SECRET_ENV_PREFIX,
    Allowlist,
    CountWhen,
    EventMatcher,
    ReturningWhen,
    Rule,
    RuleError,
    Rules,
    Scalar,
    SequenceWhen,
    WebhookAction,
    When,
    check_secret_env,
    load_rules_file,
    lookup_path,
    parse_duration_ms,
    parse_rule,
    parse_rules_document,
    rule_from_topic_value,
)
from udfs.rules.evaluate import (
    CLEANUP_GRANULARITY_MS,
    MAX_GROUPS_PER_RULE,
    CountState,
    Event,
    EventError,
    Fire,
    GroupState,
    ReturningState,
    RuleState,
    SequenceState,
    Timer,
    UserState,
    action_id_for,
    dump_state,
    load_state,
    on_timer,
    step,
)

__all__ = [
    # definition
    "ACTIVITY_EXCLUDED_TYPES",
    "LOOPBACK_ONLY",
    "Allowlist",
    "CountWhen",
    "EventMatcher",
    "ReturningWhen",
    "Rule",
    "RuleError",
    "SECRET_ENV_PREFIX",
    "Rules",
    "Scalar",
    "SequenceWhen",
    "WebhookAction",
    "When",
    "check_secret_env",
    "load_rules_file",
    "lookup_path",
    "parse_duration_ms",
    "parse_rule",
    "parse_rules_document",
    "rule_from_topic_value",
    # evaluate
    "CLEANUP_GRANULARITY_MS",
    "MAX_GROUPS_PER_RULE",
    "CountState",
    "Event",
    "EventError",
    "Fire",
    "GroupState",
    "ReturningState",
    "RuleState",
    "SequenceState",
    "Timer",
    "UserState",
    "action_id_for",
    "dump_state",
    "load_state",
    "on_timer",
    "step",
    # book
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
