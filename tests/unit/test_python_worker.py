"""``connectors.python_worker``: Beam's per-bundle state sampler without its sampling thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from apache_beam.runners.worker import statesampler
from apache_beam.utils.counters import CounterFactory

from connectors.python_worker import skip_state_sampler

pytestmark = pytest.mark.unit

PATCHED = "_clickpulse_no_sampling_thread"


@pytest.fixture
def beams_sampler() -> Iterator[None]:
    """Beam's sampler as shipped for the test, and as found again after it (the patch is process-wide)."""
    cls = statesampler.StateSampler
    if cls.__dict__.get(PATCHED):
        pytest.skip("Beam's sampler was already patched in this process")
    saved = {name: cls.__dict__[name] for name in ("start", "stop")}
    yield
    for name, method in saved.items():
        setattr(cls, name, method)
    delattr(cls, PATCHED)


def _bundle(sampler: statesampler.StateSampler) -> None:
    """What Beam's ``BundleProcessor.process_bundle`` does with its sampler, around a step's work."""
    sampler.reset()
    sampler.start()
    assert statesampler.get_current_tracker() is sampler
    with sampler.scoped_state("ingest_stage", "process"):
        assert sampler.current_state().name.step_name == "ingest_stage"
    sampler.stop_if_still_running()
    assert statesampler.get_current_tracker() is None


@pytest.mark.usefixtures("beams_sampler")
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
