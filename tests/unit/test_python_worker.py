"""``connectors.python_worker``: Beam's per-bundle state sampler without its sampling thread."""

from __future__ import annotations

import threading

import pytest
from apache_beam.runners.worker import statesampler
from apache_beam.utils.counters import CounterFactory

from connectors.python_worker import skip_state_sampler

pytestmark = pytest.mark.unit


def _bundle(sampler: statesampler.StateSampler) -> None:
    """What Beam's ``BundleProcessor.process_bundle`` does with its sampler, around a step's work."""
    sampler.reset()
    sampler.start()
    assert statesampler.get_current_tracker() is sampler
    with sampler.scoped_state("ingest_stage", "process"):
        assert sampler.current_state().name.step_name == "ingest_stage"
    sampler.stop_if_still_running()
    assert statesampler.get_current_tracker() is None


def test_bundles_run_without_a_sampling_thread_and_earlier_samplers_still_stop() -> None:
    before_patch = statesampler.StateSampler("stage-old", CounterFactory())
    before_patch.start()  # Beam's own start, if the patch had not been applied yet: a thread
    threads = threading.active_count()

    assert skip_state_sampler() is True
    assert skip_state_sampler() is True  # idempotent

    before_patch.stop()  # joins its thread
    assert before_patch.finished
    assert threading.active_count() == threads - 1

    sampler = statesampler.StateSampler("stage", CounterFactory())
    seen: list[int] = []
    for _ in range(50):
        _bundle(sampler)
        seen.append(threading.active_count())
    assert max(seen) == threads - 1  # no thread per bundle
    assert sampler.started and sampler.finished
