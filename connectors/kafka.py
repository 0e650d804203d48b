"""Kafka adapters built on kafka-python: admin (topics, health) and a plain producer factory."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger(__name__)


def admin(bootstrap: str, *, timeout_s: float = 10.0, **security: Any) -> KafkaAdminClient:
    """Connect an admin client (raises ``kafka.errors.NoBrokersAvailable`` when nothing answers).

    ``security``: TLS/SASL client options, :meth:`connectors.settings.Connections.kafka_security_options`
    (every function here takes them).
    """
    return KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="clickpulse-admin",
        request_timeout_ms=int(timeout_s * 1000),
        **security,
    )


def _any_port_open(bootstrap: str, timeout_s: float) -> bool:
    for hostport in bootstrap.split(","):
        host, _, port = hostport.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def reachable(bootstrap: str, *, timeout_s: float = 3.0) -> bool:
    """True when a TCP connection to one of the ``bootstrap`` brokers opens (no Kafka request: works
    before TLS/SASL options are known)."""
    return _any_port_open(bootstrap, timeout_s)


def is_healthy(bootstrap: str, *, timeout_s: float = 3.0) -> bool:
    """True when the broker answers a metadata request."""
    if not _any_port_open(bootstrap, timeout_s):
        return False
    try:
        client = admin(bootstrap, timeout_s=timeout_s)
    except KafkaError:
        return False
    try:
        client.list_topics()
        return True
    except KafkaError:
        return False
    finally:
        client.close()


def wait_healthy(bootstrap: str, *, timeout_s: float = 90.0) -> None:
    """Block until the broker answers, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_healthy(bootstrap):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Kafka at {bootstrap} did not become healthy within {timeout_s:.0f}s")


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, Mapping[str, str]],
    *,
    partitions: int = 4,
    replication_factor: int = 1,
    progress: Callable[[str], None] | None = None,
    **security: Any,
) -> list[str]:
    """Create every topic in ``topics`` (name -> topic configs) that does not exist yet.

    Returns the names it created. Existing topics are left as they are (partition counts are not
    changed behind an operator's back). ``progress(name)`` is called once per topic of ``topics``, when it
    is known to exist.
    """
    client = admin(bootstrap, **security)
    try:
        existing = set(client.list_topics())
        missing = [
            NewTopic(name, partitions, replication_factor, topic_configs=dict(cfg))
            for name, cfg in topics.items()
            if name not in existing
        ]
        created: list[str] = []
        if progress is not None:
            for name in topics:
                if name in existing:
                    progress(name)
        for topic in missing:
            try:
                client.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                log.debug("topic %s appeared concurrently", topic.name)
            if progress is not None:
                progress(topic.name)
        if created:
            log.debug("created topics: %s", ", ".join(created))
        return created
    finally:
        client.close()


def delete_topics(bootstrap: str, names: Iterable[str], **security: Any) -> None:
    """Delete topics (used by tests to clean up their own topics)."""
    client = admin(bootstrap, **security)
    try:
        existing = set(client.list_topics())
        todo = [n for n in names if n in existing]
        if todo:
            client.delete_topics(todo)
    finally:
        client.close()


def topic_ids(bootstrap: str, names: Iterable[str], **security: Any) -> dict[str, str]:
    """Kafka's id (KIP-516 UUID, as text) of each existing topic in ``names``; '' where the broker gives none.

    The id tells two incarnations of a topic name apart (deleted and created again).
    """
    wanted = list(names)
    client = admin(bootstrap, **security)
    try:
        described = client.describe_topics(wanted)
    finally:
        client.close()
    out: dict[str, str] = {}
    for t in described:
        if t.get("error_code", 0) == 0 and t.get("name") in wanted:
            tid = "" if t.get("topic_id") is None else str(t["topic_id"])
            out[t["name"]] = "" if tid.strip("0-") == "" else tid  # the zero UUID means "no id"
    return out


def producer(bootstrap: str, **overrides: object) -> KafkaProducer:
    """A producer tuned for throughput on loopback (idempotent, lz4, 64 KiB batches, 5 ms linger)."""
    config: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "client_id": "clickpulse-producer",
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": "lz4",
        "linger_ms": 5,
        "batch_size": 64 * 1024,
        "max_request_size": 4 * 1024 * 1024,
    }
    config.update(overrides)
    return KafkaProducer(**config)
