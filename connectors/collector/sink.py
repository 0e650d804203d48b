"""``events.raw`` behind an ``await``: a kafka-python producer whose blocking calls run off the event loop.

:meth:`KafkaSink.publish` returns once the broker has acknowledged every record of a request (``acks=all``,
idempotent producer) and raises :class:`Unavailable` when that does not happen within the ack timeout:
the collector then answers 503 and the client retries. A record that times out here may still reach Kafka
later; its retry carries the same ``message_id`` and the ingest job drops the duplicate, so nothing the
collector acknowledged is lost and nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from connectors import kafka as kafka_io
from connectors.collector.protocol import RawRecord

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """Kafka did not acknowledge the request's records in time (or could not be reached)."""


class _Acks:
    """Counts the acknowledgements of one request; completes an asyncio future on the last one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self._left = expected
        self._lock = threading.Lock()
        self._done = False

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            if self._done:
                return
            if error is None:
                self._left -= 1
                if self._left > 0:
                    return
            self._done = True
        self.loop.call_soon_threadsafe(self._resolve, error)

    def _resolve(self, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(Unavailable(f"kafka refused a record: {type(error).__name__}"))

    def ok(self, _metadata: Any) -> None:
        """Callback of one acknowledged record (runs on the producer's thread)."""
        self._finish(None)

    def failed(self, error: BaseException) -> None:
        """Errback of one failed record."""
        self._finish(error)


class KafkaSink:
    """Publishes records to one topic; creates its producer lazily, so a collector starts without Kafka."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        ack_timeout_ms: int,
        security: dict[str, Any] | None = None,
        producer_factory: Callable[..., KafkaProducer] = kafka_io.producer,
    ) -> None:
        """``security``: :meth:`connectors.settings.Connections.kafka_security_options`."""
        self.bootstrap = bootstrap
        self.topic = topic
        self.ack_timeout_s = ack_timeout_ms / 1000
        self._security = security or {}
        self._factory = producer_factory
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        # True once a send was acknowledged: the producer then knows the topic's partitions, and send() only
        # appends to its buffer (the sender thread does the I/O), so it is called on the event loop directly
        self._warm = False
        self._ok = True  # False from a publish that was not acknowledged until one is (see connected())
        # blocking producer calls (connect, metadata, a full buffer) wait here, not on the event loop
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="collector-kafka")

    def _get(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                self._producer = self._factory(
                    self.bootstrap,
                    client_id="clickpulse-collector",
                    linger_ms=2,
                    max_block_ms=int(self.ack_timeout_s * 1000),
                    **self._security,
                )
            return self._producer

    def _send(self, records: Sequence[RawRecord], timestamp_ms: int, acks: _Acks) -> None:
        producer = self._get()
        for r in records:
            fut = producer.send(self.topic, key=r.key, value=r.value, timestamp_ms=timestamp_ms)
            fut.add_callback(acks.ok)
            fut.add_errback(acks.failed)

    async def publish(self, records: Sequence[RawRecord], timestamp_ms: int) -> None:
        """Send ``records`` (Kafka timestamp ``timestamp_ms``, the receive time) and wait for every ack."""
        if not records:
            return
        loop = asyncio.get_running_loop()
        acks = _Acks(loop, len(records))
        deadline = loop.time() + self.ack_timeout_s
        try:
            if self._warm:
                self._send(records, timestamp_ms, acks)
            else:  # connecting and the first metadata fetch block: in a thread
                await asyncio.wait_for(
                    loop.run_in_executor(self._executor, self._send, records, timestamp_ms, acks),
                    self.ack_timeout_s,
                )
            await asyncio.wait_for(acks.future, max(0.0, deadline - loop.time()))
            self._warm = self._ok = True
        except TimeoutError:
            self._warm = self._ok = False
            raise Unavailable(f"kafka did not acknowledge within {self.ack_timeout_s:g}s") from None
        except KafkaError as e:
            self._warm = self._ok = False
            raise Unavailable(f"kafka: {type(e).__name__}") from None
        except Unavailable:
            self._ok = False
            raise
        finally:
            if not acks.future.done():
                acks.future.cancel()  # late callbacks find it done and do nothing

    def connected(self) -> bool:
        """False from a request Kafka did not acknowledge until the next one it did (for ``/health``);
        True before the first request."""
        return self._ok

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is buffered (up to ``timeout_s``) and close."""
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.flush(timeout=timeout_s)
            except KafkaError as e:
                log.warning("collector: records still unsent at shutdown: %s", type(e).__name__)
            producer.close(timeout=timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)
