"""Identifiers the local stack generates."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_kafka_cluster_ids_never_look_like_an_option() -> None:
    """1 in 64 random ids started with ``-`` and ``kafka-storage format -t`` refused them."""
    from devstack.stack import _kafka_cluster_id

    ids = [_kafka_cluster_id() for _ in range(2000)]
    assert not any(i.startswith("-") for i in ids) and len(set(ids)) == len(ids)


def test_free_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    """A port from the ephemeral range could be taken by an outgoing connection before the server binds
    it (a test's Kafka failed once with "Address already in use")."""
    import socket

    from devstack.stack import _ephemeral_low, free_port

    low = _ephemeral_low()
    ports = {free_port() for _ in range(50)}
    assert all(1024 < p < low for p in ports) and len(ports) > 1
    port = ports.pop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert free_port() != port
