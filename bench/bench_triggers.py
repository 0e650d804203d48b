"""Triggers benchmark: trigger-operator throughput, and event produced -> webhook received latency under load.

Runs ``python -m jobs.triggers`` (Flink mini-cluster, in-process dispatch) once per trigger engine
(``--engines jvm,python``: the Java operator, or the Python one in THREAD mode) against the stack in the environment (``KAFKA_BOOTSTRAP_SERVERS`` or ``.clickpulse/stack.env``), on its own
prefixed topics, with a real HTTP receiver in this process.

* Throughput: pre-produce N enriched events (a realistic mix over 20k users: page views, product views
  over 50 deals, adds, orders) between two "probe" events per partition; the job starts from the
  earliest offsets and the time between the first and the last probe webhook is the time the
  operator needed for the N events (JVM start-up excluded).
* Latency: the job runs live while a background producer writes the same mix at a steady rate (target
  5,000 events/s), and every 100 ms a probe event whose rule fires at once; latency = webhook received
  (receiver clock) - probe produced (producer clock), same machine. Background fires (deal promos) are
  delivered to the same receiver on another path.

* Operator logic alone: a generated history (:mod:`tests.trigger_replay`: thousands of users, every rule
  form, rule updates) through both operators' code without Flink (Python: ``TriggerFunction``; Java:
  ``TriggerLogic``, JIT-warm), CPU µs per event of the replaying thread: what each engine costs before
  any Flink or Kafka overhead.

Prints markdown table rows (``| benchmark | result | notes |``) for ``make bench``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from connectors import kafka as kafka_io
from connectors.settings import CONTRACT_TOPICS, load_connections
from tests.support import DEAL_PROMO_WHEN, enriched_event

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-secret"
PARTITIONS = 4
USERS = 20_000
DEALS = 50


# ----------------------------------------------------------------------------------------- receiver


class Receiver(ThreadingHTTPServer):
    """Records the arrival time of every probe action (by the probe's message id) and counts the rest."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.arrived: dict[str, float] = {}
        self.other = 0
        self.bad_signatures = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        now = time.time()
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        action = orjson.loads(body)
        with self.server.lock:
            if not hmac.compare_digest(expected, self.headers.get("X-Clickpulse-Signature", "")):
                self.server.bad_signatures += 1
            if self.path == "/probe":
                self.server.arrived.setdefault(action["events"][0]["message_id"], now)
            else:
                self.server.other += 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        return


# --------------------------------------------------------------------------------------- workload


#: The rest of a full enriched record, so the job parses records of realistic size.
_FULL_RECORD: dict[str, Any] = {
    "previous_id": None,
    "ip": "203.0.113.9",
    "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
    "page_url": "https://shop.example/p/42?utm_source=google",
    "page_path": "/p/42",
    "page_title": "Deal",
    "referrer": "https://www.google.com/",
    "locale": "en-US",
    "browser": "Chrome",
    "browser_version": "120.0",
    "os": "Linux",
    "device_type": "desktop",
    "utm_source": "google",
    "utm_medium": None,
    "utm_campaign": None,
    "utm_term": None,
    "utm_content": None,
    "click_id_type": None,
    "referrer_type": "search",
    "referrer_host": "www.google.com",
}


def _event(user: str, name: str, ts_ms: int, props: dict[str, Any]) -> dict[str, Any]:
    ev = enriched_event(user, name, ts_ms, **props)
    ev.update(_FULL_RECORD, original_timestamp=ev["timestamp"], sent_at=ev["timestamp"])
    return ev


def background(rng: random.Random, ts_ms: int) -> tuple[bytes, bytes]:
    """One background event (key, value): 60% page views, 30% product views, 7% adds, 3% orders."""
    user = f"u{rng.randrange(USERS)}"
    roll = rng.random()
    if roll < 0.60:
        ev = _event(user, "Page Viewed", ts_ms, {"path": "/"})
    elif roll < 0.90:
        ev = _event(user, "Product Viewed", ts_ms, {"deal_id": f"D{rng.randrange(DEALS)}", "price": 129.0})
    elif roll < 0.97:
        ev = _event(user, "Product Added", ts_ms, {"deal_id": f"D{rng.randrange(DEALS)}"})
    else:
        ev = _event(user, "Order Completed", ts_ms, {"revenue": 129.0})
    return user.encode(), orjson.dumps(ev)


def rules_doc(url: str, prefilter: bool = False) -> dict[str, Any]:
    """The benchmark's rules: the three example forms plus the probe.

    ``prefilter``: the returning rule is scoped to product views, so every rule names its events and
    the JVM pre-filter (``CLICKPULSE_TRIGGERS_EVENT_FILTER=auto``) can drop page views (60 % of the
    mix) before they reach Python; without it, ``returning_after`` needs every event.
    """
    returning: dict[str, Any] = {"returning_after": "7d"}
    if prefilter:
        returning["event"] = "Product Viewed"
    return {
        "rules": [
            {"id": "probe", "when": {"event": "Probe"}, "action": {"webhook": {"url": f"{url}/probe"}}},
            {
                "id": "deal_promo",
                "when": DEAL_PROMO_WHEN,
                "cooldown": "24h",
                "action": {"webhook": {"url": f"{url}/promo"}},
            },
            {
                "id": "cart_abandoned",
                "when": {
                    "sequence": {"first": "Product Added", "then_not": "Order Completed", "within": "30m"}
                },
                "action": {"webhook": {"url": f"{url}/cart"}},
            },
            {
                "id": "returning",
                "when": returning,
                "action": {"webhook": {"url": f"{url}/back"}},
            },
        ]
    }


# ------------------------------------------------------------------------------------------ harness


class Run:
    """Topics, receiver and the job process of one measurement."""

    def __init__(self, parallelism: int, prefilter: bool = False, engine: str = "jvm") -> None:
        conn = load_connections()
        self.bootstrap = conn.kafka_bootstrap_servers
        self.prefix = f"bt{uuid.uuid4().hex[:6]}."
        self.topics = {f"{self.prefix}{t}": cfg for t, cfg in CONTRACT_TOPICS.items()}
        kafka_io.ensure_topics(self.bootstrap, self.topics, partitions=PARTITIONS)
        self.home = Path(tempfile.mkdtemp(prefix="clickpulse-bench-triggers-"))  # checkpoints, rules file
        self.receiver = Receiver()
        threading.Thread(target=self.receiver.serve_forever, daemon=True).start()
        self.rules_file = self.home / "rules.yaml"
        self.rules_file.write_text(yaml.safe_dump(rules_doc(self.receiver.url, prefilter)))
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "REDIS_URL": conn.redis_url.get_secret_value(),
            "CLICKPULSE_TOPIC_PREFIX": self.prefix,
            "CLICKPULSE_STATE_DIR": str(self.home),
            "CLICKPULSE_WEBHOOK_SECRET": SECRET,
            "CLICKPULSE_FLINK_PARALLELISM": str(parallelism),
            "CLICKPULSE_TRIGGERS_EVENT_FILTER": "auto" if prefilter else "none",
            "CLICKPULSE_TRIGGERS_ENGINE": engine,
        }
        self.producer = KafkaProducer(
            bootstrap_servers=self.bootstrap,
            linger_ms=2,
            batch_size=256 * 1024,
            acks=1,
            compression_type="lz4",
        )
        self.topic = f"{self.prefix}events.enriched"
        self.probes: dict[str, float] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start_job(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.triggers", "--rules", str(self.rules_file), "--starting-offsets", "earliest"],
            env=self.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def probe(self, partition: int | None = None) -> str:
        user = f"probe{len(self.probes)}"
        ev = _event(user, "Probe", int(time.time() * 1000), {})
        self.probes[ev["message_id"]] = time.time()
        self.producer.send(self.topic, key=user.encode(), value=orjson.dumps(ev), partition=partition)
        return str(ev["message_id"])

    def wait_for(self, ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.receiver.lock:
                if all(i in self.receiver.arrived for i in ids):
                    return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the triggers job exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise TimeoutError(f"{len(ids)} probe webhooks not received within {timeout_s:.0f}s")

    def action_times(self, probe_ids: set[str]) -> dict[str, float]:
        """Broker timestamp (s) of the action record of each probe in ``probe_ids``."""
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000
        )
        consumer.assign([TopicPartition(f"{self.prefix}actions", p) for p in range(PARTITIONS)])
        out: dict[str, float] = {}
        for m in consumer:
            action = orjson.loads(m.value)
            message_id = action["events"][0]["message_id"]
            if message_id in probe_ids:
                out[message_id] = m.timestamp / 1000.0
        consumer.close()
        return out

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.producer.close()
        self.receiver.shutdown()
        kafka_io.delete_topics(self.bootstrap, list(self.topics))
        shutil.rmtree(self.home, ignore_errors=True)


class CpuSampler(threading.Thread):
    """Samples the CPU time (user + system, s) of a process tree's JVM every 50 ms, with wall time."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.samples: list[tuple[float, float]] = []
        self.halt = threading.Event()

    def _jvm_pids(self) -> list[int]:
        try:
            children = Path(f"/proc/{self.root_pid}/task/{self.root_pid}/children").read_text().split()
        except OSError:
            return []
        return [int(c) for c in children if "java" in Path(f"/proc/{c}/comm").read_text()]

    def run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self.halt.wait(0.05):
            total = 0.0
            for pid in self._jvm_pids():
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                total += (int(fields[11]) + int(fields[12])) / tick
            self.samples.append((time.time(), total))

    def at(self, wall: float) -> float:
        """CPU seconds used up to ``wall`` (nearest sample)."""
        return min(self.samples, key=lambda s: abs(s[0] - wall))[1]


def throughput(
    events: int, parallelism: int = 1, prefilter: bool = False, engine: str = "jvm"
) -> tuple[float, float, int]:
    """(events/s through the trigger operator, events per JVM CPU-second, fires delivered).

    The second number is what the operator chain costs, independent of what else runs on the box.
    """
    run = Run(parallelism, prefilter, engine)
    try:
        rng = random.Random(7)  # noqa: S311 - workload, not cryptography
        first = [run.probe(p) for p in range(PARTITIONS)]
        now = int(time.time() * 1000) - events  # one event per ms of event time, ending now
        for i in range(events):
            key, value = background(rng, now + i)
            run.producer.send(run.topic, key=key, value=value)
        last = [run.probe(p) for p in range(PARTITIONS)]
        run.producer.flush()
        run.start_job()
        assert run.proc is not None
        cpu = CpuSampler(run.proc.pid)
        cpu.start()
        run.wait_for(first + last, 900)
        cpu.halt.set()
        # when the operator wrote each probe's action (broker timestamps): dispatch start-up excluded
        written = run.action_times(set(first + last))
        t0 = min(written[i] for i in first)
        t1 = max(written[i] for i in last)
        with run.receiver.lock:
            fires = run.receiver.other
        return events / max(t1 - t0, 1e-3), events / max(cpu.at(t1) - cpu.at(t0), 1e-3), fires
    finally:
        run.close()


def latency(
    rate: int, seconds: int, parallelism: int = 1, prefilter: bool = False, engine: str = "jvm"
) -> dict[str, Any]:
    """Probe latencies (ms) while a background producer writes ``rate`` events/s for ``seconds``."""
    run = Run(parallelism, prefilter, engine)
    try:
        run.start_job()
        deadline = time.monotonic() + 240
        while True:  # ready: a probe makes it end to end
            probe_id = run.probe()
            run.producer.flush()
            try:
                run.wait_for([probe_id], 2)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        run.probes.clear()
        stop = threading.Event()
        sent = [0]

        def load() -> None:
            rng = random.Random(11)  # noqa: S311 - workload
            t0 = time.monotonic()
            slot_s = 0.01
            n = 0
            while not stop.is_set():
                due = int((time.monotonic() - t0) * rate)
                now_ms = int(time.time() * 1000)
                while n < due:
                    key, value = background(rng, now_ms)
                    run.producer.send(run.topic, key=key, value=value)
                    n += 1
                sent[0] = n
                time.sleep(slot_s)

        load_before = os.getloadavg()[0]
        loader = threading.Thread(target=load, daemon=True)
        t_start = time.monotonic()
        loader.start()
        probe_ids: list[str] = []
        while time.monotonic() - t_start < seconds:
            time.sleep(0.1)
            probe_ids.append(run.probe())
        stop.set()
        loader.join(5)
        elapsed = time.monotonic() - t_start
        run.producer.flush()
        try:
            run.wait_for(probe_ids, 60)
        except TimeoutError:
            pass
        with run.receiver.lock:
            lat = sorted(
                (run.receiver.arrived[i] - run.probes[i]) * 1000
                for i in probe_ids
                if i in run.receiver.arrived
            )
            other, bad = run.receiver.other, run.receiver.bad_signatures
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
        return {
            "p50": q[49],
            "p99": q[98],
            "max": lat[-1] if lat else float("nan"),
            "probes": len(probe_ids),
            "received": len(lat),
            "background_rate": sent[0] / elapsed,
            "fires": other,
            "bad_signatures": bad,
            "load": (load_before, os.getloadavg()[0]),
        }
    finally:
        run.close()


ENGINES = {"jvm": "JVM operator", "python": "Python operator, THREAD mode"}


def logic_us_per_event(users: int = 3000) -> tuple[float, float, int]:
    """``(python, java, events)``: CPU µs per event of both operators' logic replaying one history."""
    from tests.trigger_replay import generate_history, replay_java, replay_python

    ops = generate_history(1, users)
    events = sum(1 for op in ops if op[0] == "e")
    py = replay_python(ops).busy_s
    java = replay_java(ops, passes=5).busy_s
    return py / events * 1e6, java / events * 1e6, events


def main(argv: list[str] | None = None) -> None:
    """Print the triggers rows: each measurement per engine and pre-filter variant."""
    p = argparse.ArgumentParser(prog="bench.bench_triggers", description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=100_000, help="events of the throughput run")
    p.add_argument("--rate", type=int, default=5_000, help="background events/s of the latency run")
    p.add_argument("--seconds", type=int, default=40, help="length of the latency run")
    p.add_argument("--parallelism", type=int, default=1)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--engines", default="jvm,python", help="comma-separated trigger engines: jvm, python")
    p.add_argument(
        "--variants", default="none", help="comma-separated pre-filter variants to run: none, auto"
    )
    p.add_argument("--skip-logic", action="store_true", help="skip the operator-logic rows (no Flink)")
    args = p.parse_args(argv)
    if not args.skip_logic:
        py_us, java_us, n = logic_us_per_event()
        print(
            f"| trigger operator logic alone, CPU per event (no Flink: state codec, rule book, reducer, "
            f"timers) | Python {py_us:,.1f} µs, Java {java_us:,.1f} µs ({py_us / java_us:,.1f}x) "
            f"| generated history of {n:,} events (tests.trigger_replay, seed 1), Java JIT-warm (5th pass) |"
        )
    for engine in args.engines.split(","):
        engine = engine.strip()
        for variant in args.variants.split(","):
            prefilter = variant.strip() == "auto"
            how = (
                "JVM pre-filter to the rules' events (page views dropped before the operator)"
                if prefilter
                else "no pre-filter (a returning_after rule without event needs every event)"
            )
            what = f"{ENGINES[engine]}, parallelism {args.parallelism}, {how}"
            if not args.skip_throughput:
                eps, per_cpu_s, fires = throughput(args.events, args.parallelism, prefilter, engine)
                print(
                    f"| triggers operator, sustained ({what}) "
                    f"| {eps:,.0f} events/s ({per_cpu_s:,.0f} per JVM CPU-second, "
                    f"{1e6 / per_cpu_s:,.1f} CPU µs/event) "
                    f"| {args.events:,} enriched events, 4 rules, {fires:,} fires delivered |"
                )
            r = latency(args.rate, args.seconds, args.parallelism, prefilter, engine)
            print(
                f"| triggers event produced → signed webhook received, {r['background_rate']:,.0f} events/s "
                f"background (target {args.rate:,}; {what}) "
                f"| p50 {r['p50']:,.0f} ms, p99 {r['p99']:,.0f} ms, max {r['max']:,.0f} ms "
                f"| {r['received']}/{r['probes']} probes over {args.seconds}s, {r['fires']:,} background fires, "
                f"{r['bad_signatures']} bad signatures; load average {r['load'][0]:.1f} → {r['load'][1]:.1f} |"
            )


if __name__ == "__main__":
    main()
