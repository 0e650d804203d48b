"""A standalone Flink session cluster from the PyFlink distribution, and the ``flink`` CLI against it.

The ``apache-flink`` wheel ships a whole Flink distribution inside the ``pyflink`` package (``bin/``,
``conf/``, ``lib/``, ``opt/``). :class:`FlinkCluster` starts one JobManager and one TaskManager from it as
foreground processes (``bin/jobmanager.sh start-foreground`` / ``bin/taskmanager.sh start-foreground``),
each in its own process group that only :meth:`FlinkCluster.stop` ends. Everything else is private to
``home``:

    <home>/conf/          config.yaml (loopback, free ports, modest memory) + the log4j files
    <home>/lib/           links to the distribution's lib/*.jar and opt/flink-python*.jar
    <home>/log/           jobmanager.log, taskmanager.log (stdout+stderr), client logs
    <home>/checkpoints/   execution.checkpointing.dir
    <home>/savepoints/    execution.checkpointing.savepoint-dir
    <home>/tmp/           io.tmp.dirs, blob storage, web uploads, pid files

Jobs are submitted with ``flink run -d -py …`` (:meth:`FlinkCluster.submit`), stopped with a savepoint
with ``flink stop --savepointPath`` and resumed with ``flink run -s``; job state comes from the REST API.
The command lines are the ones ``docs/flink-run.md`` tells users to run against their own cluster.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from devstack.stack import free_port

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The project's packages shipped to the cluster with ``--pyFiles``.
PROJECT_PACKAGES = ("jobs", "udfs", "connectors")
#: Job states after which a job never runs again.
TERMINAL_STATES = frozenset({"FINISHED", "CANCELED", "FAILED"})

_JOB_ID = re.compile(r"JobID ([0-9a-f]{32})")
_SAVEPOINT = re.compile(r"Savepoint completed\. Path: (\S+)")


class FlinkClusterError(RuntimeError):
    """The cluster did not start, or a ``flink`` command failed (the message says which and why)."""


def flink_home() -> Path:
    """The Flink distribution inside the installed ``pyflink`` package (has ``bin/``, ``lib/``, ``opt/``)."""
    spec = importlib.util.find_spec("pyflink")
    if spec is None or spec.origin is None:
        raise FlinkClusterError("pyflink is not installed: pip install apache-flink")
    home = Path(spec.origin).resolve().parent
    if not (home / "bin" / "flink").is_file() or not any((home / "lib").glob("flink-dist*.jar")):
        raise FlinkClusterError(f"no Flink distribution (bin/flink, lib/flink-dist*.jar) under {home}")
    return home


def java_home() -> str:
    """The Java installation of the ``java`` on ``PATH`` (empty when there is none).

    The cluster scripts export ``JAVA_HOME`` even when it is empty, and PyFlink inside a TaskManager
    then looks for ``bin/java`` relative to nothing: THREAD-mode jobs whose state has a TTL start a
    py4j gateway JVM from the embedded interpreter (PyFlink builds the RocksDB TTL cleanup default
    through it), which needs a real ``JAVA_HOME``.
    """
    java = shutil.which("java")
    return str(Path(java).resolve().parent.parent) if java else ""


def package_sources(dest: Path, packages: Sequence[str] = PROJECT_PACKAGES, root: Path = REPO_ROOT) -> Path:
    """Zip the project's packages (``jobs/``, ``udfs/``, ``connectors/``, with package data) into
    ``dest`` for ``flink run --pyFiles``: Flink extracts the zip on every TaskManager and puts it on the
    Python workers' ``PYTHONPATH`` (and on the client's)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for pkg in packages:
            for path in sorted((root / pkg).rglob("*")):
                rel = path.relative_to(root)
                if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in (".pyc", ".pyo"):
                    zf.write(path, rel.as_posix())
    return dest


def _exited(pid: int) -> bool:
    """True once our child ``pid`` has exited, without reaping it (its pid and group id stay reserved)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.returncode is None and not _exited(proc.pid)


def _stop_group(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the group led by our child ``proc``, SIGKILL what is left after ``timeout_s``, then reap.

    The leader is only reaped after the group got its SIGKILL, so the group id cannot have been reused.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _exited(proc.pid):
            log.warning("pid %d did not stop within %.0fs; killing its group", proc.pid, timeout_s)
        # whatever is left of the group: the JVM if it hung, Python workers that outlived it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _local_path(jar: str | Path) -> str:
    text = str(jar)
    return text.removeprefix("file://") if text.startswith("file://") else text


def _as_url(jar: str | Path) -> str:
    text = str(jar)
    return text if "://" in text else Path(text).resolve().as_uri()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class ClusterOptions:
    """Size and settings of the local cluster (sized for a 2-core box shared with Kafka)."""

    slots: int = 2
    """``taskmanager.numberOfTaskSlots``."""
    taskmanager_memory: str = "2g"
    """``taskmanager.memory.process.size`` (JVM + managed memory for RocksDB and the Python workers)."""
    jobmanager_memory: str = "1g"
    """``jobmanager.memory.process.size``."""
    python_executable: str = ""
    """``python.executable`` / ``python.client.executable`` (default: the interpreter running this code)."""
    startup_timeout_s: float = 180.0
    """How long :meth:`FlinkCluster.start` waits for the REST API and the TaskManager's slots."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """More ``config.yaml`` entries (flat keys), applied last."""


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_file: Path


class FlinkCluster:
    """One JobManager + one TaskManager on loopback, configured under ``home`` (see the module doc)."""

    def __init__(self, home: Path, options: ClusterOptions | None = None) -> None:
        """Nothing starts until :meth:`start`; ``home`` is created then."""
        self.home = home.resolve()
        self.options = options or ClusterOptions()
        self.flink_home = flink_home()
        self.conf_dir = self.home / "conf"
        self.lib_dir = self.home / "lib"
        self.log_dir = self.home / "log"
        self.tmp_dir = self.home / "tmp"
        self.checkpoint_dir = self.home / "checkpoints"
        self.savepoint_dir = self.home / "savepoints"
        self.python = self.options.python_executable or sys.executable
        self.rest_port = 0
        self.rpc_port = 0
        self._procs: list[_Process] = []

    # ------------------------------------------------------------------------------------ config
    @property
    def rest_url(self) -> str:
        """The JobManager's REST API (and web UI)."""
        return f"http://127.0.0.1:{self.rest_port}"

    def config(self) -> dict[str, Any]:
        """The cluster's ``config.yaml`` as flat keys: the distribution's, overridden for this box."""
        base = yaml.safe_load((self.flink_home / "conf" / "config.yaml").read_text()) or {}
        conf = _flatten(base)
        o = self.options
        conf.update(
            {
                "jobmanager.rpc.address": "127.0.0.1",
                "jobmanager.rpc.port": self.rpc_port,
                "jobmanager.bind-host": "127.0.0.1",
                "jobmanager.memory.process.size": o.jobmanager_memory,
                "taskmanager.host": "127.0.0.1",
                "taskmanager.bind-host": "127.0.0.1",
                "taskmanager.numberOfTaskSlots": o.slots,
                "taskmanager.memory.process.size": o.taskmanager_memory,
                "rest.address": "127.0.0.1",
                "rest.bind-address": "127.0.0.1",
                "rest.port": self.rest_port,
                "parallelism.default": 1,
                # a busy 2-core box: slow heartbeats and RPCs are load, not failures
                "heartbeat.timeout": 120000,
                "pekko.ask.timeout": "60 s",
                "io.tmp.dirs": str(self.tmp_dir / "io"),
                "blob.storage.directory": str(self.tmp_dir / "blob"),
                "web.tmpdir": str(self.tmp_dir / "web"),
                # the CLI's Python driver unpacks --pyFiles under java.io.tmpdir
                "env.java.opts.client": f"-Djava.io.tmpdir={self.tmp_dir / 'client'}",
                "env.log.dir": str(self.log_dir),
                "env.pid.dir": str(self.tmp_dir / "pid"),
                "state.backend.type": "rocksdb",
                "execution.checkpointing.dir": self.checkpoint_dir.as_uri(),
                "execution.checkpointing.savepoint-dir": self.savepoint_dir.as_uri(),
                "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
                "python.executable": self.python,
                "python.client.executable": self.python,
            }
        )
        conf.update(o.extra)
        return conf

    def write_conf(self) -> None:
        """Write ``<home>/conf``: ``config.yaml`` plus the distribution's log4j/logback files."""
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        for src in (self.flink_home / "conf").iterdir():
            if src.is_file() and src.name != "config.yaml":
                shutil.copyfile(src, self.conf_dir / src.name)
        (self.conf_dir / "config.yaml").write_text(
            "# Written by devstack.flink_cluster: a private standalone cluster on loopback.\n"
            + yaml.safe_dump(self.config(), sort_keys=True, width=1_000_000)
        )

    def write_lib(self) -> None:
        """``<home>/lib``: links to the distribution's ``lib/*.jar`` plus ``opt/flink-python*.jar``.

        With flink-python (and the pemja it bundles) on the cluster's own classpath, the embedded
        interpreter of THREAD-mode jobs is loaded once per TaskManager JVM: from a job's user-code
        classloader, pemja cannot load its native library again after a restart or for a second job.
        """
        self.lib_dir.mkdir(parents=True, exist_ok=True)
        for old in self.lib_dir.glob("*.jar"):
            old.unlink()
        jars = [
            *(self.flink_home / "lib").glob("*.jar"),
            *(self.flink_home / "opt").glob("flink-python*.jar"),
        ]
        for jar in jars:
            (self.lib_dir / jar.name).symlink_to(jar)

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with this cluster's variables: our conf, lib, log and pid
        dirs, a real ``JAVA_HOME``, this Python first on ``PATH``. Every Flink script we run gets it."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("FLINK_")}
        env.pop("PYFLINK_GATEWAY_PORT", None)
        env.update(
            {
                "JAVA_HOME": env.get("JAVA_HOME") or java_home(),
                "FLINK_IDENT_STRING": "clickpulse",
                "FLINK_LIB_DIR": str(self.lib_dir),
                "FLINK_CONF_DIR": str(self.conf_dir),
                "FLINK_LOG_DIR": str(self.log_dir),
                "FLINK_PID_DIR": str(self.tmp_dir / "pid"),
                "PATH": os.pathsep.join([str(Path(self.python).parent), env.get("PATH", "")]),
            }
        )
        return env

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Write the config, start the JobManager and the TaskManager, wait until every slot is up."""
        if self._procs:
            raise FlinkClusterError("cluster already started")
        for d in (
            self.log_dir,
            self.checkpoint_dir,
            self.savepoint_dir,
            self.tmp_dir / "pid",
            self.tmp_dir / "client",
        ):
            d.mkdir(parents=True, exist_ok=True)
        self.rest_port = free_port()
        self.rpc_port = free_port()
        while self.rpc_port == self.rest_port:
            self.rpc_port = free_port()
        self.write_conf()
        self.write_lib()
        try:
            self._spawn("jobmanager", [str(self.flink_home / "bin" / "jobmanager.sh"), "start-foreground"])
            self._wait(lambda: self._get("/overview") is not None, "the JobManager's REST API")
            self._spawn("taskmanager", [str(self.flink_home / "bin" / "taskmanager.sh"), "start-foreground"])
            self._wait(
                lambda: (self._get("/overview") or {}).get("slots-total", 0) >= self.options.slots,
                "the TaskManager's slots",
            )
        except BaseException:
            self.stop()
            raise
        log.info("flink cluster up: %s (conf %s)", self.rest_url, self.conf_dir)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log_file = self.log_dir / f"{name}.log"
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.home,
                env=self.environment(),
                start_new_session=True,
            )
        self._procs.append(_Process(name, proc, log_file))

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        while time.monotonic() < deadline:
            for p in self._procs:
                if not _alive(p.popen):
                    raise FlinkClusterError(f"{p.name} exited during start-up; see {p.log_file}")
            if ready():
                return
            time.sleep(0.5)
        raise FlinkClusterError(f"timed out after {self.options.startup_timeout_s:.0f}s waiting for {what}")

    def running(self) -> bool:
        """True while both processes we started are alive."""
        return bool(self._procs) and all(_alive(p.popen) for p in self._procs)

    def pids(self) -> dict[str, int]:
        """PIDs (= process group ids) of the processes this object started, by role."""
        return {p.name: p.popen.pid for p in self._procs}

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the TaskManager, then the JobManager: SIGTERM to the process groups this object started
        (the JVM and the Python workers it forked), SIGKILL after ``timeout_s``."""
        for p in reversed(self._procs):
            _stop_group(p.popen, timeout_s)
        self._procs.clear()

    def __enter__(self) -> FlinkCluster:
        """Start the cluster."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the cluster."""
        self.stop()

    def log_files(self) -> list[Path]:
        """Every log under ``<home>/log`` (process output, Flink's own logs, client logs)."""
        return sorted(p for p in self.log_dir.glob("*.log") if p.is_file())

    def taskmanager_log(self) -> str:
        """The TaskManager's Flink log (worker set-up, task failures, our UDFs' log lines)."""
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*-taskexecutor-*.log"))
        )

    # --------------------------------------------------------------------------------------- CLI
    def flink(self, *args: str, timeout_s: float = 300.0, env: Mapping[str, str] | None = None) -> str:
        """Run ``bin/flink <args>`` against this cluster; return its output, raise on failure.

        ``env`` (default ``os.environ``) is the environment of the CLI and so of a Python driver it
        starts: job settings (``KAFKA_BOOTSTRAP_SERVERS``, ``CLICKPULSE_*``) go there.
        """
        cmd = [str(self.flink_home / "bin" / "flink"), *args]
        log.info("$ %s", " ".join(cmd))
        proc = subprocess.Popen(
            cmd,
            env=self.environment(env),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # its own group: a timeout ends the CLI and the Python driver it ran
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise FlinkClusterError(
                f"flink {' '.join(args[:1])} still running after {timeout_s:.0f}s:\n{out[-6000:]}"
            ) from exc
        if proc.returncode != 0:
            raise FlinkClusterError(f"flink {' '.join(args[:1])} exited {proc.returncode}:\n{out[-6000:]}")
        return out

    def submit(
        self,
        job_file: Path | str,
        args: Sequence[str] = (),
        *,
        jars: Iterable[str | Path] = (),
        py_files: Iterable[Path | str] = (),
        savepoint: str | None = None,
        python_path: str | None = None,
        conf: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 300.0,
    ) -> str:
        """``flink run -d -py job_file`` (optionally ``-s savepoint``); returns the new job's id.

        ``jars`` are connector jars (paths or ``file://`` URLs): the first is shipped with the job
        (``--jarfile``), further ones go to ``--classpath`` (same path on every node); ``py_files`` go to
        ``--pyFiles``, ``python_path`` to ``--pyPythonPath`` (extra paths for the workers' interpreter),
        ``conf`` becomes ``-Dkey=value`` and ``env`` is the Python driver's environment (see :meth:`flink`).
        """
        cmd = ["run", "--detached", "--python", str(job_file)]
        files = ",".join(str(f) for f in py_files)
        if files:
            cmd += ["--pyFiles", files]
        cmd += ["--pyExecutable", self.python, "--pyClientExecutable", self.python]
        if python_path:
            cmd += ["--pyPythonPath", python_path]
        for i, jar in enumerate(jars):
            # the first jar is shipped with the job like a Java job's jar; further ones must be
            # readable at the same path on every node (-C adds them to each user-code classloader)
            cmd += ["--jarfile", _local_path(jar)] if i == 0 else ["--classpath", _as_url(jar)]
        for k, v in (conf or {}).items():
            cmd += [f"-D{k}={v}"]
        if savepoint:
            cmd += ["--fromSavepoint", savepoint]
        cmd += args
        before = {j["jid"] for j in self.jobs()}
        out = self.flink(*cmd, timeout_s=timeout_s, env=env)
        found = _JOB_ID.findall(out)
        if found:
            log.info("flink run: job %s submitted", found[-1])
            return found[-1]
        new = [j["jid"] for j in self.jobs() if j["jid"] not in before]
        if len(new) == 1:
            log.warning("flink run printed no job id; the new job on the cluster is %s", new[0])
            return str(new[0])
        raise FlinkClusterError(f"flink run printed no job id:\n{out[-6000:]}")

    def stop_with_savepoint(
        self, job_id: str, directory: Path | None = None, *, timeout_s: float = 300.0
    ) -> str:
        """``flink stop --savepointPath dir job_id``: a final savepoint, then the job finishes.

        Returns the savepoint's path (a ``file:`` URI) for ``flink run -s``.
        """
        target = (directory or self.savepoint_dir).resolve()
        self.wait_for_running_tasks(job_id, timeout_s=timeout_s)  # a savepoint needs every task running
        out = self.flink("stop", "--savepointPath", target.as_uri(), job_id, timeout_s=timeout_s)
        found = _SAVEPOINT.findall(out)
        if not found:
            raise FlinkClusterError(f"flink stop printed no savepoint path:\n{out[-6000:]}")
        self.wait_for_state(job_id, TERMINAL_STATES, timeout_s=timeout_s)
        return str(found[-1])

    def cancel(self, job_id: str, *, timeout_s: float = 120.0) -> None:
        """``flink cancel job_id``, then wait until the job is CANCELED."""
        self.flink("cancel", job_id, timeout_s=timeout_s)
        self.wait_for_state(job_id, TERMINAL_STATES, timeout_s=timeout_s)

    def list_jobs(self) -> str:
        """``flink list --all`` (the CLI's own table of jobs)."""
        return self.flink("list", "--all", timeout_s=120.0)

    # -------------------------------------------------------------------------------------- REST
    def _get(self, path: str) -> Any:
        try:
            r = httpx.get(f"{self.rest_url}{path}", timeout=10.0)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def jobs(self) -> list[dict[str, Any]]:
        """``/jobs/overview``: one dict per job (``jid``, ``name``, ``state``, ``start-time``, …)."""
        data = self._get("/jobs/overview") or {}
        return list(data.get("jobs", []))

    def job_state(self, job_id: str) -> str:
        """The job's state (``RUNNING``, ``FINISHED``, …), or ``UNKNOWN`` when the REST API has no answer."""
        data = self._get(f"/jobs/{job_id}") or {}
        return str(data.get("state", "UNKNOWN"))

    def vertices(self, job_id: str) -> list[dict[str, Any]]:
        """The job graph's vertices (``name``, ``parallelism``, ``status``, …) from ``/jobs/<id>``."""
        data = self._get(f"/jobs/{job_id}") or {}
        return list(data.get("vertices", []))

    def wait_for_state(self, job_id: str, states: Iterable[str], *, timeout_s: float = 180.0) -> str:
        """Wait until the job is in one of ``states``; raise when it ends in another one."""
        wanted = set(states)
        deadline = time.monotonic() + timeout_s
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if state in TERMINAL_STATES:
                raise FlinkClusterError(f"job {job_id} ended {state}: {self.exceptions(job_id)}")
            time.sleep(1.0)
        raise FlinkClusterError(
            f"job {job_id} still {state} after {timeout_s:.0f}s (wanted {sorted(wanted)})"
        )

    def wait_for_running_tasks(self, job_id: str, *, timeout_s: float = 180.0) -> None:
        """Wait until the job is RUNNING and every one of its tasks is RUNNING (sources consume)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            data = self._get(f"/jobs/{job_id}") or {}
            state = data.get("state", "UNKNOWN")
            if state in TERMINAL_STATES:
                raise FlinkClusterError(f"job {job_id} ended {state}: {self.exceptions(job_id)}")
            vertices = data.get("vertices", [])
            if state == "RUNNING" and vertices and all(v.get("status") == "RUNNING" for v in vertices):
                return
            time.sleep(1.0)
        raise FlinkClusterError(f"job {job_id}: tasks not all RUNNING after {timeout_s:.0f}s")

    def exceptions(self, job_id: str) -> str:
        """The root exception the JobManager recorded for the job (empty when none)."""
        data = self._get(f"/jobs/{job_id}/exceptions") or {}
        history = data.get("exceptionHistory", {}).get("entries", [])
        if history:
            return str(history[0].get("stacktrace", ""))[:4000]
        return str(data.get("root-exception", ""))[:4000]

    def checkpoints(self, job_id: str) -> dict[str, Any]:
        """``/jobs/<id>/checkpoints`` (counts, latest completed checkpoint)."""
        return dict(self._get(f"/jobs/{job_id}/checkpoints") or {})
