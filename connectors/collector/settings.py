"""Options of the HTTP collector (``clickpulse collector``, ``python -m connectors.collector``)."""

from __future__ import annotations

import argparse
import ipaddress

from pydantic import Field, SecretStr, field_validator

from connectors.settings import Settings

#: The contract variable of the local stack naming where the collector listens (``stack.env``).
COLLECTOR_URL_VAR = "CLICKPULSE_COLLECTOR_URL"
#: The contract variable holding the write key(s) (``stack.env``).
WRITE_KEY_VAR = "CLICKPULSE_WRITE_KEY"


class CollectorSettings(Settings):
    """Where the collector listens, who may write, and the limits of a request."""

    host: str = Field("127.0.0.1", alias="CLICKPULSE_COLLECTOR_HOST")
    """``CLICKPULSE_COLLECTOR_HOST`` / ``--host``: address to bind (default ``127.0.0.1``; ``0.0.0.0`` in a
    container)."""
    port: int = Field(8088, alias="CLICKPULSE_COLLECTOR_PORT", ge=0, le=65535)
    """``CLICKPULSE_COLLECTOR_PORT`` / ``--port``: TCP port (default 8088)."""
    write_key: SecretStr = Field(SecretStr(""), alias=WRITE_KEY_VAR)
    """``CLICKPULSE_WRITE_KEY``: comma-separated write keys the collector accepts (the HTTP Basic user, or
    ``writeKey`` in the body or query); a secret, never logged (default empty: the collector refuses to
    start)."""
    trusted_proxies: str = Field("", alias="CLICKPULSE_COLLECTOR_TRUSTED_PROXIES")
    """``CLICKPULSE_COLLECTOR_TRUSTED_PROXIES``: comma-separated CIDRs of load balancers whose
    ``X-Forwarded-For`` is believed (default empty: the connection's peer is the client)."""
    cors_origins: str = Field("*", alias="CLICKPULSE_COLLECTOR_CORS_ORIGINS")
    """``CLICKPULSE_COLLECTOR_CORS_ORIGINS``: comma-separated origins web pages may send from, or ``*``
    for any (default ``*``: a tracking endpoint is called from every site that embeds the script)."""
    max_event_bytes: int = Field(32 * 1024, alias="CLICKPULSE_COLLECTOR_MAX_EVENT_BYTES", gt=0)
    """``CLICKPULSE_COLLECTOR_MAX_EVENT_BYTES``: largest event, as the JSON record written to
    ``events.raw``; larger ones get 413 (default 32768, the ingest job's cap)."""
    max_batch_bytes: int = Field(500 * 1024, alias="CLICKPULSE_COLLECTOR_MAX_BATCH_BYTES", gt=0)
    """``CLICKPULSE_COLLECTOR_MAX_BATCH_BYTES``: largest request body after decompression; larger ones get
    413 (default 512000)."""
    ack_timeout_ms: int = Field(5000, alias="CLICKPULSE_COLLECTOR_ACK_TIMEOUT_MS", gt=0)
    """``CLICKPULSE_COLLECTOR_ACK_TIMEOUT_MS``: how long a request waits for Kafka to acknowledge all its
    events before it is answered 503 (default 5000)."""
    retry_after_ms: int = Field(5000, alias="CLICKPULSE_COLLECTOR_RETRY_AFTER_MS", ge=0)
    """``CLICKPULSE_COLLECTOR_RETRY_AFTER_MS``: the ``Retry-After`` of a 503, rounded up to whole seconds
    (default 5000)."""
    max_pending_requests: int = Field(2000, alias="CLICKPULSE_COLLECTOR_MAX_PENDING_REQUESTS", gt=0)
    """``CLICKPULSE_COLLECTOR_MAX_PENDING_REQUESTS``: requests waiting for Kafka at once; beyond it new ones
    get 503 at once instead of queueing without bound (default 2000)."""

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: str) -> str:
        for part in _split(value):
            ipaddress.ip_network(part, strict=False)  # ValueError names the bad one
        return value

    def write_keys(self) -> frozenset[str]:
        """The accepted write keys."""
        return frozenset(_split(self.write_key.get_secret_value()))

    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The trusted proxies, parsed."""
        return tuple(ipaddress.ip_network(p, strict=False) for p in _split(self.trusted_proxies))

    def origins(self) -> frozenset[str]:
        """The allowed CORS origins (``*`` for any)."""
        return frozenset(_split(self.cors_origins))


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def add_collector_args(p: argparse.ArgumentParser) -> None:
    """The command-line options of :class:`CollectorSettings` (the rest comes from the environment)."""
    p.add_argument(
        "--host", default=None, help="address to bind (default CLICKPULSE_COLLECTOR_HOST, 127.0.0.1)"
    )
    p.add_argument("--port", type=int, default=None, help="port (default CLICKPULSE_COLLECTOR_PORT, 8088)")
