"""Kafka adapters built on kafka-python: admin (topics, health) and a plain producer factory."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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


#: A group consumer with no partition assigned this long joins the group once more (then twice as long,
#: up to :data:`REJOIN_MAX_WAIT_S`, while it stays unassigned).
REJOIN_AFTER_S = 15.0
REJOIN_MAX_WAIT_S = 300.0


def await_topic_metadata(consumer: Any, topics: Iterable[str], timeout_s: float = 5.0) -> list[str]:
    """Block (up to ``timeout_s``) until ``consumer``'s metadata names every one of ``topics``.

    Call before ``subscribe``: the group leader assigns only partitions its metadata knows, so a consumer
    that joins first can be handed nothing until the next rebalance (kafka-python usually rejoins at
    once when the metadata arrives; CI once saw a dispatch process not do so for minutes, hence also
    :class:`GroupJoin`'s second join). Returns the topics still unknown at the deadline (a topic that
    does not exist yet): the caller subscribes anyway, so a missing topic delays its start by
    ``timeout_s`` at most.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(topics)
    while pending and time.monotonic() < deadline:
        try:
            pending = [t for t in pending if not consumer.partitions_for_topic(t)]
        except KafkaError as exc:
            log.debug("metadata of %s not there yet: %s", ", ".join(pending), exc)
        if pending:
            time.sleep(0.2)
    return pending


class GroupJoin:
    """How a long-running group consumer subscribes: topic metadata first, and another join when left out.

    ``subscribe()`` waits (briefly) for the topics' metadata, then subscribes. ``check(assigned)``, called
    from the consumer's loop with whether the consumer holds any partition now, joins the group again
    when it has held none for :data:`REJOIN_AFTER_S`, whenever that happens: after the first join, or
    after a rebalance took everything away. A rebalance normally hands partitions back within ~100 ms
    (every loader log shows it), but kafka-python 3 was seen leaving a consumer without any for minutes:
    once at start-up (a dispatch process), and once revoking the loader's whole assignment 160 ms after
    granting it while the broker restarted (the chaos test, where the loader then loaded nothing).

    While the consumer stays unassigned the wait doubles after every extra join, up to
    :data:`REJOIN_MAX_WAIT_S`: in a group with more consumers than partitions an empty assignment is
    legitimate, and each join makes the whole group rebalance, so such a consumer asks rarely. Holding a
    partition again resets the wait.
    """

    def __init__(
        self,
        consumer: Any,
        topics: Sequence[str],
        *,
        listener: Any = None,
        rejoin_after_s: float = REJOIN_AFTER_S,
        max_wait_s: float = REJOIN_MAX_WAIT_S,
        metadata_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Subscribe ``consumer`` to ``topics`` (with the rebalance ``listener``) when asked."""
        self.consumer = consumer
        self.topics = list(topics)
        self.listener = listener
        self.rejoin_after_s = rejoin_after_s
        self.max_wait_s = max(max_wait_s, rejoin_after_s)
        self.metadata_timeout_s = metadata_timeout_s
        self.clock = clock
        self.rejoins = 0  #: extra joins made
        self._wait_s = rejoin_after_s
        self._unassigned_since: float | None = None

    def subscribe(self) -> None:
        """Wait for the topics' metadata (a few seconds at most), then subscribe."""
        missing = await_topic_metadata(self.consumer, self.topics, self.metadata_timeout_s)
        if missing:
            log.info("no metadata for %s yet (not created?); subscribing anyway", ", ".join(missing))
        if self.listener is None:
            self.consumer.subscribe(self.topics)
        else:
            self.consumer.subscribe(self.topics, listener=self.listener)
        self._unassigned_since = self.clock()

    def check(self, assigned: bool) -> bool:
        """Join again if nothing has been ``assigned`` for the current wait; True when it did."""
        now = self.clock()
        if assigned:
            self._unassigned_since = None
            self._wait_s = self.rejoin_after_s
            return False
        if self._unassigned_since is None:
            self._unassigned_since = now
            return False
        if now - self._unassigned_since <= self._wait_s:
            return False
        self.rejoins += 1
        self._wait_s = min(self._wait_s * 2, self.max_wait_s)
        log.warning("no partition of %s assigned for %.0fs: joining the group again (extra join %d; the "
                    "next after %.0fs more without one)", ", ".join(self.topics),
                    now - self._unassigned_since, self.rejoins, self._wait_s)  # fmt: skip
        self.consumer.unsubscribe()
        self.subscribe()
        return True


class TolerantPoll:
    """``consumer.poll`` that rides out a broker that is briefly away.

    kafka-python 3 can raise a retriable error (``KafkaConnectionError: ECONNREFUSED`` while it looks for
    the group coordinator) from ``poll`` when the broker restarts: the chaos test's dispatch process
    exited with it. A long-running consumer loop treats that as "nothing this round": it logs (at most every
    ``warn_every_s``), waits up to ``backoff_s`` and returns no records. Errors that are not retriable
    (authorization, bad configuration) still raise.
    """

    def __init__(self, what: str, *, backoff_s: float = 0.5, warn_every_s: float = 10.0) -> None:
        """Name the loop ``what`` in log lines."""
        self.what = what
        self.backoff_s = backoff_s
        self.warn_every_s = warn_every_s
        self.errors = 0  #: polls that failed (counted, never silent)
        self._warned_at = float("-inf")
        self._in_outage = False

    def __call__(self, consumer: Any, timeout_ms: int, **kwargs: Any) -> dict[Any, list[Any]]:
        """The records of one ``consumer.poll(timeout_ms, **kwargs)``; ``{}`` after a retriable error."""
        try:
            batch: dict[Any, list[Any]] = consumer.poll(timeout_ms=timeout_ms, **kwargs)
        except KafkaError as exc:
            if not exc.retriable:
                raise
            self.errors += 1
            now = time.monotonic()
            if now - self._warned_at >= self.warn_every_s:
                self._warned_at = now
                log.warning("%s: Kafka unavailable (%s); retrying (%d failed polls so far)",
                            self.what, exc, self.errors)  # fmt: skip
            self._in_outage = True
            time.sleep(min(self.backoff_s, max(timeout_ms, 1) / 1000))
            return {}
        if self._in_outage:
            self._in_outage = False
            log.info("%s: Kafka reachable again after %d failed polls", self.what, self.errors)
        return batch
