"""Differential test: the JVM sessions operator (``connectors/jvm``, engine ``jvm``) against the
specification, the pure Python reducer ``udfs/sessions.py`` (engine ``python``).

Seeded histories (thousands of keys; out-of-order, late and too-late events, duplicates, ties, session
merges and id changes, sessions hitting the maximum length, watermark jumps, closes and purges, malformed
records) are replayed through both reducers without Flink (:mod:`tests.session_replay`), and the
transcripts must be identical: every session record (all fields, versions, retractions) and every late
event in the same order, the same state left per key (timers included), the same counts. A last test runs
the sessionize job with each engine on the same Kafka input and requires the same final sessions and late
events from the real Flink operators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors import kafka as kafka_io
from connectors.settings import CONTRACT_TOPICS
from tests.job.test_sessionize_job import build_dataset, job_env_for, read_output, run_bounded
from tests.session_replay import Replay, generate_history, replay_java, replay_python
from tests.support import produce_rows
from udfs.sessions import SessionConfig

pytestmark = pytest.mark.job

MIN = 60_000
#: dense rules: many gaps, merges, max-length splits and purges per key
TIGHT = SessionConfig(
    gap_ms=10 * MIN, max_ms=2 * 60 * MIN, allowed_lateness_ms=30 * MIN, out_of_orderness_ms=MIN
)


def first_difference(a: Replay, b: Replay) -> str:
    for i, (x, y) in enumerate(zip(a.lines, b.lines, strict=False)):
        if x != y:
            return f"line {i}:\n python: {x}\n java:   {y}"
    return f"lengths differ: python {len(a.lines)}, java {len(b.lines)}"


@pytest.mark.parametrize(
    ("seed", "users", "cfg"),
    [(1, 4000, TIGHT), (2, 3000, SessionConfig()), (3, 2000, TIGHT)],
    ids=["tight-4000-keys", "defaults-3000-keys", "tight-2000-keys"],
)
def test_java_reducer_matches_python_reducer(seed: int, users: int, cfg: SessionConfig) -> None:
    ops = generate_history(seed, users, cfg=cfg)
    py = replay_python(ops, cfg)
    java = replay_java(ops, cfg)
    assert py.lines == java.lines, first_difference(py, java)
    # the history exercised what it is meant to
    counts = py.counts
    assert counts["events"] > 10 * users
    for name in ("merged", "retracted", "late", "late_accepted", "updated", "purged", "malformed"):
        assert counts[name] > 20, (name, counts)
    assert counts["purged"] >= 0.9 * counts["closed"], "the final watermark purges (nearly) every session"


def test_same_sessions_from_both_engines_in_flink(job_env: dict[str, str], tmp_path: Path) -> None:
    """The real operators: the sessionize job on the same input with ``--engine python`` and ``jvm``."""
    data = build_dataset(events=2000, seed=5)
    outputs: dict[str, Any] = {}
    for engine in ("python", "jvm"):
        env = job_env_for(job_env, tmp_path)
        bootstrap, base = env["KAFKA_BOOTSTRAP_SERVERS"], env["CLICKPULSE_TOPIC_PREFIX"]
        # each engine reads its own copy of the input and writes its own topics
        prefix = f"{base}{engine}."
        topics = {f"{prefix}{t}": c for t, c in CONTRACT_TOPICS.items()}
        kafka_io.ensure_topics(bootstrap, topics, partitions=4)
        env = {
            **env,
            "CLICKPULSE_TOPIC_PREFIX": prefix,
            "CLICKPULSE_JOB_GROUP_ID": f"sess-{prefix}",
            "CLICKPULSE_STATE_DIR": str(tmp_path / engine),
        }
        produce_rows(bootstrap, f"{prefix}events.enriched", data.all)
        run_bounded(env, tmp_path, "--starting-offsets", "earliest", "--parallelism", "2", "--engine", engine)
        out = read_output(bootstrap, prefix)
        outputs[engine] = (
            out.final,
            sorted((m.key, m.value) for m in out.late),
            {(r["session_id"], r["version"]): r for r in out.records},
        )
        kafka_io.delete_topics(bootstrap, [f"{prefix}{t}" for t in CONTRACT_TOPICS])
    py_final, py_late, py_records = outputs["python"]
    jvm_final, jvm_late, jvm_records = outputs["jvm"]
    assert py_final == jvm_final
    assert py_late == jvm_late and len(py_late) == len(data.too_late)
    # records both sent (a version depends on when the watermark came, not on the engine) are identical
    common = set(py_records) & set(jvm_records)
    assert common and all(py_records[k] == jvm_records[k] for k in common)
    assert all(orjson.dumps(v) for v in jvm_final.values())
