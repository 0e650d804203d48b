"""The configuration reference in README.md is generated from the settings classes and cannot drift."""

from __future__ import annotations

import enum
import inspect
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Union, cast, get_args, get_origin

import pytest
from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from connectors.settings import Settings, environment
from devstack import configdoc

pytestmark = [
    pytest.mark.unit,
    # importing the job modules imports pyflink.table, whose own decorators warn about its deprecated API
    pytest.mark.filterwarnings("ignore:.*deprecated since version 2:DeprecationWarning:pyflink"),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def docs() -> list[configdoc.SettingsDoc]:
    return configdoc.reference()


def _all_settings(docs: list[configdoc.SettingsDoc]) -> list[tuple[configdoc.SettingsDoc, configdoc.Setting]]:
    return [(doc, s) for doc in docs for s in doc.settings]


# ------------------------------------------------------------------------------------ the reference


def test_readme_block_equals_the_generated_reference() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert configdoc.readme_block(text) == configdoc.render_markdown(), (
        "README.md's configuration reference is stale: run `python -m devstack.configdoc --write`"
    )


def test_every_listed_class_is_a_settings_class_and_every_settings_class_is_listed() -> None:
    listed = configdoc.settings_classes()
    discovered = configdoc.discover_settings_classes()
    assert len(set(listed)) == len(listed), "a class is listed twice in SETTINGS_CLASSES"
    missing = {f"{c.__module__}:{c.__qualname__}" for c in set(discovered) - set(listed)}
    assert not missing, f"add these to devstack.configdoc.SETTINGS_CLASSES: {sorted(missing)}"
    assert set(listed) == set(discovered)


def test_every_field_has_a_description(docs: list[configdoc.SettingsDoc]) -> None:
    undocumented = [f"{doc.name}.{s.field}" for doc, s in _all_settings(docs) if not s.description.strip()]
    assert not undocumented, (
        f"fields without Field(description=...) or an attribute docstring: {undocumented}"
    )


def test_every_field_of_every_class_is_documented_somewhere(docs: list[configdoc.SettingsDoc]) -> None:
    """A subclass shows its own fields; together with the classes it names, that is all of its fields."""
    by_class = {doc.cls: {s.field for s in doc.settings} for doc in docs}
    for doc in docs:
        shown = set(by_class[doc.cls]).union(*(by_class[base] for base in doc.inherits))
        assert shown == set(doc.cls.model_fields), doc.name


def test_docstring_names_the_variable_the_field_is_read_from(docs: list[configdoc.SettingsDoc]) -> None:
    wrong = [
        f"{doc.name}.{s.field}: docstring says {s.declared_env_var}, read from {s.env_var}"
        for doc, s in _all_settings(docs)
        if s.declared_env_var and s.declared_env_var.upper() != s.env_var
    ]
    assert not wrong


def test_flags_named_in_docstrings_exist(docs: list[configdoc.SettingsDoc]) -> None:
    for doc in docs:
        sources = "".join(
            inspect.getsource(sys.modules[c.__module__])
            for c in doc.cls.__mro__
            if c.__module__.split(".")[0] in configdoc.SCANNED_PACKAGES
        )
        for s in doc.settings:
            for flag in s.flags:
                assert f'"{flag}"' in sources, f"{doc.name}.{s.field}: {flag} is not an option of the job"


def test_a_variable_shared_by_several_classes_has_one_default(docs: list[configdoc.SettingsDoc]) -> None:
    defaults: dict[str, dict[str, str]] = {}
    for doc, s in _all_settings(docs):
        defaults.setdefault(s.env_var, {})[f"{doc.name}.{s.field}"] = s.default
    disagree = {env: seen for env, seen in defaults.items() if len(set(seen.values())) > 1}
    assert not disagree


def test_each_job_is_composed_of_documented_areas(docs: list[configdoc.SettingsDoc]) -> None:
    areas = {job: [a.__name__ for a in classes] for job, classes in configdoc.job_areas()}
    common = ["Connections", "ConsumerSettings"]
    assert areas["ingest"] == [*common, "FlinkSettings", "IngestSettings"]
    assert areas["sessionize"] == [*common, "FlinkSettings", "SessionizeSettings"]
    assert areas["triggers"] == [*common, "FlinkSettings", "TriggersSettings", "DispatchSettings"]
    assert areas["dispatch"] == [*common, "DispatchSettings"]
    assert areas["load"] == [*common, "LoadSettings"]
    documented = {doc.cls for doc in docs}
    assert all(a in documented for _, classes in configdoc.job_areas() for a in classes)
    text = configdoc.render_markdown()
    assert "| `ingest` | `Connections`, `ConsumerSettings`, `FlinkSettings`, `IngestSettings` |" in text
    # every connection field is declared once, in Connections
    owners: dict[str, list[str]] = {}
    for doc, s in _all_settings(docs):
        owners.setdefault(s.env_var, []).append(doc.name)
    assert owners["KAFKA_BOOTSTRAP_SERVERS"] == ["Connections"]
    assert owners["CLICKPULSE_TOPIC_PREFIX"] == ["Connections"]


def test_renamed_variables_are_listed() -> None:
    text = configdoc.render_markdown()
    assert "| `CLICKPULSE_SESSION_GAP_S` | `CLICKPULSE_SESSIONIZE_GAP_MS` (seconds → milliseconds) |" in text
    assert "| `CLICKPULSE_GROUP_ID` | `CLICKPULSE_JOB_GROUP_ID` |" in text


# --------------------------------------------------------------- the variables really set the fields


#: Fields validated beyond their type, by variable: a valid value that differs from the default.
VALID_PROBES: dict[str, Any] = {
    "CLICKPULSE_WEBHOOK_SECRET_ENV": "CLICKPULSE_WEBHOOK_SECRET_PROBE",
    "CLICKPULSE_DASHBOARD_REFRESH_MS": 1500,  # at most 2000: the live panels refresh at least every 2 s
    "CLICKPULSE_COLLECTOR_TRUSTED_PROXIES": "10.0.0.0/8",
    "CLICKPULSE_FLINK_OPTIONS": "state.backend.rocksdb.thread.num=2",
}


def read(cls: type[BaseSettings], state_dir: Path) -> Settings:
    """``cls`` (a settings area) as a job's ``main()`` reads it: from :func:`environment`."""
    return cast(type[Settings], cls).from_env(environment(state_dir=state_dir))


def _probe(info: FieldInfo, default: Any) -> tuple[str, Any]:
    """An environment value for a field that differs from its default, and the value it must parse to."""
    if info.alias in VALID_PROBES:
        return str(VALID_PROBES[info.alias]), VALID_PROBES[info.alias]
    annotation = info.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if annotation is bool:
        return ("false", False) if default else ("true", True)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        member = next(m for m in annotation if m != default)
        return str(member.value), member
    if annotation is int:  # above the default: limits validated against other fields' defaults still hold
        value = (default if isinstance(default, int) else 0) + 12345
        return str(value), value
    if annotation is float:
        return "12345.5", 12345.5
    if annotation is SecretStr:
        return "probe://configdoc", "probe://configdoc"
    if annotation is Path:
        return "configdoc/probe", Path("configdoc/probe")
    assert annotation is str, f"no probe value for {annotation}"
    return "configdoc-probe", "configdoc-probe"


def _clean_env(monkeypatch: pytest.MonkeyPatch, docs: list[configdoc.SettingsDoc]) -> None:
    for _, s in _all_settings(docs):
        monkeypatch.delenv(s.env_var, raising=False)


def test_each_documented_variable_sets_its_field(
    docs: list[configdoc.SettingsDoc], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clean_env(monkeypatch, docs)
    for doc in docs:
        for s in doc.settings:
            info = doc.cls.model_fields[s.field]
            raw, expected = _probe(info, info.get_default(call_default_factory=True, validated_data={}))
            with monkeypatch.context() as m:
                m.setenv(s.env_var, raw)
                value = getattr(
                    cast(type[Settings], doc.cls).from_env(environment(state_dir=tmp_path)), s.field
                )
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            assert value == expected, f"{doc.name}.{s.field}: {s.env_var}={raw} gave {value!r}"


def test_no_undocumented_variable_sets_a_field(
    docs: list[configdoc.SettingsDoc], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clean_env(monkeypatch, docs)
    leaks = []
    for doc in docs:
        for s in doc.settings:
            bare = s.field.upper()
            if bare == s.env_var:
                continue
            info = doc.cls.model_fields[s.field]
            raw, expected = _probe(info, info.get_default(call_default_factory=True, validated_data={}))
            with monkeypatch.context() as m:
                m.setenv(bare, raw)
                value = getattr(
                    cast(type[Settings], doc.cls).from_env(environment(state_dir=tmp_path)), s.field
                )
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value == expected:
                leaks.append(f"{bare} sets {doc.name}.{s.field}")
    assert not leaks, leaks


# -------------------------------------------------------------------------------------- rendering


class _Probe(BaseSettings):
    """A settings class with secrets, for the rendering rules."""

    model_config = SettingsConfigDict(env_prefix="PROBE_")

    api_token: str = "t0ps3cret-token"
    """``PROBE_API_TOKEN``: a token (default ``t0ps3cret-token``)."""
    db_password: SecretStr = SecretStr("t0ps3cret-password")
    """the password"""
    hook_secret_env: str = "HOOK_SECRET"
    """``PROBE_HOOK_SECRET_ENV``: names the variable holding the secret (default ``HOOK_SECRET``)."""
    mode: str = Field("a|b", description="pipes are escaped")
    retries: int = Field(3, ge=0)
    """how often (default 3)."""


def test_secret_defaults_are_hidden_and_pointers_are_not() -> None:
    doc = configdoc.describe_class(_Probe)
    by_field = {s.field: s for s in doc.settings}
    assert by_field["api_token"].default == configdoc.HIDDEN
    assert by_field["db_password"].default == configdoc.HIDDEN
    assert by_field["hook_secret_env"].default == "`HOOK_SECRET`"
    assert by_field["api_token"].env_var == "PROBE_API_TOKEN"
    assert by_field["api_token"].declared_env_var == "PROBE_API_TOKEN"
    shown = " ".join(f"{s.default} {s.description}" for s in doc.settings)
    assert "t0ps3cret" not in shown  # nor repeated by a docstring's "(default ...)"


def test_field_rendering() -> None:
    by_field = {s.field: s for s in configdoc.describe_class(_Probe).settings}
    assert by_field["mode"].description == "pipes are escaped"  # Field(description=...) is used
    assert by_field["retries"].type == "int ≥ 0"
    assert by_field["retries"].description == "how often."  # "(default 3)" repeats the default column
    assert by_field["hook_secret_env"].description == "names the variable holding the secret."
    assert by_field["db_password"].type == "str (secret)"


def test_real_settings_rendering(docs: list[configdoc.SettingsDoc]) -> None:
    text = configdoc.render_markdown()
    row = next(line for line in text.splitlines() if line.startswith("| `CLICKPULSE_JOB_STARTING_OFFSETS`"))
    assert "`earliest` / `latest` / `committed`" in row and "| `committed` |" in row
    row = next(line for line in text.splitlines() if line.startswith("| `CLICKPULSE_LOAD_BATCH_MAX_ROWS`"))
    assert "| int > 0 | `50000` |" in row
    row = next(line for line in text.splitlines() if line.startswith("| `CLICKPULSE_FLINK_CHECKPOINT_DIR`"))
    assert "| path, optional | unset |" in row
    row = next(line for line in text.splitlines() if line.startswith("| `CLICKPULSE_TOPIC_PARTITIONS`"))
    assert "| `4` |" in row


# ---------------------------------------------------------------------------------------- the CLI


def test_write_and_check(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# title\n\nbefore\n\n{configdoc.START_MARKER}\nstale\n{configdoc.END_MARKER}\n\nafter\n",
        encoding="utf-8",
    )
    assert configdoc.main(["--check", "--readme", str(readme)]) == 1
    assert configdoc.main(["--write", "--readme", str(readme)]) == 0
    assert configdoc.main(["--check", "--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith(f"{configdoc.END_MARKER}\n\nafter\n")
    assert "stale" not in text
    assert configdoc.readme_block(text) == configdoc.render_markdown()
    before = readme.stat().st_mtime_ns
    assert configdoc.main(["--write", "--readme", str(readme)]) == 0  # nothing to change: not rewritten
    assert readme.stat().st_mtime_ns == before

    readme.write_text("# no markers\n", encoding="utf-8")
    assert configdoc.main(["--check", "--readme", str(readme)]) == 2


def test_collecting_the_settings_starts_no_jvm() -> None:
    code = (
        "import devstack.configdoc as c; c.render_markdown(); c.discover_settings_classes()\n"
        "import pyflink.java_gateway as g\n"
        "assert g._gateway is None, 'a JVM gateway was started'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
