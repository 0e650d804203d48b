"""Identifiers the local stack generates."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_kafka_cluster_ids_never_look_like_an_option() -> None:
    """1 in 64 random ids started with ``-`` and ``kafka-storage format -t`` refused them."""
    from devstack.stack import _kafka_cluster_id

    ids = [_kafka_cluster_id() for _ in range(2000)]
    assert not any(i.startswith("-") for i in ids) and len(set(ids)) == len(ids)
