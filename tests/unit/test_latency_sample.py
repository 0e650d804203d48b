"""The latency sample behind the webhook and dispatch latency figures (p50, p99, max)."""

from __future__ import annotations

import pytest

from connectors.webhook import LatencySample

pytestmark = pytest.mark.unit


def test_quantiles_of_the_newest_values() -> None:
    sample = LatencySample()
    assert sample.quantiles(0.5, 0.99) == [None, None]
    for ms in range(100, 0, -1):
        sample.add(float(ms))
    assert sample.quantiles(0.5, 0.99, 1.0) == [51.0, 100.0, 100.0]
    small = LatencySample(size=3)
    small.extend(sample)  # keeps the newest three: 3, 2, 1
    assert small.quantiles(0.0, 1.0) == [1.0, 3.0]
