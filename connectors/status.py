"""What ``clickpulse status`` reads besides service health: consumer lag per group on the contract
topics, the size of the dead-letter topics (Kafka), and the running jobs with their last completed
checkpoint (Flink's REST API).

Each function returns plain data (JSON-ready) or raises the client's error; the command line turns an
error into an ``unavailable: <reason>`` line of its own part, so one missing service never hides the
others.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from http.client import HTTPException
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from connectors import kafka as kafka_io
from connectors.flink_metrics import rest_get


def _offsets_client(bootstrap: str, timeout_s: float, security: dict[str, Any]) -> KafkaConsumer:
    """A consumer without a group, only for looking up partitions and their first/end offsets."""
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="clickpulse-status",
        enable_auto_commit=False,
        request_timeout_ms=int(timeout_s * 1000) + 1000,
        **security,
    )


def consumer_lag(
    bootstrap: str, topics: Iterable[str], *, timeout_s: float = 10.0, **security: Any
) -> dict[str, dict[str, Any]]:
    """Lag of every consumer group with committed offsets on ``topics``.

    ``{group: {"lag": total, "topics": {topic: {"committed": sum, "end": sum, "lag": sum}}}}``: sums over
    the partitions the group committed; ``end`` is the partition's end offset (high watermark, which on
    transactional topics counts the commit markers too). Groups without a commit on ``topics`` are left
    out. ``security``: :meth:`connectors.settings.Connections.kafka_security_options`.
    """
    wanted = set(topics)
    admin = kafka_io.admin(bootstrap, timeout_s=timeout_s, **security)
    try:
        groups = sorted(str(g["group_id"]) for g in admin.list_groups())
        committed_by_group = admin.list_group_offsets(groups) if groups else {}
    finally:
        admin.close()
    committed: dict[str, dict[TopicPartition, int]] = {}
    for group, offsets in committed_by_group.items():
        mine = {tp: int(om.offset) for tp, om in offsets.items() if tp.topic in wanted and om.offset >= 0}
        if mine:
            committed[str(group)] = mine
    if not committed:
        return {}
    partitions = sorted({tp for offsets in committed.values() for tp in offsets})
    consumer = _offsets_client(bootstrap, timeout_s, security)
    try:
        ends = consumer.end_offsets(partitions)
    finally:
        consumer.close()
    out: dict[str, dict[str, Any]] = {}
    for group, offsets in sorted(committed.items()):
        per_topic: dict[str, dict[str, int]] = {}
        for tp, offset in sorted(offsets.items()):
            end = int(ends.get(tp, offset))
            row = per_topic.setdefault(tp.topic, {"committed": 0, "end": 0, "lag": 0})
            row["committed"] += offset
            row["end"] += end
            row["lag"] += max(0, end - offset)
        out[group] = {"lag": sum(r["lag"] for r in per_topic.values()), "topics": per_topic}
    return out


def topic_sizes(
    bootstrap: str, topics: Iterable[str], *, timeout_s: float = 10.0, **security: Any
) -> dict[str, int | None]:
    """Records held by each topic: end minus first offset, summed over partitions (``None``: no such
    topic). On a topic written with transactions the commit markers take offsets too, so this is an
    upper bound there."""
    consumer = _offsets_client(bootstrap, timeout_s, security)
    try:
        existing = consumer.topics()
        out: dict[str, int | None] = {}
        for topic in topics:
            if topic not in existing:
                out[topic] = None
                continue
            parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            first = consumer.beginning_offsets(parts)
            end = consumer.end_offsets(parts)
            out[topic] = sum(int(end[tp]) - int(first[tp]) for tp in parts)
        return out
    finally:
        consumer.close()


def _iso(ms: Any) -> str | None:
    """Epoch milliseconds (Flink's timestamps) as ISO-8601 UTC; ``None`` for missing or non-positive."""
    if not isinstance(ms, int | float) or ms <= 0:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def last_checkpoint(rest_url: str, job_id: str, *, timeout_s: float = 5.0) -> dict[str, Any] | None:
    """The last completed checkpoint of a job (``GET /jobs/<id>/checkpoints``), ``None`` before the first:
    ``{id, completed_at, duration_ms, size_bytes, path, completed_total, failed_total}``."""
    doc = rest_get(f"{rest_url.rstrip('/')}/jobs/{job_id}/checkpoints", timeout_s)
    latest = (doc.get("latest") or {}).get("completed")
    if not latest:
        return None
    counts = doc.get("counts") or {}
    return {
        "id": latest.get("id"),
        "completed_at": _iso(latest.get("latest_ack_timestamp")),
        "duration_ms": latest.get("end_to_end_duration"),
        "size_bytes": latest.get("checkpointed_size", latest.get("state_size")),
        "path": latest.get("external_path"),
        "completed_total": counts.get("completed"),
        "failed_total": counts.get("failed"),
    }


def flink_jobs(rest_url: str, *, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """The cluster's running jobs (``GET /jobs/overview``) with their last completed checkpoint:
    ``[{id, name, state, started_at, checkpoint}]``; ``checkpoint`` is ``None`` before the first, or
    ``{"unavailable": reason}`` when the checkpoint statistics cannot be read."""
    jobs = rest_get(f"{rest_url.rstrip('/')}/jobs/overview", timeout_s).get("jobs", [])
    out: list[dict[str, Any]] = []
    for job in sorted(jobs, key=lambda j: str(j.get("name", ""))):
        if job.get("state") != "RUNNING":
            continue
        checkpoint: dict[str, Any] | None
        try:
            checkpoint = last_checkpoint(rest_url, str(job["jid"]), timeout_s=timeout_s)
        except (OSError, ValueError, HTTPException) as exc:
            checkpoint = {"unavailable": repr(exc)}
        out.append(
            {
                "id": job.get("jid"),
                "name": job.get("name"),
                "state": job.get("state"),
                "started_at": _iso(job.get("start-time")),
                "checkpoint": checkpoint,
            }
        )
    return out
