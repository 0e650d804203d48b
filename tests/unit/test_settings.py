"""The one configuration owner: old variable names, the environment over ``stack.env``, composition."""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from connectors import settings
from connectors.settings import RENAMED, Connections, ConsumerSettings, compose, environment
from devstack import configdoc
from jobs.ingest import IngestJobSettings
from jobs.load import LoadJobSettings
from jobs.triggers import TriggersJobSettings

pytestmark = [
    pytest.mark.unit,
    # importing the job modules imports pyflink.table, whose own decorators warn about its deprecated API
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

#: Every new variable name -> (settings area, field), from the documented classes.
OWNERS: dict[str, tuple[Any, str]] = {
    s.env_var: (doc.cls, s.field) for doc in configdoc.reference() for s in doc.settings
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the deprecation warnings as a new process would."""
    monkeypatch.setattr(settings, "_warned", set())


def _probe_value(field_type: Any) -> tuple[str, Any]:
    """A value for the old variable, and what the new field must then hold."""
    if field_type is bool or "bool" in str(field_type):
        return "true", True
    return "7", 7


@pytest.mark.parametrize("renamed", RENAMED, ids=lambda r: r.old)
def test_every_old_name_still_sets_its_setting(
    renamed: settings.Renamed, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert renamed.new in OWNERS, f"{renamed.new} is no documented setting"
    cls, field = OWNERS[renamed.new]
    info = cls.model_fields[field]
    raw: str
    expected: Any
    if isinstance(info.annotation, type) and issubclass(info.annotation, enum.Enum):
        member = next(m for m in info.annotation if m != info.default)
        raw, expected = str(member.value), member
    elif "Path" in str(info.annotation):
        raw, expected = "some/dir", Path("some/dir")
    elif "str" in str(info.annotation) and "int" not in str(info.annotation):
        raw, expected = "probe-value", "probe-value"
    else:
        raw, expected = _probe_value(info.annotation)
        if renamed.scale != 1:
            expected = 7 * renamed.scale
    with caplog.at_level(logging.WARNING, logger="connectors.settings"):
        value = getattr(cls.from_env(environment({renamed.old: raw}, state_dir=tmp_path)), field)
        environment({renamed.old: raw}, state_dir=tmp_path)  # a second read does not warn again
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    assert value == expected
    warnings = [r.getMessage() for r in caplog.records if renamed.old in r.getMessage()]
    assert len(warnings) == 1 and renamed.new in warnings[0]


def test_the_new_name_wins_over_the_old_one(tmp_path: Path) -> None:
    env = environment(
        {"CLICKPULSE_SESSION_GAP_S": "60", "CLICKPULSE_SESSIONIZE_GAP_MS": "5000"}, state_dir=tmp_path
    )
    assert env["CLICKPULSE_SESSIONIZE_GAP_MS"] == "5000"


def test_fractional_seconds_become_milliseconds(tmp_path: Path) -> None:
    env = environment({"CLICKPULSE_LOAD_BATCH_MAX_SECONDS": "0.25"}, state_dir=tmp_path)
    assert env["CLICKPULSE_LOAD_BATCH_MAX_AGE_MS"] == "250"


def test_environment_wins_over_stack_env_and_names_are_case_insensitive(tmp_path: Path) -> None:
    (tmp_path / "stack.env").write_text(
        "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1111\nREDIS_URL=redis://127.0.0.1:2222/0\n"
        "CLICKPULSE_TOPIC_PREFIX=fromfile.\n"
    )
    env = environment({"kafka_bootstrap_servers": "127.0.0.1:3333"}, state_dir=tmp_path)
    conn = Connections.from_env(env)
    assert conn.kafka_bootstrap_servers == "127.0.0.1:3333"
    assert conn.redis_url.get_secret_value() == "redis://127.0.0.1:2222/0"
    assert conn.topic("events.raw") == "fromfile.events.raw"
    # the state directory named by the environment (old name included) is where stack.env is found
    assert Connections.from_env(environment({"CLICKPULSE_HOME": str(tmp_path)})).topic_prefix == "fromfile."


def test_settings_never_read_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9999")
    monkeypatch.setenv("CLICKPULSE_JOB_GROUP_ID", "from-env")
    assert Connections().kafka_bootstrap_servers == "127.0.0.1:9092"
    assert ConsumerSettings().group_id == ""


def test_compose_gives_each_area_its_options_and_one_connections(tmp_path: Path) -> None:
    env = environment(
        {"KAFKA_BOOTSTRAP_SERVERS": "k:1", "CLICKPULSE_INGEST_DEDUP_WINDOW_MS": "60000"}, state_dir=tmp_path
    )
    s = compose(IngestJobSettings, env, {"group_id": "g", "parallelism": 2, "starting_offsets": None})
    assert s.connections.kafka_bootstrap_servers == "k:1"
    assert s.consumer.group("ingest") == "g" and s.flink.parallelism == 2
    assert s.ingest.dedup_window_ms == 60_000
    load = compose(LoadJobSettings, env, {"clickhouse_database": "other", "batch_max_age_ms": 250})
    assert load.consumer.group("load") == "clickpulse-load"
    assert load.loader_config().database == "other" and load.loader_config().batch_max_seconds == 0.25
    triggers = compose(TriggersJobSettings, env, {"group_id": "t"})
    assert triggers.dispatch_group() == "t-dispatch"
    with pytest.raises(ValidationError, match="frozen"):
        s.ingest.dedup_window_ms = 1  # type: ignore[misc]


def test_kafka_security_options_reach_every_client(tmp_path: Path) -> None:
    conn = Connections.from_env(
        environment(
            {
                "KAFKA_BOOTSTRAP_SERVERS": "b:9093",
                "CLICKPULSE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "CLICKPULSE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "CLICKPULSE_KAFKA_SASL_USERNAME": "ingest",
                "CLICKPULSE_KAFKA_SASL_PASSWORD": 'p"w',
                "CLICKPULSE_KAFKA_SSL_CA_FILE": "/etc/ca.pem",
            },
            state_dir=tmp_path,
        )
    )
    props = conn.kafka_properties()
    assert props["security.protocol"] == "SASL_SSL"
    assert props["sasl.jaas.config"] == (
        'org.apache.kafka.common.security.scram.ScramLoginModule required username="ingest" password="p\\"w";'
    )
    assert props["ssl.truststore.location"] == "/etc/ca.pem"
    client = conn.kafka_security_options()
    assert client["sasl_plain_password"] == 'p"w' and client["ssl_cafile"] == "/etc/ca.pem"
    assert 'p\\"w' not in repr(conn)  # the password is a secret


def test_child_environment_drops_leftover_settings(tmp_path: Path) -> None:
    conn = Connections.from_env(environment({"KAFKA_BOOTSTRAP_SERVERS": "k:1"}, state_dir=tmp_path))
    env = settings.child_environment(conn, {"CLICKPULSE_JOB_GROUP_ID": "stale", "PATH": "/bin"})
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "k:1" and env["PATH"] == "/bin"
    assert "CLICKPULSE_JOB_GROUP_ID" not in env


def test_kafka_security_reaches_the_consumer_jobs_configs(tmp_path: Path) -> None:
    """The loader's and the dispatch loop's Kafka clients get the TLS/SASL options, as Flink's do."""
    from jobs.dispatch import DispatchJobSettings

    env = environment(
        {
            "CLICKPULSE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "CLICKPULSE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "CLICKPULSE_KAFKA_SASL_USERNAME": "load",
            "CLICKPULSE_KAFKA_SASL_PASSWORD": "pw",
        },
        state_dir=tmp_path,
    )
    load = compose(LoadJobSettings, env).loader_config().kafka_security
    d = compose(DispatchJobSettings, env)
    dispatch = d.dispatch.dispatch_config(d.connections, d.consumer, "g").kafka_security
    for options in (load, dispatch):
        assert options["security_protocol"] == "SASL_SSL" and options["sasl_plain_username"] == "load"
        assert options["sasl_mechanism"] == "SCRAM-SHA-512" and options["sasl_plain_password"] == "pw"
