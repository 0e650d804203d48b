"""The trigger engine setting (default, environment, flag, the pipeline's one ``--engine``), the per-engine
operator ids, and the JVM operator's configuration (:func:`jobs.triggers.jvm_config_json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.flink import job_options
from connectors.settings import compose, environment
from jobs import triggers
from jobs.pipeline import PipelineJobSettings, add_pipeline_args
from jobs.sessionize import SessionsEngine
from jobs.triggers import (
    CompileRuleRecord,
    FunctionConfig,
    TriggersEngine,
    TriggersJobSettings,
    add_triggers_args,
    jvm_config_json,
)
from tests.support import DEAL_PROMO_WHEN, rule_doc
from udfs.rules import Allowlist, RuleRecord, compile_rule_record, parse_rule

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

JAVA = Path(__file__).resolve().parents[2] / "connectors" / "jvm" / "src" / "main" / "java"
HOOK = "http://127.0.0.1:8099/hooks"
LOOPBACK = ("localhost", "127.0.0.0/8", "::1")


def settings(env: dict[str, str], tmp_path: Path, *argv: str) -> TriggersJobSettings:
    return compose(
        TriggersJobSettings,
        environment(env, state_dir=tmp_path),
        job_options("triggers", argv, add_triggers_args),
    )


def pipeline(env: dict[str, str], tmp_path: Path, *argv: str) -> PipelineJobSettings:
    options = job_options("pipeline", argv, add_pipeline_args, shared_flags=True)
    return compose(PipelineJobSettings, environment(env, state_dir=tmp_path), options)


# -------------------------------------------------------------------------------------- the setting


def test_default_is_the_jvm_operator(tmp_path: Path) -> None:
    assert settings({}, tmp_path).triggers.engine is TriggersEngine.JVM


def test_environment_and_flag_choose_the_engine(tmp_path: Path) -> None:
    assert (
        settings({"CLICKPULSE_TRIGGERS_ENGINE": "python"}, tmp_path).triggers.engine is TriggersEngine.PYTHON
    )
    assert settings({}, tmp_path, "--engine", "python").triggers.engine is TriggersEngine.PYTHON
    # the flag wins over the variable
    s = settings({"CLICKPULSE_TRIGGERS_ENGINE": "python"}, tmp_path, "--engine", "jvm")
    assert s.triggers.engine is TriggersEngine.JVM
    with pytest.raises(SystemExit):
        job_options("triggers", ["--engine", "scala"], add_triggers_args)


def test_one_engine_flag_sets_both_parts_of_the_pipeline(tmp_path: Path) -> None:
    s = pipeline({}, tmp_path, "--engine", "python")
    assert (s.sessionize.engine, s.triggers.engine) == (SessionsEngine.PYTHON, TriggersEngine.PYTHON)
    assert s.triggers_part().triggers.engine is TriggersEngine.PYTHON
    s = pipeline(
        {"CLICKPULSE_SESSIONIZE_ENGINE": "python", "CLICKPULSE_TRIGGERS_ENGINE": "python"},
        tmp_path,
        "--engine",
        "jvm",
    )
    assert (s.sessionize.engine, s.triggers.engine) == (SessionsEngine.JVM, TriggersEngine.JVM)
    # without the flag, the variables set the parts one by one
    s = pipeline({"CLICKPULSE_TRIGGERS_ENGINE": "python"}, tmp_path)
    assert (s.sessionize.engine, s.triggers.engine) == (SessionsEngine.JVM, TriggersEngine.PYTHON)
    s = pipeline({"CLICKPULSE_SESSIONIZE_ENGINE": "python"}, tmp_path)
    assert (s.sessionize.engine, s.triggers.engine) == (SessionsEngine.PYTHON, TriggersEngine.JVM)
    # ``--engine`` is one flag for both: the engines must have the same names
    assert {e.value for e in SessionsEngine} == {e.value for e in TriggersEngine}


def test_engines_keep_their_state_apart() -> None:
    """The states are incompatible: the uids and state names must differ (a restore then fails loudly
    instead of reading the other engine's bytes)."""
    assert triggers.UID_TRIGGERS != triggers.UID_TRIGGERS_JVM
    python_names = {triggers.USER_STATE_NAME, triggers.RULES_STATE_NAME}
    jvm_names = {triggers.USER_STATE_NAME_JVM, triggers.RULES_STATE_NAME_JVM}
    assert len(python_names | jvm_names) == 4
    assert triggers.JVM_OPERATOR.startswith("dev.clickpulse.operators.triggers.")


def test_function_config_carries_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triggers, "read_rule_records", lambda *_, **__: {})
    s = settings({"CLICKPULSE_TRIGGERS_DISPATCH": "false"}, tmp_path, "--engine", "python")
    assert triggers.function_config(s, []).engine is TriggersEngine.PYTHON
    s = settings({"CLICKPULSE_TRIGGERS_DISPATCH": "false"}, tmp_path)
    assert triggers.function_config(s, []).engine is TriggersEngine.JVM


# ------------------------------------------------------------------------ the JVM operator's config


def rule(rule_id: str, when: dict[str, Any], **extra: Any) -> Any:
    return parse_rule(rule_doc(rule_id, when, HOOK, **extra))


def topic_value(when: dict[str, Any], url: str = HOOK) -> bytes:
    return orjson.dumps({"when": when, "action": {"webhook": {"url": url}}})


def config(**overrides: Any) -> FunctionConfig:
    values: dict[str, Any] = {
        "file_rules": (),
        "snapshot": (),
        "allowlist": LOOPBACK,
        "event_filter": None,
        "state_ttl_ms": 86_400_000,
        "log_interval_s": 2.5,
        "engine": TriggersEngine.JVM,
    }
    return FunctionConfig(**{**values, **overrides})


def test_jvm_config_has_the_file_rules_compiled_and_the_settings() -> None:
    deal = rule("deal_promo", DEAL_PROMO_WHEN, cooldown="24h")
    back = rule("returning", {"returning_after": "7d"})
    doc = orjson.loads(
        jvm_config_json(config(file_rules=(deal, back), event_filter=frozenset({"b", "a"}), state_ttl_ms=123))
    )
    assert set(doc) == {"file_rules", "snapshot", "event_filter", "state_ttl_ms", "label", "log_interval_ms"}
    assert doc["file_rules"] == [orjson.loads(orjson.dumps(deal.compiled())), back.compiled()]
    assert doc["file_rules"][0]["id"] == "deal_promo" and doc["file_rules"][0]["cooldown_ms"] == 86_400_000
    assert doc["snapshot"] == {}
    assert doc["event_filter"] == ["a", "b"]
    assert (doc["state_ttl_ms"], doc["label"], doc["log_interval_ms"]) == (123, "triggers", 2500)
    assert orjson.loads(jvm_config_json(config()))["event_filter"] is None
    assert orjson.loads(jvm_config_json(config(event_filter=frozenset())))["event_filter"] == []


def test_jvm_config_has_the_snapshot_compiled_against_the_allowlist() -> None:
    """Each record of the driver's snapshot as ``[partition, offset, rule, error]``: a valid rule
    compiled, a tombstone and an invalid record (bad JSON, a destination outside the allowlist) without
    a rule; exactly :func:`compile_rule_record`'s JSON, parsed."""
    snapshot = (
        ("signup", 0, 5, topic_value({"event": "Signed Up"})),
        ("gone", 1, 7, None),
        ("broken", 2, 9, b"{not json"),
        ("elsewhere", 3, 11, topic_value({"event": "X"}, url="https://hooks.example.com/x")),
    )
    doc = orjson.loads(jvm_config_json(config(snapshot=snapshot)))
    snap = doc["snapshot"]
    assert set(snap) == {"signup", "gone", "broken", "elsewhere"}
    partition, offset, compiled, error = snap["signup"]
    assert (partition, offset, error) == (0, 5, None)
    want = parse_rule({"id": "signup", **orjson.loads(topic_value({"event": "Signed Up"}))}).compiled()
    assert compiled == orjson.loads(orjson.dumps(want))
    assert snap["gone"] == [1, 7, None, None]
    assert snap["broken"][:3] == [2, 9, None] and snap["broken"][3]
    assert snap["elsewhere"][:3] == [3, 11, None] and "allow" in snap["elsewhere"][3].lower()
    allowlist = Allowlist.parse(LOOPBACK)
    for rule_id, p, o, v in snapshot:
        assert snap[rule_id] == orjson.loads(compile_rule_record(rule_id, RuleRecord(p, o, v), allowlist))
    # a wider allowlist accepts the other destination
    wide = orjson.loads(jvm_config_json(config(snapshot=snapshot, allowlist=(*LOOPBACK, "*.example.com"))))
    assert wide["snapshot"]["elsewhere"][2]["id"] == "elsewhere" and wide["snapshot"]["elsewhere"][3] is None


def test_the_rules_stream_udf_compiles_records_like_the_driver() -> None:
    """What :class:`CompileRuleRecord` hands the JVM operator in the graph is what the driver's snapshot
    holds for the same record."""
    fn = CompileRuleRecord(LOOPBACK)
    fn.open(None)
    allowlist = Allowlist.parse(LOOPBACK)
    for v in (
        topic_value({"event": "Signed Up"}),
        None,
        b"[]",
        topic_value({"event": "X"}, "http://10.0.0.1/"),
    ):
        got = fn.eval("r1", v, 3, 42)
        assert got == compile_rule_record("r1", RuleRecord(3, 42, v), allowlist)
        assert orjson.loads(got)[:2] == [3, 42]
