"""Webhook delivery settings and the one way to start the dispatch loop.

Used by ``jobs.dispatch`` (the loop on its own) and ``jobs.triggers`` (the loop inside the triggers
driver); the loop itself is :class:`connectors.actions.ActionDispatch`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import Field, field_validator

from connectors.actions import DispatchConfig
from connectors.settings import Connections, ConsumerSettings, Settings, StartingOffsets, declared_variables
from connectors.webhook import RetryPolicy
from udfs.rules import DEFAULT_SECRET_ENV, Allowlist, Rule, check_secret_env, load_rules_file


class DispatchSettings(Settings):
    """Options of webhook delivery: the rule book, destinations, retries and the consumer's flow control."""

    rules_file: Path | None = Field(None, alias="CLICKPULSE_RULES_FILE")
    """``CLICKPULSE_RULES_FILE`` / ``--rules``: YAML rules file, overlaid by the ``rules`` topic (default
    none: rules come from the topic only)."""
    webhook_allowlist: str = Field("localhost,127.0.0.0/8,::1", alias="CLICKPULSE_WEBHOOK_ALLOWLIST")
    """``CLICKPULSE_WEBHOOK_ALLOWLIST`` / ``--webhook-allowlist``: comma-separated hosts, ``*.suffix``
    patterns and CIDRs webhooks may target (default ``localhost,127.0.0.0/8,::1``: loopback only)."""
    webhook_secret_env: str = Field(DEFAULT_SECRET_ENV, alias="CLICKPULSE_WEBHOOK_SECRET_ENV")
    """``CLICKPULSE_WEBHOOK_SECRET_ENV``: variable holding the HMAC secret of rules without ``secret_env``;
    like ``secret_env``, ``CLICKPULSE_WEBHOOK_SECRET`` or ``CLICKPULSE_WEBHOOK_SECRET_<SUFFIX>``, not
    ending in ``_ENV`` and no setting (default ``CLICKPULSE_WEBHOOK_SECRET``)."""
    webhook_timeout_ms: int = Field(5000, alias="CLICKPULSE_WEBHOOK_TIMEOUT_MS", gt=0)
    """``CLICKPULSE_WEBHOOK_TIMEOUT_MS``: per-request timeout of rules without ``timeout`` (default 5000)."""
    webhook_max_attempts: int = Field(6, alias="CLICKPULSE_WEBHOOK_MAX_ATTEMPTS", gt=0)
    """``CLICKPULSE_WEBHOOK_MAX_ATTEMPTS`` / ``--webhook-max-attempts``: attempts before an action goes to
    ``actions.dlq`` (default 6)."""
    webhook_backoff_base_ms: int = Field(500, alias="CLICKPULSE_WEBHOOK_BACKOFF_BASE_MS", ge=0)
    """``CLICKPULSE_WEBHOOK_BACKOFF_BASE_MS``: back-off before retry n is uniform in
    ``[0, min(max, base * 2**(n-1))]`` (default 500)."""
    webhook_backoff_max_ms: int = Field(30_000, alias="CLICKPULSE_WEBHOOK_BACKOFF_MAX_MS", ge=0)
    """``CLICKPULSE_WEBHOOK_BACKOFF_MAX_MS``: cap of one back-off delay (default 30000)."""
    webhook_concurrency: int = Field(16, alias="CLICKPULSE_WEBHOOK_CONCURRENCY", gt=0)
    """``CLICKPULSE_WEBHOOK_CONCURRENCY``: concurrent requests (keep-alive connections) per destination
    (default 16). One destination's throughput is this divided by its response time: at 4, a receiver
    answering in 50 ms took 80 actions/s, below the demo's fire rate, and webhooks queued for seconds."""
    webhook_max_queue: int = Field(10_000, alias="CLICKPULSE_WEBHOOK_MAX_QUEUE", gt=0)
    """``CLICKPULSE_WEBHOOK_MAX_QUEUE``: unsettled actions held in memory per destination; beyond it new
    ones for that destination are spilled to ``actions.retry`` and read back as it drains (default 10000)."""
    dispatch_max_in_flight: int = Field(20_000, alias="CLICKPULSE_DISPATCH_MAX_IN_FLIGHT", gt=0)
    """``CLICKPULSE_DISPATCH_MAX_IN_FLIGHT``: unsettled actions above which each backlogged destination keeps
    only a fair share in memory and spills the rest; the consumer pauses only while this many wait for
    the broker's ack of their spill or DLQ record (default 20000)."""
    dispatch_rules_wait_ms: int = Field(2000, alias="CLICKPULSE_DISPATCH_RULES_WAIT_MS", ge=0)
    """``CLICKPULSE_DISPATCH_RULES_WAIT_MS``: how long an action naming an unknown rule waits for the rules
    topic to catch up before it is dead-lettered (default 2000)."""
    dispatch_shutdown_ms: int = Field(5000, alias="CLICKPULSE_DISPATCH_SHUTDOWN_MS", ge=0)
    """``CLICKPULSE_DISPATCH_SHUTDOWN_MS``: on stop, time to finish deliveries in flight; the rest is left
    uncommitted and re-delivered by the next run (default 5000)."""

    @field_validator("webhook_secret_env")
    @classmethod
    def _a_secret_variable(cls, value: str) -> str:
        return check_secret_env(value, declared_variables())

    def allowlist(self) -> Allowlist:
        """The parsed destination allowlist."""
        return Allowlist.parse(self.webhook_allowlist.split(","))

    def file_rules(self) -> list[Rule]:
        """Rules of ``rules_file`` (validated against the allowlist), or none."""
        return load_rules_file(self.rules_file, self.allowlist()) if self.rules_file else []

    def dispatch_config(self, conn: Connections, consumer: ConsumerSettings, group_id: str) -> DispatchConfig:
        """The :class:`connectors.actions.DispatchConfig` of a dispatch loop in group ``group_id``."""
        return DispatchConfig(
            bootstrap=conn.kafka_bootstrap_servers,
            actions_topic=conn.topic("actions"),
            dlq_topic=conn.topic("actions.dlq"),
            retry_topic=conn.topic("actions.retry"),
            rules_topic=conn.topic("rules"),
            group_id=group_id,
            auto_offset_reset="latest" if consumer.starting_offsets == StartingOffsets.LATEST else "earliest",
            allowlist=self.allowlist(),
            default_secret_env=self.webhook_secret_env,
            reserved_env=declared_variables(),
            default_timeout_s=self.webhook_timeout_ms / 1000.0,
            policy=RetryPolicy(
                max_attempts=self.webhook_max_attempts,
                base_delay_s=self.webhook_backoff_base_ms / 1000.0,
                max_delay_s=self.webhook_backoff_max_ms / 1000.0,
            ),
            concurrency_per_destination=self.webhook_concurrency,
            max_queue_per_destination=self.webhook_max_queue,
            max_in_flight=self.dispatch_max_in_flight,
            rules_wait_s=self.dispatch_rules_wait_ms / 1000.0,
            shutdown_s=self.dispatch_shutdown_ms / 1000.0,
            log_interval_s=consumer.log_interval_ms / 1000.0,
            kafka_security=conn.kafka_security_options(),
        )


def add_dispatch_args(p: argparse.ArgumentParser) -> None:
    """The command-line options of :class:`DispatchSettings` (``jobs.dispatch`` and ``jobs.triggers``)."""
    p.add_argument("--rules", dest="rules_file", default=None, help="YAML rules file (default: topic only)")
    p.add_argument("--webhook-allowlist", default=None, help="allowed destinations (default loopback)")
    p.add_argument("--webhook-max-attempts", type=int, default=None, help="attempts before DLQ (default 6)")
