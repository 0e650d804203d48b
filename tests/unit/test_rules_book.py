"""The rule book: newest offset wins, the file overlaid by the topic, event filter, destinations."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from udfs.rules import (
    DEFAULT_SECRET_ENV,
    Allowlist,
    CountWhen,
    Destination,
    Rule,
    RuleError,
    RuleRecord,
    Rules,
    compile_rule_record,
    destination_for,
    effective_rules,
    newer,
    parse_rule,
    resolve_event_filter,
    rule_from_topic_value,
)

pytestmark = pytest.mark.unit

HOOK = {"webhook": {"url": "http://127.0.0.1:8099/hooks/x"}}
ELSEWHERE = {"webhook": {"url": "https://hooks.example.com/x"}}


def rule(rid: str, when: dict[str, Any], **extra: Any) -> Rule:
    return parse_rule({"id": rid, "when": when, "action": HOOK, **extra})


def value(when: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"when": when, "action": HOOK} | extra)


def test_newer_is_a_higher_offset_in_the_same_partition_or_another_partition() -> None:
    current = RuleRecord(1, 10, b"{}")
    assert newer(current, None)
    assert newer(RuleRecord(1, 11, None), current)
    assert not newer(RuleRecord(1, 9, b"{}"), current)
    assert not newer(RuleRecord(1, 10, b"{}"), current)
    assert newer(RuleRecord(0, 3, b"{}"), current)  # the id moved: the topic was repartitioned


def test_topic_records_overlay_the_file_by_rule_id() -> None:
    file_rules = [
        rule("deal", {"event": "Product Viewed", "count_at_least": 2, "within": "30m"}),
        rule("gone", {"returning_after": "7d"}),
        rule("kept", {"event": "Order Completed"}),
    ]
    records = {
        "deal": RuleRecord(0, 5, value({"event": "Product Viewed", "count_at_least": 4, "within": "30m"})),
        "gone": RuleRecord(1, 6, None),
        "new": RuleRecord(2, 7, value({"returning_after": "1d"})),
    }
    rules, errors = effective_rules(file_rules, records)
    assert errors == {}
    assert sorted(r.id for r in rules) == ["deal", "kept", "new"]
    deal = rules.get("deal")
    assert deal is not None and isinstance(deal.when, CountWhen) and deal.when.count_at_least == 4
    assert effective_rules(file_rules, {}) == (Rules.of(file_rules), {})


def test_an_invalid_record_removes_the_rule_and_reports_it() -> None:
    file_rules = [rule("deal", {"event": "Product Viewed"})]
    records = {
        "deal": RuleRecord(0, 5, value({"event": "Product Viewed", "count_at_least": 0})),
        "elsewhere": RuleRecord(0, 6, value({"returning_after": "7d"}, action=ELSEWHERE)),
        "broken": RuleRecord(0, 7, b"{not json"),
    }
    rules, errors = effective_rules(file_rules, records)
    assert len(rules) == 0
    assert sorted(errors) == ["broken", "deal", "elsewhere"]
    assert errors["deal"].startswith("rule 'deal': when.count_at_least:")
    assert "allowlist" in errors["elsewhere"]
    allowed, errors = effective_rules(file_rules, records, Allowlist.parse(["hooks.example.com"]))
    assert "elsewhere" in [r.id for r in allowed] and "elsewhere" not in errors


def test_newest_offset_wins_whatever_the_order_and_repetition_of_records() -> None:
    versions = [
        RuleRecord(0, 1, value({"event": "A"})),
        RuleRecord(0, 2, None),
        RuleRecord(0, 3, value({"event": "B"})),
    ]
    outcomes = set()
    for order in itertools.permutations([*versions, versions[0], versions[1]]):
        kept: dict[str, RuleRecord] = {}
        for rec in order:
            if newer(rec, kept.get("r")):
                kept["r"] = rec
        rules, _ = effective_rules([], kept)
        r = rules.get("r")
        outcomes.add(r.when.match.event if r is not None and isinstance(r.when, CountWhen) else None)
    assert outcomes == {"B"}


def test_resolve_event_filter() -> None:
    counting = rule("deal", {"event": "Product Viewed"})
    sequence = rule(
        "cart", {"sequence": {"first": "Product Added", "then_not": "Order Completed", "within": "30m"}}
    )
    anything = rule("back", {"returning_after": "7d"})
    rules = Rules.of([counting, sequence])
    assert resolve_event_filter("none", rules) is None
    assert resolve_event_filter("  ", rules) is None
    assert resolve_event_filter("auto", rules) == {"Product Viewed", "Product Added", "Order Completed"}
    assert resolve_event_filter("AUTO", Rules()) is None  # no rule yet: no filter
    assert resolve_event_filter("auto", rules.with_rule(anything)) is None  # a rule needs every event
    assert resolve_event_filter(" Product Viewed, Signed Up ,", rules) == {"Product Viewed", "Signed Up"}


def test_destination_reads_the_secret_the_rule_names_from_the_mapping_given() -> None:
    named = parse_rule(
        {
            "id": "r",
            "when": {"returning_after": "7d"},
            "action": {"webhook": {"url": "http://[::1]/h", "secret_env": "CLICKPULSE_WEBHOOK_SECRET_R"}},
        }
    )
    environ = {"CLICKPULSE_WEBHOOK_SECRET_R": "s3cret", DEFAULT_SECRET_ENV: "default"}
    dest = destination_for(named, environ, default_timeout_s=2.5)
    assert dest == Destination(url="http://[::1]/h", secret=b"s3cret", timeout_s=2.5, rule_id="r")
    assert "s3cret" not in repr(dest)
    assert dest.key == "http://[::1]:80"
    plain = rule("p", {"returning_after": "7d"})
    assert destination_for(plain, environ).secret == b"default"
    other = "CLICKPULSE_WEBHOOK_SECRET_OTHER"
    assert destination_for(plain, {other: "x"}, default_secret_env=other).secret == b"x"
    with pytest.raises(RuleError, match="environment variable CLICKPULSE_WEBHOOK_SECRET_R is not set") as err:
        destination_for(named, {DEFAULT_SECRET_ENV: "default", "CLICKPULSE_WEBHOOK_SECRET_R": ""})
    assert "default" not in str(err.value)


def test_destination_key_isolates_by_scheme_host_and_port() -> None:
    assert Destination("https://hooks.example.com/a", b"s").key == "https://hooks.example.com:443"
    assert Destination("http://127.0.0.1:8099/b", b"s").key == "http://127.0.0.1:8099"
    assert Destination("http://127.0.0.1:notaport/", b"s").key == "invalid"


def test_compiled_record_carries_the_validated_rule_or_the_error_of_the_record() -> None:
    value = orjson.dumps(
        {"when": {"event": "Product Viewed", "where": {"properties.x": 1.5}}, "action": HOOK}
    )
    partition, offset, rule, error = orjson.loads(compile_rule_record("a", RuleRecord(2, 7, value)))
    assert (partition, offset, error) == (2, 7, None)
    parsed = rule_from_topic_value("a", value)
    assert parsed is not None
    assert rule == parsed.compiled()
    assert rule["fingerprint"] == parsed.fingerprint
    assert rule["match"] == {"event": "Product Viewed", "where": [["properties.x", 1.5]]}
    assert rule["events"] == ["Product Viewed"]

    assert orjson.loads(compile_rule_record("a", RuleRecord(2, 8, None))) == [2, 8, None, None]
    bad = orjson.loads(compile_rule_record("a", RuleRecord(2, 9, b'{"when": {}}')))
    assert bad[:3] == [2, 9, None]
    assert bad[3].startswith("rule 'a': ")
    # the allowlist is applied: a destination outside it makes an invalid record, as in effective_rules
    outside = orjson.dumps({"when": {"event": "X"}, "action": {"webhook": {"url": "http://example.org/h"}}})
    assert "allowlist" in orjson.loads(compile_rule_record("a", RuleRecord(0, 1, outside)))[3]


def test_compiled_rule_has_what_the_jvm_operator_reads_for_every_form() -> None:
    forms = {
        "count": {"event": "V", "group_by": ["properties.deal_id"], "count_at_least": 3, "within": "10m"},
        "sequence": {
            "sequence": {"first": "A", "then_not": {"event": "B", "where": {"k": True}}, "within": "1m"}
        },
        "returning": {"returning_after": "1d"},
    }
    for form, when in forms.items():
        rule = rule_from_topic_value("r", orjson.dumps({"when": when, "action": HOOK, "cooldown": "5m"}))
        assert rule is not None
        c = rule.compiled()
        assert c["form"] == form
        assert (c["id"], c["enabled"], c["once"], c["cooldown_ms"]) == ("r", True, False, 300_000)
        names = rule.event_names()
        assert c["events"] == (sorted(names) if names is not None else None)
