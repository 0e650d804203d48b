"""Which variables a webhook HMAC secret may be read from: only ``CLICKPULSE_WEBHOOK_SECRET[_<SUFFIX>]``.

A rule (file or ``rules`` topic) must not be able to make dispatch key its HMAC with ``CLICKHOUSE_URL``,
a password or a setting whose value anyone can guess (``CLICKPULSE_WEBHOOK_SECRET_ENV`` holds a variable
*name*): refused when the rule is parsed, again when its destination is resolved, and for the
default-secret setting itself.
"""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from pydantic import ValidationError

from connectors.dispatch import DispatchSettings
from connectors.settings import declared_variables
from devstack.configdoc import discover_settings_classes
from udfs.rules import (
    DEFAULT_SECRET_ENV,
    RuleError,
    RuleRecord,
    check_secret_env,
    destination_for,
    effective_rules,
    parse_rule,
    rule_from_topic_value,
)

pytestmark = [pytest.mark.unit, pytest.mark.fault]

#: Names a hostile or careless rule could point ``secret_env`` at, and why each is no webhook secret.
REFUSED = [
    "CLICKHOUSE_URL",  # a credential-bearing setting
    "REDIS_URL",
    "KAFKA_BOOTSTRAP_SERVERS",
    "CLICKPULSE_KAFKA_SASL_PASSWORD",
    "HOME",  # guessable
    "PATH",
    "CLICKPULSE_WEBHOOK_SECRET_ENV",  # a setting: its value is a variable name, guessable
    "CLICKPULSE_WEBHOOK_SECRET_PROMO_ENV",
    "CLICKPULSE_WEBHOOK_SECRETS",  # the prefix must end the name or be followed by "_"
    "CLICKPULSE_WEBHOOK_SECRET_",
    "CLICKPULSE_WEBHOOK_SECRET__X",
    "clickpulse_webhook_secret",  # names are upper case (the environment is normalised so)
    "CLICKPULSE_WEBHOOK_SECRET-X",
    "",
]
ALLOWED = ["CLICKPULSE_WEBHOOK_SECRET", "CLICKPULSE_WEBHOOK_SECRET_PROMO", "CLICKPULSE_WEBHOOK_SECRET_2"]

#: Every name above holds a value here: only the check stands between a rule and these values.
ENVIRON = {name: f"value-of-{name}" for name in REFUSED + ALLOWED if name}


def rule_json(rule_id: str, secret_env: object) -> dict[str, object]:
    return {
        "id": rule_id,
        "when": {"event": "Product Viewed"},
        "action": {"webhook": {"url": "http://127.0.0.1:8099/h", "secret_env": secret_env}},
    }


@pytest.mark.parametrize("name", REFUSED)
def test_rules_file_and_topic_refuse_a_secret_env_that_is_no_webhook_secret(name: str) -> None:
    with pytest.raises(RuleError, match=r"rule 'r': action\.webhook\.secret_env: ") as err:
        parse_rule(rule_json("r", name))
    assert "value-of" not in str(err.value)
    with pytest.raises(RuleError, match=r"rule 'r': action\.webhook\.secret_env: "):
        rule_from_topic_value(b"r", orjson.dumps(rule_json("r", name)))
    # the topic overlay: an invalid record leaves no rule with that id
    ok = parse_rule(rule_json("r", "CLICKPULSE_WEBHOOK_SECRET"))
    rules, errors = effective_rules([ok], {"r": RuleRecord(0, 5, orjson.dumps(rule_json("r", name)))})
    assert rules.by_id == {} and "action.webhook.secret_env" in errors["r"]


@pytest.mark.parametrize("name", [123, ["CLICKPULSE_WEBHOOK_SECRET"], {"a": 1}, True])
def test_secret_env_of_another_type_is_refused(name: object) -> None:
    with pytest.raises(RuleError, match=r"action\.webhook\.secret_env: expected a webhook secret variable"):
        parse_rule(rule_json("r", name))


@pytest.mark.parametrize("name", ALLOWED)
def test_webhook_secret_variables_are_accepted_and_resolved(name: str) -> None:
    rule = parse_rule(rule_json("r", name))
    assert rule.action.secret_env == name
    assert destination_for(rule, ENVIRON).secret == f"value-of-{name}".encode()


@pytest.mark.parametrize("name", [n for n in REFUSED if n])
def test_resolution_checks_again_whatever_built_the_rule(name: str) -> None:
    """A rule made without the parser (or an older parser) still cannot key the HMAC with another variable."""
    good = parse_rule(rule_json("r", "CLICKPULSE_WEBHOOK_SECRET"))
    forged = dataclasses.replace(good, action=dataclasses.replace(good.action, secret_env=name))
    with pytest.raises(RuleError, match=r"rule 'r': action\.webhook\.secret_env: ") as err:
        destination_for(forged, ENVIRON)
    assert f"value-of-{name}" not in str(err.value)
    plain = dataclasses.replace(good, action=dataclasses.replace(good.action, secret_env=None))
    with pytest.raises(RuleError, match=r"rule 'r': default_secret_env: "):
        destination_for(plain, ENVIRON, default_secret_env=name)


def test_resolution_refuses_declared_settings_variables() -> None:
    rule = parse_rule(rule_json("r", "CLICKPULSE_WEBHOOK_SECRET_ROTATION"))
    environ = {"CLICKPULSE_WEBHOOK_SECRET_ROTATION": "1"}
    assert destination_for(rule, environ).secret == b"1"
    with pytest.raises(RuleError, match="is a settings variable, not a secret"):
        destination_for(rule, environ, reserved_env={"CLICKPULSE_WEBHOOK_SECRET_ROTATION"})


def test_default_secret_setting_must_name_a_webhook_secret() -> None:
    assert DispatchSettings.from_env({}).webhook_secret_env == DEFAULT_SECRET_ENV
    settings = DispatchSettings.from_env({"CLICKPULSE_WEBHOOK_SECRET_ENV": "CLICKPULSE_WEBHOOK_SECRET_OPS"})
    assert settings.webhook_secret_env == "CLICKPULSE_WEBHOOK_SECRET_OPS"
    for name in ("CLICKHOUSE_URL", "CLICKPULSE_WEBHOOK_SECRET_ENV", "CLICKPULSE_KAFKA_SASL_PASSWORD"):
        with pytest.raises(ValidationError, match="webhook_secret_env"):
            DispatchSettings.from_env({"CLICKPULSE_WEBHOOK_SECRET_ENV": name})


def test_no_settings_variable_can_hold_a_webhook_secret() -> None:
    """Drift guard: every variable a settings class declares (now or later) is refused already at parse
    time, and the resolution-time list of declared variables knows them all."""
    variables = {
        info.alias for cls in discover_settings_classes() for info in cls.model_fields.values() if info.alias
    }
    assert {"CLICKHOUSE_URL", "CLICKPULSE_WEBHOOK_SECRET_ENV"} <= variables
    for name in sorted(variables):
        with pytest.raises(ValueError):
            check_secret_env(name)
    assert variables <= declared_variables()
    assert "CLICKPULSE_WEBHOOK_TIMEOUT_S" in declared_variables()  # renamed old names too
