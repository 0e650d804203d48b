"""Connection settings shared by every job and by the CLI.

Values come from the environment first and then from ``.clickpulse/stack.env`` (written by
``clickpulse stack up``), so a shell without any variables set talks to the local stack and a shell
with ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` / ``CLICKHOUSE_URL`` set talks to those services.
Nothing here reads the environment at import time: call :func:`load_connections` from ``main()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Contract topics and the topic-level configs they are created with.
CONTRACT_TOPICS: dict[str, dict[str, str]] = {
    "events.raw": {},
    "events.enriched": {},
    "events.dlq": {},
    "events.late": {},
    "sessions": {},
    "rules": {"cleanup.policy": "compact"},
    "actions": {},
    "actions.dlq": {},
}


def home_dir() -> Path:
    """Directory holding the local stack's state (``CLICKPULSE_HOME``, default ``./.clickpulse``)."""
    return Path(os.environ.get("CLICKPULSE_HOME", ".clickpulse")).resolve()


class Connections(BaseSettings):
    """Where the services are. Every field names the environment variable it is read from."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", alias="KAFKA_BOOTSTRAP_SERVERS")
    """``KAFKA_BOOTSTRAP_SERVERS``: comma-separated ``host:port`` list (default ``127.0.0.1:9092``)."""

    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"), alias="REDIS_URL")
    """``REDIS_URL``: ``redis://[:password@]host:port/db`` (default ``redis://127.0.0.1:6379/0``)."""

    clickhouse_url: SecretStr = Field(SecretStr("http://127.0.0.1:8123"), alias="CLICKHOUSE_URL")
    """``CLICKHOUSE_URL``: ``http://[user:password@]host:port`` (default ``http://127.0.0.1:8123``)."""

    topic_prefix: str = Field("", alias="CLICKPULSE_TOPIC_PREFIX")
    """``CLICKPULSE_TOPIC_PREFIX``: prepended to every contract topic name (default empty)."""

    def topic(self, name: str) -> str:
        """Full name of a contract topic, with the configured prefix."""
        return f"{self.topic_prefix}{name}"


def by_alias(cls: type[BaseSettings], values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` keyed by field name (e.g. parsed command-line options), re-keyed by each field's alias.

    Settings classes take init values by alias only: ``populate_by_name`` would also make
    pydantic-settings read the bare field name from the environment (``HOME`` would set ``home``).
    Keys that are not fields are kept as they are (and ignored by the class).
    """
    fields = cls.model_fields
    return {(fields[k].alias or k) if k in fields else k: v for k, v in values.items()}


def child_environment(conn: Connections) -> dict[str, str]:
    """The environment for a job subprocess: this process's, without any clickpulse setting (a leftover
    ``CLICKPULSE_*`` from the caller's shell must not reach the job), pointed at ``conn``'s services."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CLICKPULSE_")
        and k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "CLICKHOUSE_URL")
    }
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=conn.kafka_bootstrap_servers,
        REDIS_URL=conn.redis_url.get_secret_value(),
        CLICKHOUSE_URL=conn.clickhouse_url.get_secret_value(),
    )
    return env


def load_connections(home: Path | None = None) -> Connections:
    """Build :class:`Connections` from the environment, falling back to ``<home>/stack.env``."""
    env_file = (home or home_dir()) / "stack.env"
    if env_file.is_file():
        return Connections(_env_file=env_file)
    return Connections()
