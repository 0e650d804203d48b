"""Dispatch job: ``actions`` -> HMAC-signed webhooks, dead actions -> ``actions.dlq``.

Run it as ``python -m jobs.dispatch`` or ``clickpulse run dispatch``; ``python -m jobs.triggers`` runs the
same loop inside its own process unless started with ``--no-dispatch``.

A Kafka consumer loop (no Flink: delivery is I/O bound and its latency budget is a few ms), see
:class:`connectors.actions.ActionDispatch`: each action is resolved to its rule's webhook (the
``--rules`` file overlaid with the live ``rules`` topic), delivered by
:class:`connectors.webhook.WebhookDispatcher` (signed, retried with jittered back-off, one lane per
destination so a dead endpoint only delays itself) and its offset is committed only once it is
delivered or written to ``actions.dlq``. Restarts re-deliver what was in flight: at-least-once, with
``Idempotency-Key`` = ``action_id`` for receivers. See ``docs/adr/002-trigger-semantics.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from pydantic import Field

from connectors.actions import ActionDispatch, DispatchConfig
from connectors.flink import JobSettings, StartingOffsets, add_common_args, setup_logging
from connectors.webhook import RetryPolicy
from udfs.rules import DEFAULT_SECRET_ENV, Allowlist, Rule, load_rules_file

log = logging.getLogger("clickpulse.dispatch")

JOB = "dispatch"


class DispatchSettings(JobSettings):
    """Settings of webhook delivery (plus every :class:`connectors.flink.JobSettings` field).

    ``group_id`` (``--group-id``) is the dispatch consumer group (default ``clickpulse-dispatch``).
    """

    rules_file: Path | None = Field(None, alias="CLICKPULSE_RULES_FILE")
    """``CLICKPULSE_RULES_FILE`` / ``--rules``: YAML rules file, overlaid by the ``rules`` topic (default
    none: rules come from the topic only)."""
    webhook_allowlist: str = Field("localhost,127.0.0.0/8,::1", alias="CLICKPULSE_WEBHOOK_ALLOWLIST")
    """``CLICKPULSE_WEBHOOK_ALLOWLIST``: comma-separated hosts, ``*.suffix`` patterns and CIDRs webhooks may
    target (default ``localhost,127.0.0.0/8,::1``: loopback only)."""
    webhook_secret_env: str = Field(DEFAULT_SECRET_ENV, alias="CLICKPULSE_WEBHOOK_SECRET_ENV")
    """``CLICKPULSE_WEBHOOK_SECRET_ENV``: variable holding the HMAC secret of rules without ``secret_env``
    (default ``CLICKPULSE_WEBHOOK_SECRET``)."""
    webhook_timeout_s: float = Field(5.0, alias="CLICKPULSE_WEBHOOK_TIMEOUT_S")
    """``CLICKPULSE_WEBHOOK_TIMEOUT_S``: per-request timeout of rules without ``timeout`` (default 5)."""
    webhook_max_attempts: int = Field(6, alias="CLICKPULSE_WEBHOOK_MAX_ATTEMPTS")
    """``CLICKPULSE_WEBHOOK_MAX_ATTEMPTS``: attempts before an action goes to ``actions.dlq`` (default 6)."""
    webhook_backoff_base_ms: int = Field(500, alias="CLICKPULSE_WEBHOOK_BACKOFF_BASE_MS")
    """``CLICKPULSE_WEBHOOK_BACKOFF_BASE_MS``: back-off before retry n is uniform in
    ``[0, min(max, base * 2**(n-1))]`` (default 500)."""
    webhook_backoff_max_ms: int = Field(30_000, alias="CLICKPULSE_WEBHOOK_BACKOFF_MAX_MS")
    """``CLICKPULSE_WEBHOOK_BACKOFF_MAX_MS``: cap of one back-off delay (default 30000)."""
    webhook_concurrency: int = Field(4, alias="CLICKPULSE_WEBHOOK_CONCURRENCY")
    """``CLICKPULSE_WEBHOOK_CONCURRENCY``: concurrent requests per destination (default 4)."""
    webhook_max_queue: int = Field(10_000, alias="CLICKPULSE_WEBHOOK_MAX_QUEUE")
    """``CLICKPULSE_WEBHOOK_MAX_QUEUE``: actions waiting per destination before new ones are dead-lettered
    (default 10000)."""
    dispatch_max_in_flight: int = Field(20_000, alias="CLICKPULSE_DISPATCH_MAX_IN_FLIGHT")
    """``CLICKPULSE_DISPATCH_MAX_IN_FLIGHT``: unsettled actions before the consumer pauses (default 20000)."""
    dispatch_rules_wait_ms: int = Field(2000, alias="CLICKPULSE_DISPATCH_RULES_WAIT_MS")
    """``CLICKPULSE_DISPATCH_RULES_WAIT_MS``: how long an action naming an unknown rule waits for the rules
    topic to catch up before it is dead-lettered (default 2000)."""
    dispatch_shutdown_s: float = Field(5.0, alias="CLICKPULSE_DISPATCH_SHUTDOWN_S")
    """``CLICKPULSE_DISPATCH_SHUTDOWN_S``: on stop, time to finish deliveries in flight; the rest is left
    uncommitted and re-delivered by the next run (default 5)."""
    log_interval_s: float = Field(10.0, alias="CLICKPULSE_LOG_INTERVAL_S")
    """``CLICKPULSE_LOG_INTERVAL_S``: period of the one-line counter log (default 10)."""

    def allowlist(self) -> Allowlist:
        """The parsed destination allowlist."""
        return Allowlist.parse(self.webhook_allowlist.split(","))

    def file_rules(self) -> list[Rule]:
        """Rules of ``rules_file`` (validated against the allowlist), or none."""
        return load_rules_file(self.rules_file, self.allowlist()) if self.rules_file else []

    def dispatch_config(self, group_id: str) -> DispatchConfig:
        """This configuration as a :class:`connectors.actions.DispatchConfig` for group ``group_id``."""
        return DispatchConfig(
            bootstrap=self.kafka_bootstrap_servers,
            actions_topic=self.topic("actions"),
            dlq_topic=self.topic("actions.dlq"),
            rules_topic=self.topic("rules"),
            group_id=group_id,
            auto_offset_reset="latest" if self.starting_offsets == StartingOffsets.LATEST else "earliest",
            allowlist=self.allowlist(),
            default_secret_env=self.webhook_secret_env,
            default_timeout_s=self.webhook_timeout_s,
            policy=RetryPolicy(
                max_attempts=self.webhook_max_attempts,
                base_delay_s=self.webhook_backoff_base_ms / 1000.0,
                max_delay_s=self.webhook_backoff_max_ms / 1000.0,
            ),
            concurrency_per_destination=self.webhook_concurrency,
            max_queue_per_destination=self.webhook_max_queue,
            max_in_flight=self.dispatch_max_in_flight,
            rules_wait_s=self.dispatch_rules_wait_ms / 1000.0,
            shutdown_s=self.dispatch_shutdown_s,
            log_interval_s=self.log_interval_s,
        )


def add_dispatch_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``jobs.dispatch`` and ``jobs.triggers``."""
    p.add_argument("--rules", dest="rules_file", default=None, help="YAML rules file (default: topic only)")
    p.add_argument("--webhook-allowlist", default=None, help="allowed destinations (default loopback)")
    p.add_argument("--webhook-max-attempts", type=int, default=None, help="attempts before DLQ (default 6)")


def stop_on_signals(stop: threading.Event) -> None:
    """Set ``stop`` on SIGTERM/SIGINT (only from the main thread)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def parse_args(argv: Sequence[str] | None) -> DispatchSettings:
    """Settings from the environment (and ``.clickpulse/stack.env``) overridden by the command line."""
    from connectors.settings import by_alias, home_dir

    p = argparse.ArgumentParser(prog="jobs.dispatch", description=__doc__.splitlines()[0])
    add_common_args(p)
    add_dispatch_args(p)
    args = p.parse_args(list(argv) if argv is not None else None)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    env_file = home_dir() / "stack.env"
    return DispatchSettings(
        _env_file=env_file if env_file.is_file() else None, **by_alias(DispatchSettings, overrides)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the dispatch loop until SIGTERM/SIGINT (with ``--bounded``: until caught up)."""
    setup_logging()
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = parse_args(argv)
    stop = threading.Event()
    stop_on_signals(stop)
    caught_up = threading.Event()
    if settings.bounded:
        caught_up.set()
    dispatch = ActionDispatch(
        settings.dispatch_config(settings.group_id or f"clickpulse-{JOB}"), settings.file_rules(), os.environ
    )
    dispatch.run(stop, caught_up if settings.bounded else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
