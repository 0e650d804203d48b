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
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from connectors.actions import ActionDispatch
from connectors.dispatch import DispatchSettings, add_dispatch_args
from connectors.runtime import setup_logging, stop_on_signals
from connectors.settings import Connections, ConsumerSettings, add_consumer_args, compose, environment

JOB = "dispatch"


@dataclass(frozen=True)
class DispatchJobSettings:
    """Everything the dispatch job reads. ``consumer.group_id`` defaults to ``clickpulse-dispatch``."""

    connections: Connections
    consumer: ConsumerSettings
    dispatch: DispatchSettings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the dispatch loop until SIGTERM/SIGINT (with ``--bounded``: until caught up)."""
    setup_logging()
    p = argparse.ArgumentParser(prog="jobs.dispatch", description=__doc__.splitlines()[0])
    add_consumer_args(p)
    add_dispatch_args(p)
    s = compose(DispatchJobSettings, environment(), vars(p.parse_args(argv)))
    stop = threading.Event()
    stop_on_signals(stop)
    caught_up = threading.Event()
    if s.consumer.bounded:
        caught_up.set()
    config = s.dispatch.dispatch_config(s.connections, s.consumer, s.consumer.group(JOB))
    dispatch = ActionDispatch(config, s.dispatch.file_rules(), os.environ)
    dispatch.run(stop, caught_up if s.consumer.bounded else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
