"""Webhook delivery benchmark: the dispatcher's CPU per delivered action, and submit → 2xx latency.

One :class:`connectors.webhook.WebhookDispatcher` in this process delivers signed actions at a steady
``--rate`` to the local webhook receiver (``python -m devstack.receiver``, its own process, so its CPU is
not counted), which checks both signatures of every request and answers 200. Measured: this process's
CPU over the run divided by the actions delivered (the dispatcher's event-loop thread does nearly all of
it; the pacing loop that submits is included), and submit → 2xx quantiles of the measured actions (not
of the warm-up's, which open the connections). Every action must come back delivered, none
dead-lettered. Prints markdown rows for ``bench/RESULTS.md``.

    python -m bench.bench_webhook [--rate 200] [--seconds 15] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from connectors.webhook import LatencySample, WebhookDispatcher
from devstack.stack import free_port
from udfs.rules import DEFAULT_SECRET_ENV, Destination

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-webhook-secret"


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the receiver did not listen on {port} within {timeout_s:g}s")


def run(rate: float, seconds: float, concurrency: int, url: str) -> str:
    """One paced run; a markdown row."""
    dead: list[str] = []
    submitted: dict[str, float] = {}  # action id → when submitted, for the measured actions
    latencies = LatencySample(size=int(rate * seconds) + 1)

    def delivered(action: dict[str, object], attempts: int) -> None:  # on the dispatcher's thread
        at = submitted.get(str(action["action_id"]))
        if at is not None:
            latencies.add((time.monotonic() - at) * 1000.0)

    dispatcher = WebhookDispatcher(
        lambda action, attempts, error: dead.append(error),
        on_delivered=delivered,
        concurrency_per_destination=concurrency,
    ).start()
    dest = Destination(url, SECRET.encode(), 5.0, "bench_rule")
    body_events = [
        {"message_id": f"m{i}", "event": "Product Viewed", "properties": {"deal_id": "D1"}} for i in range(3)
    ]
    # one warm-up round trip per connection: the pool and the code paths exist before the clock starts
    for i in range(concurrency):
        dispatcher.submit({"action_id": f"warm{i:08d}", "rule_id": "bench_rule", "events": body_events}, dest)
    if not dispatcher.flush(30):
        raise RuntimeError("warm-up actions were not settled")
    cpu0, wall0 = time.process_time(), time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - wall0) < seconds:
        due = int(elapsed * rate) + 1
        while n < due:
            action_id = f"a{n:012d}"
            action = {
                "action_id": action_id,
                "rule_id": "bench_rule",
                "user_key": f"u{n % 997}",
                "events": body_events,
            }
            submitted[action_id] = time.monotonic()
            if not dispatcher.submit(action, dest):
                raise RuntimeError("the lane refused an action: raise --concurrency or lower --rate")
            n += 1
        time.sleep(max(0.0, (n / rate) - (time.monotonic() - wall0)))
    if not dispatcher.flush(60):
        raise RuntimeError("actions still unsettled 60 s after the last submit")
    cpu = time.process_time() - cpu0
    stats = dispatcher.stats()
    dispatcher.close()
    if dead or stats["ok"] != n + concurrency:
        raise RuntimeError(
            f"{len(dead)} dead-lettered ({dead[:1]}), {stats['ok']} delivered of {n + concurrency}"
        )
    p50, p99 = latencies.quantiles(0.50, 0.99)
    assert p50 is not None and p99 is not None
    return (
        f"| webhook delivery, {rate:,.0f} actions/s to a loopback receiver, {concurrency} connections "
        f"| {cpu / n * 1e6:,.0f} CPU µs per action; submit → 2xx p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"| {n:,} actions over {seconds:g} s, every one 200 with both signatures checked by "
        f"`devstack.receiver` (its own process, its CPU not counted); this process's CPU / actions |"
    )


def main(argv: list[str] | None = None) -> int:
    """Start the receiver, run the benchmark, print the rows."""
    p = argparse.ArgumentParser(prog="bench.bench_webhook", description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=200.0, help="actions per second (default 200)")
    p.add_argument("--seconds", type=float, default=15.0, help="length of the run (default 15)")
    p.add_argument("--concurrency", type=int, default=16, help="connections to the receiver (default 16)")
    args = p.parse_args(argv)
    port = free_port()
    env = {**os.environ, DEFAULT_SECRET_ENV: SECRET}
    receiver = subprocess.Popen(
        [sys.executable, "-m", "devstack.receiver", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, receiver)
        url = f"http://127.0.0.1:{port}/hook"
        print(run(args.rate, args.seconds, args.concurrency, url))
        print(run(args.rate / 4, args.seconds, args.concurrency, url))
    finally:
        receiver.terminate()
        receiver.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
