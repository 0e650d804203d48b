"""What Beam's per-bundle state sampler costs a Python UDF's bundle, with and without its thread.

``python -m bench.bench_bundle_sampler`` runs ``--bundles`` bundles the way Beam's ``BundleProcessor``
brackets them (``reset``, ``start``, the bundle's work, ``stop``), the work being a sleep of
``--work-ms`` (the pipeline's ingest stage finishes a bundle every 10 ms, some of it waiting for the JVM),
and prints a markdown row (``| benchmark | result | notes |``) with the time ``stop`` took: first with
Beam's sampler as shipped (it joins its sampling thread, which sleeps in steps growing from 2 ms), then
with :func:`connectors.python_worker.skip_state_sampler` applied (no thread). No JVM, no stack.
"""

from __future__ import annotations

import argparse
import statistics
import time

from apache_beam.runners.worker import statesampler
from apache_beam.utils.counters import CounterFactory

from connectors.python_worker import skip_state_sampler


def stop_times_ms(bundles: int, work_s: float) -> list[float]:
    """How long ``stop`` took for each of ``bundles`` bundles of ``work_s`` seconds."""
    sampler = statesampler.StateSampler("bench", CounterFactory())
    out = []
    for _ in range(bundles):
        sampler.reset()
        sampler.start()
        time.sleep(work_s)
        t = time.perf_counter()
        sampler.stop()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _summary(v: list[float]) -> str:
    q = sorted(v)
    p99 = q[int(0.99 * len(q))]
    return f"mean {statistics.mean(v):.3f} ms, median {q[len(q) // 2]:.3f} ms, p99 {p99:.3f} ms"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=int, default=500)
    p.add_argument("--work-ms", type=float, default=7.0)
    a = p.parse_args()
    threaded = stop_times_ms(a.bundles, a.work_ms / 1000)
    skip_state_sampler()
    bare = stop_times_ms(a.bundles, a.work_ms / 1000)
    print(
        f"| Beam state sampler, `stop()` per bundle ({a.bundles} bundles of {a.work_ms:g} ms) | "
        f"with its thread: {_summary(threaded)}; without: {_summary(bare)} | "
        f"at the pipeline's 100 bundles/s, the mean is the time per second the source task waits |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
