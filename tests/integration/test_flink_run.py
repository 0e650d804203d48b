"""The jobs under ``flink run`` on a real standalone Flink cluster, with stop-with-savepoint and resume.

A JobManager and a TaskManager from the PyFlink distribution run as separate processes on loopback
(:class:`devstack.flink_cluster.FlinkCluster`). Every job is submitted the way ``docs/flink-run.md``
tells users to: ``flink run --detached --python jobs/<job>.py --pyFiles clickpulse-src.zip --jarfile
<kafka connector> --pyExecutable <venv python> --pyClientExecutable <venv python>``, with its
settings in the environment and its options after the script. Ingest runs in Python PROCESS mode,
sessionize and triggers in THREAD mode (the interpreter embedded in the TaskManager). The pipeline job
(the default) runs the same way at parallelism 2.

Checks: enriched/DLQ output equals the simulator's truth; sessions appear and each one agrees with the
enriched events; the trigger job's deal promos appear in ``actions``, each backed by four views of one
deal; then ``flink stop --savepointPath`` stops ingest, more events arrive (some of them redeliveries of
events from before the savepoint), ``flink run --fromSavepoint`` resumes it, and every unique event is
in ``events.enriched`` exactly once (read_committed), every bad record in the DLQ once.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from connectors.flink import connector_jars
from devstack.flink_cluster import PROJECT_PACKAGES, ClusterOptions, FlinkCluster, package_sources
from devstack.simulate import produce
from devstack.simulator import SimRecord, Truth
from tests.support import check_ingest_against_truth as check_against_truth
from tests.support import read_topic, until
from tests.support import simulate_now as simulate

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEAL_PROMO = """
rules:
  - id: deal_promo
    when: {event: Product Viewed, group_by: [properties.deal_id], count_at_least: 4, within: 30m}
    cooldown: 24h
    action: {webhook: {url: "http://127.0.0.1:9/promo"}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlinkCluster]:
    """One standalone cluster (JobManager + TaskManager processes) for this module."""
    # one slot per job: ingest, sessionize and triggers run side by side at parallelism 1
    options = ClusterOptions(slots=3, taskmanager_memory="2560m")
    c = FlinkCluster(tmp_path_factory.mktemp("flink-cluster"), options)
    with logs_on_failure(c, "start-up"):
        c.start()
    yield c
    c.stop()
    assert not c.running()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the project's packages: the job scripts for ``--python`` and the zip for
    ``--pyFiles`` come from the same files (the work tree may change while the test runs)."""
    root = tmp_path_factory.mktemp("sources")
    for pkg in PROJECT_PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    package_sources(root / "clickpulse-src.zip", root=root)
    return root


@contextmanager
def logs_on_failure(cluster: FlinkCluster, what: str) -> Iterator[None]:
    """On any failure, log the tail of every cluster log (pytest shows them with the failure)."""
    try:
        yield
    except BaseException:
        for f in cluster.log_files():
            log.error("---- %s: %s (last 150 lines) ----\n%s", what, f.name,
                      "\n".join(f.read_text(errors="replace").splitlines()[-150:]))  # fmt: skip
        raise


def submit(
    cluster: FlinkCluster,
    job: str,
    env: dict[str, str],
    sources: Path,
    *args: str,
    savepoint: str | None = None,
) -> str:
    """``flink run --detached --python <snapshot>/jobs/<job>.py --pyFiles <snapshot zip> --jarfile …``."""
    return cluster.submit(
        sources / "jobs" / f"{job}.py",
        args,
        jars=connector_jars(None),
        py_files=[sources / "clickpulse-src.zip"],
        env=env,
        savepoint=savepoint,
    )


def wait_checkpoint_after(cluster: FlinkCluster, job: str, since: float, timeout_s: float = 120) -> None:
    """Until a checkpoint of ``job`` triggered after wall time ``since`` has completed (REST API)."""

    def completed_after() -> bool:
        latest = (cluster.checkpoints(job).get("latest") or {}).get("completed") or {}
        return int(latest.get("trigger_timestamp") or 0) > since * 1000

    until(completed_after, timeout_s, f"a checkpoint of {job} after {since:.0f}", every_s=0.5)


def sessions_consistent(bootstrap: str, prefix: str) -> int:
    """Number of live sessions when each one's event count equals the enriched events of its user in
    its [start, end] (less the ones sessionize sent to events.late), else 0."""
    late = {
        orjson.loads(m.value)["message_id"]
        for m in read_topic(bootstrap, f"{prefix}events.late", quiet_s=1.0)
    }
    times: dict[str, list[int]] = defaultdict(list)
    for m in read_topic(bootstrap, f"{prefix}events.enriched", quiet_s=1.0):
        e = orjson.loads(m.value)
        if e["message_id"] not in late:
            times[e["user_key"]].append(e["event_time_ms"])
    latest: dict[str, dict] = {}
    for m in read_topic(bootstrap, f"{prefix}sessions", quiet_s=1.0):
        s = orjson.loads(m.value)
        assert m.key.decode() == s["session_id"]
        if s["session_id"] not in latest or s["version"] > latest[s["session_id"]]["version"]:
            latest[s["session_id"]] = s
    live = [s for s in latest.values() if not s["retracted"]]
    for s in live:
        assert s["user_key"] in times, f"session of unknown user {s['user_key']}"
        if s["events"] != sum(1 for t in times[s["user_key"]] if s["start_ms"] <= t <= s["end_ms"]):
            return 0  # not caught up yet
    return len(live)


def stop_feed_and_resume(
    cluster: FlinkCluster,
    job_id: str,
    job: str,
    args: tuple[str, ...],
    sources: Path,
    env: dict[str, str],
    records: list[SimRecord],
    truth: Truth,
    half: int,
) -> str:
    """``flink stop --savepointPath``; while the job is down, the records from ``half`` on plus 100
    redeliveries of valid events from before it; ``flink run --fromSavepoint`` with the same command
    line; returns the resumed job's id once it is RUNNING, has restored that savepoint and has read
    every unique event into ``events.enriched``."""
    bootstrap, prefix = env["KAFKA_BOOTSTRAP_SERVERS"], env["CLICKPULSE_TOPIC_PREFIX"]
    savepoint = cluster.stop_with_savepoint(job_id, cluster.home / "savepoints" / job)
    assert cluster.job_state(job_id) == "FINISHED"
    assert (Path(savepoint.removeprefix("file:")) / "_metadata").is_file()
    redelivered = [records[e.position] for e in truth.valid if e.position < half][:100]
    produce(bootstrap, f"{prefix}events.raw", records[half:] + redelivered)
    resumed = submit(cluster, job, env, sources, *args, savepoint=savepoint)
    cluster.wait_for_state(resumed, {"RUNNING"})
    restored = cluster.checkpoints(resumed).get("latest", {}).get("restored") or {}
    assert restored.get("is_savepoint") and restored.get("external_path") == savepoint, restored
    until(
        lambda: len(read_topic(bootstrap, f"{prefix}events.enriched", quiet_s=1.0)) >= truth.unique_valid,
        300,
        f"the resumed {job} to catch up",
    )
    return resumed


def test_flink_run_savepoint_and_resume(
    cluster: FlinkCluster, sources: Path, job_env: dict[str, str]
) -> None:
    t0 = time.monotonic()
    records, truth = simulate(3000, seed=31)
    bootstrap = job_env["KAFKA_BOOTSTRAP_SERVERS"]
    prefix = job_env["CLICKPULSE_TOPIC_PREFIX"]
    raw = f"{prefix}events.raw"
    half = len(records) // 2
    first_ids = {e.message_id for e in truth.valid if e.position < half}
    first_dlq = Counter(i.code for i in truth.invalid if i.position < half)
    assert truth.duplicate_count and truth.invalid, "the simulation has duplicates and malformed records"
    produce(bootstrap, raw, records[:half])

    ingest_args = ("--group-id", f"{prefix}ingest", "--starting-offsets", "earliest")
    with logs_on_failure(cluster, "first run"):
        ingest = submit(cluster, "ingest", job_env, sources, *ingest_args)
        sessionize_args = ("--group-id", f"{prefix}sessionize", "--starting-offsets", "earliest")
        sessionize = submit(cluster, "sessionize", job_env, sources, *sessionize_args)
        rules_file = cluster.home / "rules.yaml"
        rules_file.write_text(DEAL_PROMO)
        triggers_args = ("--group-id", f"{prefix}triggers", "--starting-offsets", "earliest")
        triggers = submit(
            cluster, "triggers", job_env, sources, *triggers_args, "--rules", str(rules_file), "--no-dispatch"
        )
        log.info("submitted ingest %s, sessionize %s, triggers %s after %.0fs", ingest, sessionize, triggers,
                 time.monotonic() - t0)  # fmt: skip
        for job in (ingest, sessionize, triggers):
            cluster.wait_for_state(job, {"RUNNING"})
        assert "clickpulse-ingest" in cluster.list_jobs()

        # -- the first half flows end to end
        until(
            lambda: len(read_topic(bootstrap, f"{prefix}events.enriched", quiet_s=1.0)) >= len(first_ids),
            300,
            "the first half in events.enriched",
        )
        # a checkpoint triggered after that has completed: anything extra would be committed by now
        wait_checkpoint_after(cluster, ingest, time.time())
        enriched = read_topic(bootstrap, f"{prefix}events.enriched")
        ids = Counter(orjson.loads(m.value)["message_id"] for m in enriched)
        assert set(ids) == first_ids and max(ids.values()) == 1
        dlq = read_topic(bootstrap, f"{prefix}events.dlq")
        assert Counter(orjson.loads(m.value)["error_code"] for m in dlq) == first_dlq

        # the Python workers import the project from the --pyFiles zip, in both execution modes
        tm_log = cluster.taskmanager_log()
        worker_paths = [ln for ln in tm_log.splitlines() if "PYTHONPATH of python worker" in ln]
        assert worker_paths and all("clickpulse-src" in ln for ln in worker_paths), worker_paths
        assert "EmbeddedPythonEnvironmentManager" in tm_log  # sessionize really runs in THREAD mode

        # -- stop ingest with a savepoint; while it is down the second half plus redeliveries; resume
        resumed = stop_feed_and_resume(
            cluster, ingest, "ingest", ingest_args, sources, job_env, records, truth, half
        )
        log.info("resumed from a savepoint after %.0fs", time.monotonic() - t0)
        wait_checkpoint_after(cluster, resumed, time.time())  # duplicates would be committed by now
        enriched = read_topic(bootstrap, f"{prefix}events.enriched")
        dlq = read_topic(bootstrap, f"{prefix}events.dlq")
        check_against_truth(enriched, dlq, truth)  # each unique event once, each bad record once
        positions = Counter((d["partition"], d["offset"]) for d in (orjson.loads(m.value) for m in dlq))
        assert len(positions) == len(truth.invalid) and max(positions.values()) == 1

        # -- sessionize kept running across ingest's restart and agrees with the enriched events
        until(lambda: sessions_consistent(bootstrap, prefix) >= 50, 240, "consistent sessions")

        # -- triggers ran alongside: every deal promo is backed by four views of one deal by its user
        def promos() -> list[dict]:
            return [orjson.loads(m.value) for m in read_topic(bootstrap, f"{prefix}actions", quiet_s=1.0)]

        until(lambda: bool(promos()), 240, "deal promos in actions")
        views = {
            e["message_id"]: e
            for e in (orjson.loads(m.value) for m in read_topic(bootstrap, f"{prefix}events.enriched"))
            if e["event"] == "Product Viewed"
        }
        for action in promos():
            assert action["rule_id"] == "deal_promo"
            backing = [views[e["message_id"]] for e in action["events"]]
            assert len(backing) == 4 and {v["user_key"] for v in backing} == {action["user_key"]}
            assert len({v["properties"]["deal_id"] for v in backing}) == 1
        # no restart of triggers here, so no at-least-once copies either
        assert max(Counter(a["action_id"] for a in promos()).values()) == 1

        for job in (resumed, sessionize, triggers):
            cluster.cancel(job)
    log.info("flink run test done in %.0fs", time.monotonic() - t0)


def test_pipeline_at_parallelism_2_under_flink_run_savepoint_and_resume(
    cluster: FlinkCluster, sources: Path, job_env: dict[str, str]
) -> None:
    """The default job, ``jobs/pipeline.py``, as ``docs/flink-run.md`` submits it, at parallelism 2
    (two subtasks of every operator, two Python workers): enriched/DLQ exactly the truth, sessions that
    agree with the enriched events, deal promos backed by four views, each action id once; then stop
    with a savepoint, more traffic with redeliveries, resume, and still each unique event exactly once."""
    t0 = time.monotonic()
    records, truth = simulate(3000, seed=37)
    bootstrap, prefix = job_env["KAFKA_BOOTSTRAP_SERVERS"], job_env["CLICKPULSE_TOPIC_PREFIX"]
    raw = f"{prefix}events.raw"
    half = len(records) // 2
    first_ids = {e.message_id for e in truth.valid if e.position < half}
    produce(bootstrap, raw, records[:half])
    rules_file = cluster.home / "rules-pipeline.yaml"
    rules_file.write_text(DEAL_PROMO)
    args = (
        *("--group-id", f"{prefix}pipeline", "--starting-offsets", "earliest", "--parallelism", "2"),
        *("--rules", str(rules_file), "--no-dispatch"),
    )
    with logs_on_failure(cluster, "pipeline"):
        job = submit(cluster, "pipeline", job_env, sources, *args)
        cluster.wait_for_state(job, {"RUNNING"})
        vertices = cluster.vertices(job)
        assert max(v["parallelism"] for v in vertices) == 2, [(v["name"], v["parallelism"]) for v in vertices]
        until(
            lambda: len(read_topic(bootstrap, f"{prefix}events.enriched", quiet_s=1.0)) >= len(first_ids),
            300,
            "the first half in events.enriched",
        )
        wait_checkpoint_after(cluster, job, time.time())
        ids = Counter(
            orjson.loads(m.value)["message_id"] for m in read_topic(bootstrap, f"{prefix}events.enriched")
        )
        assert set(ids) == first_ids and max(ids.values()) == 1

        resumed = stop_feed_and_resume(cluster, job, "pipeline", args, sources, job_env, records, truth, half)
        wait_checkpoint_after(cluster, resumed, time.time())
        enriched = read_topic(bootstrap, f"{prefix}events.enriched")
        check_against_truth(enriched, read_topic(bootstrap, f"{prefix}events.dlq"), truth)
        until(lambda: sessions_consistent(bootstrap, prefix) >= 50, 240, "consistent sessions")

        views = {
            e["message_id"]: e
            for e in (orjson.loads(m.value) for m in enriched)
            if e.get("event") == "Product Viewed"
        }
        actions = [orjson.loads(m.value) for m in read_topic(bootstrap, f"{prefix}actions", quiet_s=1.0)]
        assert actions, "deal promos in actions"
        for action in actions:
            backing = [views[e["message_id"]] for e in action["events"]]
            assert len(backing) == 4 and {v["user_key"] for v in backing} == {action["user_key"]}
            assert len({v["properties"]["deal_id"] for v in backing}) == 1
        # at-least-once across the stop: a fire between the savepoint and the stop may come again, with
        # the same id and the same events; one completing event never gets two different ids
        copies: dict[str, set[tuple[str, ...]]] = defaultdict(set)
        ids_of: dict[str, set[str]] = defaultdict(set)
        for a in actions:
            backing_ids = tuple(e["message_id"] for e in a["events"])
            copies[a["action_id"]].add(backing_ids)
            ids_of[backing_ids[-1]].add(a["action_id"])
        assert all(len(v) == 1 for v in copies.values()) and all(len(v) == 1 for v in ids_of.values())
        cluster.cancel(resumed)
    log.info("pipeline flink run test done in %.0fs", time.monotonic() - t0)


def test_flink_config_under_flink_run_leaves_cluster_settings_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under ``flink run`` the job sets no jars, checkpoint dir, worker Python, REST port or restore
    point of its own (the cluster config and the command line rule), unless they are set explicitly."""
    from connectors.flink import FlinkSettings, flink_config

    for name in [k for k in os.environ if k.startswith(("CLICKPULSE_", "PYFLINK_"))]:
        monkeypatch.delenv(name)
    ckpt = tmp_path / "ckpt" / "job-x" / "chk-3"
    ckpt.mkdir(parents=True)
    (ckpt / "_metadata").write_bytes(b"x")
    local = flink_config("x", FlinkSettings(CLICKPULSE_FLINK_CHECKPOINT_DIR=tmp_path / "ckpt"), tmp_path)
    assert {"pipeline.jars", "rest.port", "python.executable", "execution.state-recovery.path"} <= set(local)
    assert local["state.changelog.enabled"] == "true"
    changelog = (tmp_path / "flink" / "x" / "changelog").resolve()
    assert local["state.changelog.dstl.dfs.base-path"] == changelog.as_uri()
    assert local["execution.state-recovery.claim-mode"] == "CLAIM"  # the changelog cannot restore NO_CLAIM

    monkeypatch.setenv("PYFLINK_GATEWAY_PORT", "1")  # what flink run's PythonDriver sets
    cluster = flink_config("x", FlinkSettings(), tmp_path)
    for key in ("pipeline.jars", "rest.port", "python.executable", "execution.checkpointing.dir"):
        assert key not in cluster, key
    assert "state.changelog.enabled" not in cluster  # it needs a changelog dir: the cluster's config rules
    assert "execution.state-recovery.path" not in cluster  # --fromSavepoint rules
    assert cluster["table.exec.uid.generation"] == "ALWAYS" and cluster["state.backend.type"] == "rocksdb"

    explicit = flink_config(
        "x",
        FlinkSettings(CLICKPULSE_FLINK_CHECKPOINT_DIR=tmp_path / "ckpt", CLICKPULSE_FLINK_RESTORE=str(ckpt)),
        tmp_path,
    )
    assert explicit["execution.checkpointing.dir"] == (tmp_path / "ckpt").resolve().as_uri()
    assert explicit["execution.state-recovery.path"] == ckpt.resolve().as_uri()
    logged = flink_config("x", FlinkSettings(CLICKPULSE_FLINK_CHANGELOG_DIR=tmp_path / "log"), tmp_path)
    assert logged["state.changelog.dstl.dfs.base-path"] == (tmp_path / "log").resolve().as_uri()
    off = flink_config("x", FlinkSettings(CLICKPULSE_FLINK_STATE_CHANGELOG="false"), tmp_path)
    assert off["state.changelog.enabled"] == "false" and "state.changelog.storage" not in off
