"""Tuning of PyFlink's Python worker (Apache Beam's SDK harness), applied from inside the worker.

**Beam's state sampler.** For every bundle, Beam's ``BundleProcessor`` starts a ``StateSampler``: a thread
that wakes every 2 ms, then every 20 % longer, to attribute the bundle's time to its steps (Beam's own
"msecs" counters, which PyFlink does not report). At the bundle's end the worker joins that thread, and the
join waits for the thread's current sleep: 0.2-2.7 ms per bundle, measured alone, and 18.6 % of the ingest
stage's wall time in a profile (bench/RESULTS.md, 2026-12-07 02:20). The pipeline finishes a bundle every
10 ms, and the JVM task that feeds the stage waits for each bundle's result, so every event waited too.
:func:`skip_state_sampler` makes the sampler's ``start``/``stop`` keep the tracking (the current tracker,
the scoped states PyFlink's operations enter) without the thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_PATCHED = "_clickpulse_no_sampling_thread"


def skip_state_sampler() -> bool:
    """Start Beam's per-bundle state samplers without their sampling thread, in this process (a Python
    worker; in a local run, the job's own process). Idempotent; returns whether the sampler is (now) patched.
    A Beam without the expected ``StateSampler`` is left alone, with a warning."""
    try:
        from apache_beam.runners.worker import statesampler
    except ImportError:  # pragma: no cover - PyFlink always ships Beam
        return False
    cls: Any = getattr(statesampler, "StateSampler", None)
    tracker = getattr(statesampler, "set_current_tracker", None)
    if cls is None or tracker is None or not all(hasattr(cls, m) for m in ("start", "stop", "reset")):
        log.warning("this Beam's StateSampler is not the expected one: its sampling thread stays")
        return False
    if getattr(cls, _PATCHED, False):
        return True
    threaded_stop = cls.stop

    def start(self: Any) -> None:
        self.tracked_thread = threading.current_thread()
        tracker(self)
        self.started = True
        self.__dict__[_PATCHED] = True

    def stop(self: Any) -> None:
        if not self.__dict__.pop(_PATCHED, False):  # started before the patch: stop its thread
            threaded_stop(self)
            return
        tracker(None)
        self.finished = True

    cls.start, cls.stop = start, stop
    setattr(cls, _PATCHED, True)
    log.info("Beam state sampler: no sampling thread per bundle")
    return True
