"""Rule parsing, validation errors, the destination allowlist and the rules topic format."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.support import DEAL_PROMO_WHEN
from udfs.rules import (
    LOOPBACK_ONLY,
    Allowlist,
    CountWhen,
    ReturningWhen,
    RuleError,
    Rules,
    SequenceWhen,
    load_rules_file,
    parse_duration_ms,
    parse_rule,
    rule_from_topic_value,
)

pytestmark = pytest.mark.unit

HOOK = {"webhook": {"url": "http://127.0.0.1:8099/hooks/x", "secret_env": "CLICKPULSE_WEBHOOK_SECRET"}}
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "rules.example.yaml"


def deal_rule(**overrides: object) -> dict[str, object]:
    rule: dict[str, object] = {
        "id": "deal_promo",
        "when": dict(DEAL_PROMO_WHEN),
        "cooldown": "24h",
        "action": HOOK,
    }
    rule.update(overrides)
    return rule


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("30s", 30_000),
        ("30m", 1_800_000),
        ("24h", 86_400_000),
        ("7d", 604_800_000),
        ("1h30m", 5_400_000),
        ("500ms", 500),
        ("2w", 1_209_600_000),
    ],
)
def test_durations(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("bad", ["abc", "30", 30, "0m", "", "m30", "30 minutes", None, "1.5h"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration_ms(bad)


def test_example_file_loads_every_form() -> None:
    rules = load_rules_file(EXAMPLE)
    by_id = {r.id: r for r in rules}
    deal = by_id["deal_promo"]
    assert isinstance(deal.when, CountWhen)
    assert deal.when.group_by == (("properties", "deal_id"),)
    assert deal.when.count_at_least == 4 and deal.when.within_ms == 30 * 60_000
    assert deal.cooldown_ms == 24 * 3_600_000 and not deal.once and deal.enabled
    assert deal.action.secret_env == "CLICKPULSE_WEBHOOK_SECRET"
    assert isinstance(by_id["cart_abandoned"].when, SequenceWhen)
    assert isinstance(by_id["returning_visitor"].when, ReturningWhen)
    assert by_id["returning_visitor"].when.after_ms == 7 * 86_400_000


def test_where_and_matching_on_dotted_paths() -> None:
    rule = parse_rule(
        deal_rule(when={"event": "Product Viewed", "where": {"properties.price": 129, "country": "US"}})
    )
    assert isinstance(rule.when, CountWhen)
    m = rule.when.match
    record = {"country": "US", "properties": {"price": 129.0}}
    assert m.matches("Product Viewed", "track", record)
    assert not m.matches("Product Added", "track", record)
    assert not m.matches("Product Viewed", "track", {"country": "FR", "properties": {"price": 129}})
    assert not m.matches("Product Viewed", "track", {"country": "US", "properties": {}})
    # properties stored as a JSON string are decoded on lookup
    assert m.matches("Product Viewed", "track", {"country": "US", "properties": '{"price": 129}'})


def test_bool_is_not_a_number_in_where() -> None:
    rule = parse_rule(deal_rule(when={"event": "E", "where": {"properties.flag": True}}))
    assert isinstance(rule.when, CountWhen)
    assert rule.when.match.matches("E", "track", {"properties": {"flag": True}})
    assert not rule.when.match.matches("E", "track", {"properties": {"flag": 1}})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"when": {"event": "Product Viewed", "count_at_least": 4, "within": "abc"}},
            "rule 'deal_promo': when.within: expected a duration like 30m, got 'abc'",
        ),
        (
            {"when": {"event": "Product Viewed", "count_at_least": 4}},
            "rule 'deal_promo': when.within: required",
        ),
        (
            {"when": {"event": "Product Viewed", "count_at_least": 0, "within": "1m"}},
            "rule 'deal_promo': when.count_at_least: expected an integer",
        ),
        (
            {"when": {"event": "Product Viewed", "count_at_least": "4", "within": "1m"}},
            "rule 'deal_promo': when.count_at_least:",
        ),
        ({"when": {"evnt": "Product Viewed"}}, "rule 'deal_promo': when.evnt: unknown field"),
        ({"when": {"event": "X", "group_by": ["properties..deal"]}}, "rule 'deal_promo': when.group_by[0]:"),
        (
            {"when": {"event": "X", "where": {"properties.a": [1, 2]}}},
            "rule 'deal_promo': when.where.properties.a:",
        ),
        (
            {"when": {"sequence": {"first": "A", "then_not": "B"}}},
            "rule 'deal_promo': when.sequence.within: required",
        ),
        (
            {"when": {"sequence": {"first": "A", "then_not": "A", "within": "1m"}}},
            "rule 'deal_promo': when.sequence.then_not: must differ",
        ),
        (
            {"when": {"returning_after": "soon"}},
            "rule 'deal_promo': when.returning_after: expected a duration",
        ),
        ({"when": {"returning_after": "7d", "remember_for": "1d"}}, "rule 'deal_promo': when.remember_for:"),
        ({"cooldown": "forever"}, "rule 'deal_promo': cooldown: expected a duration like 30m"),
        ({"once": True}, "rule 'deal_promo': cooldown: cooldown and once: true are mutually exclusive"),
        ({"enabled": "yes please"}, "rule 'deal_promo': enabled: expected true or false"),
        ({"colour": "red"}, "rule 'deal_promo': colour: unknown field"),
        ({"action": {"email": {}}}, "rule 'deal_promo': action.email: unknown field"),
        ({"action": {"webhook": {}}}, "rule 'deal_promo': action.webhook.url: required"),
        (
            {"action": {"webhook": {"url": "ftp://127.0.0.1/x"}}},
            "rule 'deal_promo': action.webhook.url: scheme",
        ),
        (
            {"action": {"webhook": {"url": "http://u:p@127.0.0.1/x"}}},
            "rule 'deal_promo': action.webhook.url: credentials",
        ),
        (
            {"action": {"webhook": {"url": "http://127.0.0.1/", "secret_env": "not a name"}}},
            "rule 'deal_promo': action.webhook.secret_env:",
        ),
        (
            {"action": {"webhook": {"url": "http://127.0.0.1/", "timeout": "10m"}}},
            "rule 'deal_promo': action.webhook.timeout: must be between",
        ),
        ({"id": "bad id!"}, "rule 'bad id!': id: expected letters"),
    ],
)
def test_validation_errors_name_rule_and_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(RuleError) as exc:
        parse_rule(deal_rule(**overrides), label="rule #0")
    assert str(exc.value).startswith(message), str(exc.value)


def test_missing_id_uses_position_label(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n  - id: ok\n    when: {returning_after: 7d}\n    action: {webhook: {url: 'http://localhost/'}}\n"
        "  - when: {returning_after: 7d}\n    action: {webhook: {url: 'http://localhost/'}}\n"
    )
    with pytest.raises(RuleError, match=r"^rule #1: id: required"):
        load_rules_file(path)


def test_duplicate_ids_refused(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    one = "  - id: same\n    when: {returning_after: 7d}\n    action: {webhook: {url: 'http://localhost/'}}\n"
    path.write_text("rules:\n" + one + one)
    with pytest.raises(RuleError, match="rule 'same': id: duplicate"):
        load_rules_file(path)


def test_empty_file_is_no_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("")
    assert load_rules_file(path) == []


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "https://8.8.8.8/x",
        "http://10.0.0.5/x",
        "http://[2001:db8::1]/x",
        "http://localhost.evil.com/x",
        "http://2130706433/x",
        "http://169.254.169.254/latest/meta-data",
    ],
)
def test_default_allowlist_refuses_external_hosts(url: str) -> None:
    with pytest.raises(
        RuleError, match=r"rule 'deal_promo': action.webhook.url: host .* not in the destination allowlist"
    ):
        parse_rule(deal_rule(action={"webhook": {"url": url}}))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8099/x",
        "http://127.8.9.10/x",
        "http://localhost:1/x",
        "http://[::1]:80/x",
        "http://LOCALHOST/x",
        "http://[::ffff:127.0.0.1]/x",
    ],
)
def test_default_allowlist_accepts_loopback(url: str) -> None:
    assert parse_rule(deal_rule(action={"webhook": {"url": url}})).action.url == url


def test_configured_allowlist() -> None:
    allow = Allowlist.parse(["hooks.example.com", "*.partner.example", "10.1.0.0/16"])
    for url in ["https://hooks.example.com/a", "https://api.partner.example/b", "http://10.1.2.3:8080/c"]:
        parse_rule(deal_rule(action={"webhook": {"url": url}}), allow)
    for url in ["https://example.com/a", "http://10.2.0.1/", "http://127.0.0.1/"]:
        with pytest.raises(RuleError, match="allowlist"):
            parse_rule(deal_rule(action={"webhook": {"url": url}}), allow)
    with pytest.raises(ValueError):
        Allowlist.parse(["not a host/"])


def test_topic_value_roundtrip_and_tombstone() -> None:
    value = orjson.dumps({k: v for k, v in deal_rule().items() if k != "id"})
    rule = rule_from_topic_value(b"deal_promo", value)
    assert rule is not None and rule.id == "deal_promo"
    assert rule == parse_rule(deal_rule())  # same schema as the file
    assert rule_from_topic_value(b"deal_promo", None) is None
    with pytest.raises(RuleError, match="rule 'other': id: does not match the record key"):
        rule_from_topic_value(b"other", orjson.dumps(deal_rule()))
    with pytest.raises(RuleError, match="rule 'deal_promo': .*not valid JSON"):
        rule_from_topic_value(b"deal_promo", b"{nope")
    with pytest.raises(RuleError, match="rule 'deal_promo': action.webhook.url: host"):
        rule_from_topic_value(
            b"deal_promo", orjson.dumps(deal_rule(action={"webhook": {"url": "http://a.b/"}}))
        )


def test_rules_collection_updates_and_prefilter() -> None:
    rules = Rules.of([parse_rule(deal_rule())])
    assert rules.relevant_events() == {"Product Viewed"}
    seq = {
        "id": "cart",
        "when": {"sequence": {"first": "Product Added", "then_not": "Order Completed", "within": "30m"}},
        "action": HOOK,
    }
    rules = rules.apply_topic_record(b"cart", orjson.dumps(seq), LOOPBACK_ONLY)
    assert rules.relevant_events() == {"Product Viewed", "Product Added", "Order Completed"}
    ret = {"id": "back", "when": {"returning_after": "7d"}, "action": HOOK}
    with_returning = rules.with_rule(parse_rule(ret))
    assert with_returning.relevant_events() is None  # any event matters
    assert with_returning.with_rule(parse_rule({**ret, "enabled": False})).relevant_events() == {
        "Product Viewed",
        "Product Added",
        "Order Completed",
    }
    rules = rules.apply_topic_record(b"cart", None)
    assert [r.id for r in rules] == ["deal_promo"]
    assert Rules.of([]).relevant_events() == frozenset()


def test_fingerprint_tracks_condition_only() -> None:
    base = parse_rule(deal_rule())
    assert parse_rule(deal_rule(cooldown="1h")).fingerprint == base.fingerprint
    assert (
        parse_rule(deal_rule(action={"webhook": {"url": "http://127.0.0.1:1/"}})).fingerprint
        == base.fingerprint
    )
    changed = parse_rule(
        deal_rule(
            when={
                "event": "Product Viewed",
                "group_by": ["properties.deal_id"],
                "count_at_least": 3,
                "within": "30m",
            }
        )
    )
    assert changed.fingerprint != base.fingerprint
