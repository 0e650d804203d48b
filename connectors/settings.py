"""The one owner of clickpulse's configuration.

Every option is a field of a frozen settings *area* (a :class:`Settings` subclass: :class:`Connections`,
:class:`ConsumerSettings`, ``connectors.flink.FlinkSettings``, each job's own area); a job's settings
compose the areas it needs (:func:`compose`). Values come from one mapping, built by
:func:`environment` in ``main()``: the process environment over ``<state dir>/stack.env`` (written by
``clickpulse stack up``), with the old variable names of :data:`RENAMED` translated. Nothing reads the
environment at import time, and no settings class reads it by itself.

Names: ``CLICKPULSE_<AREA>_<NAME>``; durations are whole milliseconds and end in ``_MS``. The contract
names stay as ``../shared/ARCHITECTURE.md`` fixes them (``KAFKA_BOOTSTRAP_SERVERS``, ``REDIS_URL``,
``CLICKHOUSE_URL``, the ``stack.env`` lines, ``CLICKPULSE_WEBHOOK_SECRET``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any, Self, TypeVar, get_type_hints

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

log = logging.getLogger(__name__)

#: Contract topics (and internal ones) and the topic-level configs they are created with.
CONTRACT_TOPICS: dict[str, dict[str, str]] = {
    "events.raw": {},
    "events.enriched": {},
    "events.dlq": {},
    "events.late": {},
    "sessions": {},
    "rules": {"cleanup.policy": "compact"},
    "actions": {},
    "actions.dlq": {},
    # internal, not in the contract: actions a slow destination could not take yet (connectors.actions)
    "actions.retry": {},
}

#: The file ``clickpulse stack up`` writes into the state directory.
STACK_ENV = "stack.env"
#: The variable naming the state directory, and its default.
STATE_DIR_VAR = "CLICKPULSE_STATE_DIR"
DEFAULT_STATE_DIR = ".clickpulse"
#: Variables of the contract that keep their names (no ``CLICKPULSE_`` prefix).
CONTRACT_VARS = ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "CLICKHOUSE_URL")


# ----------------------------------------------------------------------------------------- renames


@dataclasses.dataclass(frozen=True)
class Renamed:
    """An old variable name that still works: its value, times ``scale``, is the new variable's."""

    old: str
    new: str
    scale: int = 1  # 1000: the old variable was in seconds, the new one is in milliseconds


_S = 1000
#: Every variable renamed when the names became ``CLICKPULSE_<AREA>_<NAME>`` with milliseconds for
#: durations. An old name keeps working (a deprecation warning is logged once per process) unless the
#: new name is set too, which then wins.
RENAMED: tuple[Renamed, ...] = (
    Renamed("CLICKPULSE_HOME", STATE_DIR_VAR),
    Renamed("CLICKPULSE_JARS_DIR", "CLICKPULSE_MAVEN_JARS_DIR"),
    Renamed("CLICKPULSE_DATABASE", "CLICKPULSE_CLICKHOUSE_DATABASE"),
    Renamed("CLICKPULSE_GROUP_ID", "CLICKPULSE_JOB_GROUP_ID"),
    Renamed("CLICKPULSE_LOAD_GROUP_ID", "CLICKPULSE_JOB_GROUP_ID"),
    Renamed("CLICKPULSE_STARTING_OFFSETS", "CLICKPULSE_JOB_STARTING_OFFSETS"),
    Renamed("CLICKPULSE_BOUNDED", "CLICKPULSE_JOB_BOUNDED"),
    Renamed("CLICKPULSE_LOG_INTERVAL_S", "CLICKPULSE_JOB_LOG_INTERVAL_MS", _S),
    Renamed("CLICKPULSE_PARALLELISM", "CLICKPULSE_FLINK_PARALLELISM"),
    Renamed("CLICKPULSE_CHECKPOINT_INTERVAL_MS", "CLICKPULSE_FLINK_CHECKPOINT_INTERVAL_MS"),
    Renamed("CLICKPULSE_CHECKPOINT_DIR", "CLICKPULSE_FLINK_CHECKPOINT_DIR"),
    Renamed("CLICKPULSE_RESTORE", "CLICKPULSE_FLINK_RESTORE"),
    Renamed("CLICKPULSE_TRANSACTION_TIMEOUT_MS", "CLICKPULSE_KAFKA_TRANSACTION_TIMEOUT_MS"),
    Renamed("CLICKPULSE_PYTHON_EXECUTABLE", "CLICKPULSE_FLINK_PYTHON_EXECUTABLE"),
    Renamed("CLICKPULSE_PYTHON_EXECUTION_MODE", "CLICKPULSE_FLINK_PYTHON_EXECUTION_MODE"),
    Renamed("CLICKPULSE_DEDUP_WINDOW_S", "CLICKPULSE_INGEST_DEDUP_WINDOW_MS", _S),
    Renamed("CLICKPULSE_MAX_PAYLOAD_BYTES", "CLICKPULSE_INGEST_MAX_PAYLOAD_BYTES"),
    Renamed("CLICKPULSE_MAX_FUTURE_S", "CLICKPULSE_INGEST_MAX_FUTURE_MS", _S),
    Renamed("CLICKPULSE_MAX_PAST_S", "CLICKPULSE_INGEST_MAX_PAST_MS", _S),
    Renamed("CLICKPULSE_INTERNAL_DOMAINS", "CLICKPULSE_INGEST_INTERNAL_DOMAINS"),
    Renamed("CLICKPULSE_ANONYMIZE_IP", "CLICKPULSE_INGEST_ANONYMIZE_IP"),
    Renamed("CLICKPULSE_REDIS_PREFIX", "CLICKPULSE_REDIS_KEY_PREFIX"),
    Renamed("CLICKPULSE_SESSION_GAP_S", "CLICKPULSE_SESSIONIZE_GAP_MS", _S),
    Renamed("CLICKPULSE_SESSION_MAX_S", "CLICKPULSE_SESSIONIZE_MAX_LENGTH_MS", _S),
    Renamed("CLICKPULSE_ALLOWED_LATENESS_S", "CLICKPULSE_SESSIONIZE_ALLOWED_LATENESS_MS", _S),
    Renamed("CLICKPULSE_OUT_OF_ORDERNESS_S", "CLICKPULSE_SESSIONIZE_OUT_OF_ORDERNESS_MS", _S),
    Renamed("CLICKPULSE_IDLE_TIMEOUT_S", "CLICKPULSE_SESSIONIZE_IDLE_TIMEOUT_MS", _S),
    Renamed("CLICKPULSE_SESSION_STATE_TTL_S", "CLICKPULSE_SESSIONIZE_STATE_TTL_MS", _S),
    Renamed("CLICKPULSE_SESSIONIZE_STATE_CACHE", "CLICKPULSE_SESSIONIZE_STATE_CACHE_KEYS"),
    Renamed("CLICKPULSE_LOAD_BATCH_MAX_SECONDS", "CLICKPULSE_LOAD_BATCH_MAX_AGE_MS", _S),
    Renamed("CLICKPULSE_LOAD_RETRY_INITIAL_S", "CLICKPULSE_LOAD_RETRY_INITIAL_MS", _S),
    Renamed("CLICKPULSE_LOAD_RETRY_MAX_S", "CLICKPULSE_LOAD_RETRY_MAX_MS", _S),
    Renamed("CLICKPULSE_LOAD_INSERT_TIMEOUT_S", "CLICKPULSE_LOAD_INSERT_TIMEOUT_MS", _S),
    Renamed("CLICKPULSE_LOADER_FAIL_AFTER_INSERT", "CLICKPULSE_LOAD_FAIL_AFTER_INSERT"),
    Renamed("CLICKPULSE_WEBHOOK_TIMEOUT_S", "CLICKPULSE_WEBHOOK_TIMEOUT_MS", _S),
    Renamed("CLICKPULSE_DISPATCH_SHUTDOWN_S", "CLICKPULSE_DISPATCH_SHUTDOWN_MS", _S),
    Renamed("CLICKPULSE_TRIGGERS_STATE_TTL_S", "CLICKPULSE_TRIGGERS_STATE_TTL_MS", _S),
    Renamed(
        "CLICKPULSE_TRIGGERS_RULES_SNAPSHOT_TIMEOUT_S", "CLICKPULSE_TRIGGERS_RULES_SNAPSHOT_TIMEOUT_MS", _S
    ),
    Renamed("CLICKPULSE_STARTUP_TIMEOUT_S", "CLICKPULSE_STACK_STARTUP_TIMEOUT_MS", _S),
)

_warned: set[str] = set()


def _scaled(value: str, scale: int) -> str:
    if scale == 1:
        return value
    try:
        return str(int(Decimal(value.strip()) * scale))
    except (InvalidOperation, ValueError):
        return value  # not a number: let the field's validation report it under the new name


def translate(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with every old name of :data:`RENAMED` also set under its new name (unless that is set).

    Logs a deprecation warning the first time this process sees each old name.
    """
    out = dict(env)
    for r in RENAMED:
        if r.old not in env:
            continue
        if r.old not in _warned:
            _warned.add(r.old)
            unit = " (in milliseconds: multiply by 1000)" if r.scale == _S else ""
            log.warning("%s is deprecated and will be removed: use %s%s", r.old, r.new, unit)
        if r.new not in env:
            out[r.new] = _scaled(env[r.old], r.scale)
    return out


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a ``stack.env``-style file (comments and blank lines skipped)."""
    from dotenv import dotenv_values

    return {k.upper(): v for k, v in dotenv_values(path).items() if v is not None}


def process_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) with names upper-cased and old names translated, without
    ``stack.env``: what the local stack reads to tell external services from its own."""
    return translate({k.upper(): v for k, v in (os.environ if environ is None else environ).items()})


def environment(environ: Mapping[str, str] | None = None, *, state_dir: Path | None = None) -> dict[str, str]:
    """The configuration mapping every settings area is read from: the only place the environment is read.

    ``environ`` (default ``os.environ``) wins over ``<state dir>/stack.env`` (the state directory is
    ``state_dir``, else ``CLICKPULSE_STATE_DIR``, else ``.clickpulse``); names are upper-cased and old
    names translated (:func:`translate`). Call it from ``main()``, never at import time.
    """
    env = process_environment(environ)
    root = state_dir if state_dir is not None else Path(env.get(STATE_DIR_VAR) or DEFAULT_STATE_DIR)
    env_file = root / STACK_ENV
    if env_file.is_file():
        env = {**translate(read_env_file(env_file)), **env}
    return env


# ------------------------------------------------------------------------------------------- areas


class Settings(BaseSettings):
    """Base of every settings area: frozen, and filled only from what it is given (see :meth:`from_env`).

    Fields are set by their variable name (the alias) or their field name; pydantic-settings' own
    environment and dotenv sources are off, so a settings object never reads the environment itself.
    """

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values passed in (see the class docstring)."""
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Self:
        """Build from ``env`` (see :func:`environment`), overridden by ``overrides``.

        ``overrides`` is keyed by field name (e.g. parsed command-line options); ``None`` values and
        names that are not fields of this area are ignored, so one options mapping serves every area.
        """
        values: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            if info.alias and info.alias in env:
                values[name] = env[info.alias]
        for name, value in (overrides or {}).items():
            if value is not None and name in cls.model_fields:
                values[name] = value
        return cls(**values)


class KafkaSecurityProtocol(StrEnum):
    """How clients talk to the brokers (Kafka's ``security.protocol``)."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class Connections(Settings):
    """Where the services are and how to reach them: shared by every job, the CLI and the local stack."""

    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", alias="KAFKA_BOOTSTRAP_SERVERS")
    """``KAFKA_BOOTSTRAP_SERVERS``: comma-separated ``host:port`` list (default ``127.0.0.1:9092``)."""
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        KafkaSecurityProtocol.PLAINTEXT, alias="CLICKPULSE_KAFKA_SECURITY_PROTOCOL"
    )
    """``CLICKPULSE_KAFKA_SECURITY_PROTOCOL``: ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT`` or
    ``SASL_SSL``, for every Kafka client (Flink's sources and sinks, the loader, dispatch, the CLI)."""
    kafka_sasl_mechanism: str = Field("", alias="CLICKPULSE_KAFKA_SASL_MECHANISM")
    """``CLICKPULSE_KAFKA_SASL_MECHANISM``: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512`` with a
    ``SASL_*`` protocol (default empty)."""
    kafka_sasl_username: str = Field("", alias="CLICKPULSE_KAFKA_SASL_USERNAME")
    """``CLICKPULSE_KAFKA_SASL_USERNAME``: SASL user (default empty)."""
    kafka_sasl_password: SecretStr = Field(SecretStr(""), alias="CLICKPULSE_KAFKA_SASL_PASSWORD")
    """``CLICKPULSE_KAFKA_SASL_PASSWORD``: SASL password (default empty)."""
    kafka_ssl_ca_file: Path | None = Field(None, alias="CLICKPULSE_KAFKA_SSL_CA_FILE")
    """``CLICKPULSE_KAFKA_SSL_CA_FILE``: PEM file of the CA that signed the brokers' certificates
    (default: the system's trust store)."""
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"), alias="REDIS_URL")
    """``REDIS_URL``: ``redis://[:password@]host:port/db`` (default ``redis://127.0.0.1:6379/0``)."""
    clickhouse_url: SecretStr = Field(SecretStr("http://127.0.0.1:8123"), alias="CLICKHOUSE_URL")
    """``CLICKHOUSE_URL``: ``http(s)://[user:password@]host:port`` (default ``http://127.0.0.1:8123``)."""
    clickhouse_database: str = Field("clickpulse", alias="CLICKPULSE_CLICKHOUSE_DATABASE")
    """``CLICKPULSE_CLICKHOUSE_DATABASE``: the ClickHouse database (default ``clickpulse``; ``--database``
    of ``clickpulse migrate`` and ``clickpulse run load`` overrides it)."""
    topic_prefix: str = Field("", alias="CLICKPULSE_TOPIC_PREFIX")
    """``CLICKPULSE_TOPIC_PREFIX``: prepended to every contract topic name (default empty)."""
    state_dir: Path = Field(Path(DEFAULT_STATE_DIR), alias=STATE_DIR_VAR)
    """``CLICKPULSE_STATE_DIR``: local state (``stack.env``, the local stack's data, local checkpoints;
    default ``.clickpulse``)."""

    def topic(self, name: str) -> str:
        """Full name of a contract topic, with the configured prefix."""
        return f"{self.topic_prefix}{name}"

    def kafka_security_options(self) -> dict[str, Any]:
        """TLS/SASL options of kafka-python clients (``KafkaConsumer(bootstrap_servers=..., **these)``)."""
        opts: dict[str, Any] = {"security_protocol": self.kafka_security_protocol.value}
        if self.kafka_sasl_mechanism:
            opts["sasl_mechanism"] = self.kafka_sasl_mechanism
            opts["sasl_plain_username"] = self.kafka_sasl_username
            opts["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_ca_file is not None:
            opts["ssl_cafile"] = str(self.kafka_ssl_ca_file)
        return opts

    def kafka_properties(self) -> dict[str, str]:
        """The same options as Java client properties (Flink's Kafka connector, ``properties.*`` keys)."""
        props = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "security.protocol": self.kafka_security_protocol.value,
        }
        if self.kafka_sasl_mechanism:
            module = (
                "org.apache.kafka.common.security.plain.PlainLoginModule"
                if self.kafka_sasl_mechanism.upper() == "PLAIN"
                else "org.apache.kafka.common.security.scram.ScramLoginModule"
            )
            user = self.kafka_sasl_username.replace("\\", "\\\\").replace('"', '\\"')
            password = self.kafka_sasl_password.get_secret_value().replace("\\", "\\\\").replace('"', '\\"')
            props["sasl.mechanism"] = self.kafka_sasl_mechanism
            props["sasl.jaas.config"] = f'{module} required username="{user}" password="{password}";'
        if self.kafka_ssl_ca_file is not None:
            props["ssl.truststore.type"] = "PEM"
            props["ssl.truststore.location"] = str(self.kafka_ssl_ca_file)
        return props


class StartingOffsets(StrEnum):
    """Where a job starts reading when it has no checkpoint or committed offset to resume from."""

    EARLIEST = "earliest"
    LATEST = "latest"
    COMMITTED = "committed"  # the group's committed offsets, falling back to earliest


class ConsumerSettings(Settings):
    """How a job reads its input topics: every job has these (``clickpulse run JOB --help``)."""

    group_id: str = Field("", alias="CLICKPULSE_JOB_GROUP_ID")
    """``CLICKPULSE_JOB_GROUP_ID`` / ``--group-id``: consumer group (default ``clickpulse-<job>``; it also
    names the job's Kafka transactional ids)."""
    starting_offsets: StartingOffsets = Field(
        StartingOffsets.COMMITTED, alias="CLICKPULSE_JOB_STARTING_OFFSETS"
    )
    """``CLICKPULSE_JOB_STARTING_OFFSETS`` / ``--starting-offsets``: ``earliest``, ``latest`` or
    ``committed`` (default; falls back to earliest)."""
    bounded: bool = Field(False, alias="CLICKPULSE_JOB_BOUNDED")
    """``CLICKPULSE_JOB_BOUNDED`` / ``--bounded``: stop at the offsets that were latest at start (default
    off)."""
    log_interval_ms: int = Field(10_000, alias="CLICKPULSE_JOB_LOG_INTERVAL_MS", gt=0)
    """``CLICKPULSE_JOB_LOG_INTERVAL_MS``: period of the job's one-line counter log (default 10000)."""

    def group(self, job: str) -> str:
        """The consumer group of ``job``: the configured one, else ``clickpulse-<job>``."""
        return self.group_id or f"clickpulse-{job}"


def add_consumer_args(p: argparse.ArgumentParser) -> None:
    """The command-line options of :class:`ConsumerSettings` (every job accepts them)."""
    p.add_argument("--group-id", default=None, help="consumer group (default clickpulse-<job>)")
    p.add_argument(
        "--starting-offsets",
        choices=[s.value for s in StartingOffsets],
        default=None,
        help="where to start without a checkpoint or committed offsets (default committed, else earliest)",
    )
    p.add_argument(
        "--bounded", action="store_const", const=True, default=None, help="stop at today's end offsets"
    )


def seconds_flag(value: str) -> int:
    """``type=`` of a deprecated command-line flag given in seconds: its value in milliseconds."""
    try:
        return int(Decimal(value) * 1000)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None


# -------------------------------------------------------------------------------------- composition

T = TypeVar("T")


def compose(kind: type[T], env: Mapping[str, str], options: Mapping[str, Any] | None = None) -> T:
    """A job's settings: ``kind`` is a frozen dataclass whose fields are settings areas; each area is
    read from ``env`` with the command-line ``options`` that name its fields."""
    hints = get_type_hints(kind)
    return kind(**{f.name: hints[f.name].from_env(env, options) for f in dataclasses.fields(kind)})  # type: ignore[arg-type]


def declared_variables() -> frozenset[str]:
    """Every variable a settings area declares, of the areas imported so far, old names of
    :data:`RENAMED` included: configuration, so never a webhook secret (``udfs.rules.check_secret_env``)."""
    names = {name for r in RENAMED for name in (r.old, r.new)} | {STATE_DIR_VAR, *CONTRACT_VARS}
    pending: list[type[Settings]] = [Settings]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        names.update(info.alias for info in cls.model_fields.values() if info.alias)
    return frozenset(names)


def load_connections(state_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> Connections:
    """:class:`Connections` from the environment (default ``os.environ``) over ``<state dir>/stack.env``."""
    return Connections.from_env(environment(environ, state_dir=state_dir))


def child_environment(conn: Connections, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a job subprocess: ``environ`` (default this process's), without any clickpulse
    setting (a leftover ``CLICKPULSE_*`` from the caller's shell must not reach the job), pointed at
    ``conn``'s services."""
    env = {
        k: v
        for k, v in (os.environ if environ is None else environ).items()
        if not k.startswith("CLICKPULSE_") and k not in CONTRACT_VARS
    }
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=conn.kafka_bootstrap_servers,
        REDIS_URL=conn.redis_url.get_secret_value(),
        CLICKHOUSE_URL=conn.clickhouse_url.get_secret_value(),
    )
    return env
