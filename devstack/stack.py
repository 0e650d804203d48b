"""The local stack: a real Kafka broker (KRaft), Redis, the embedded ClickHouse endpoint, the collector
and the dashboard.

``clickpulse stack up`` starts whatever is not configured externally, waits until each service is
healthy, creates the contract topics and writes ``<home>/stack.env``. ``down`` stops exactly the
processes ``up`` started (by PID, verified against the command line it recorded), ``status`` reports
health. Everything binds to loopback and lives under ``<home>`` (default ``./.clickpulse``):

    <home>/stack.json      what up started: pid, ports, command marker per service
    <home>/stack.env       KAFKA_BOOTSTRAP_SERVERS, REDIS_URL, CLICKHOUSE_URL, CLICKPULSE_DASHBOARD_URL,
                           the read-only ClickHouse user (CLICKPULSE_CLICKHOUSE_READONLY_USER/_PASSWORD),
                           CLICKPULSE_COLLECTOR_URL, CLICKPULSE_WRITE_KEY
    <home>/logs/*.log      one log per service
    <home>/kafka/          server.properties, log4j2.properties, data/ (formatted on first start)
    <home>/redis/          appendonly data
    <home>/clickhouse/     the chDB data directory (owned by the endpoint process only)
    <home>/collector/      write_key: the local write key (0600, generated on first start)
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from connectors import kafka as kafka_io
from connectors.clickhouse import redact_url
from connectors.settings import (
    CONTRACT_TOPICS,
    DEFAULT_STATE_DIR,
    STATE_DIR_VAR,
    Connections,
    Settings,
    translate,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("kafka", "redis", "clickhouse", "collector", "dashboard")
ENV_VARS = {
    "kafka": "KAFKA_BOOTSTRAP_SERVERS",
    "redis": "REDIS_URL",
    "clickhouse": "CLICKHOUSE_URL",
    "dashboard": "CLICKPULSE_DASHBOARD_URL",
    "collector": "CLICKPULSE_COLLECTOR_URL",
}
#: The read-only ClickHouse user of the embedded endpoint (BI, the dashboard): its name, and the variables
#: that carry it in stack.env (the dashboard's settings read them).
READONLY_USER = "clickpulse_readonly"
READONLY_USER_VAR = "CLICKPULSE_CLICKHOUSE_READONLY_USER"
READONLY_PASSWORD_VAR = "CLICKPULSE_CLICKHOUSE_READONLY_PASSWORD"  # noqa: S105 - a variable name
#: stack.env's line with the collector's write key (a secret: never printed).
WRITE_KEY_VAR = "CLICKPULSE_WRITE_KEY"


def _kafka_cluster_id() -> str:
    """A random KRaft cluster id (base64url of a UUID) that does not start with ``-``: the storage tool's
    argument parser would take such an id for an option (Kafka's own ``random-uuid`` avoids it too)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class StackError(RuntimeError):
    """A problem the user can fix; the message is one line saying what to do."""


class StackSettings(Settings):
    """Options of the local stack (``clickpulse stack up``); the topic prefix is
    :class:`connectors.settings.Connections`' and comes with the environment the stack is given."""

    home: Path = Field(Path(DEFAULT_STATE_DIR), alias=STATE_DIR_VAR)
    """``CLICKPULSE_STATE_DIR``: state directory (default ``.clickpulse``)."""
    jars_dir: Path | None = Field(None, alias="CLICKPULSE_MAVEN_JARS_DIR")
    """``CLICKPULSE_MAVEN_JARS_DIR``: where ``make jars`` put the jars (default
    ``<repo>/.clickpulse/jars``)."""
    kafka_port: int | None = Field(None, alias="CLICKPULSE_KAFKA_PORT")
    """``CLICKPULSE_KAFKA_PORT``: broker port (default: last used, else a free port)."""
    kafka_controller_port: int | None = Field(None, alias="CLICKPULSE_KAFKA_CONTROLLER_PORT")
    """``CLICKPULSE_KAFKA_CONTROLLER_PORT``: KRaft controller port (default: last used, else free)."""
    redis_port: int | None = Field(None, alias="CLICKPULSE_REDIS_PORT")
    """``CLICKPULSE_REDIS_PORT``: Redis port (default: last used, else a free port)."""
    clickhouse_port: int | None = Field(None, alias="CLICKPULSE_CLICKHOUSE_PORT")
    """``CLICKPULSE_CLICKHOUSE_PORT``: ClickHouse HTTP port (default: last used, else a free port)."""
    dashboard_port: int | None = Field(None, alias="CLICKPULSE_STACK_DASHBOARD_PORT")
    """``CLICKPULSE_STACK_DASHBOARD_PORT``: port of the dashboard ``up`` starts (default: last used, else a
    free port)."""
    kafka_heap: str = Field("768m", alias="CLICKPULSE_KAFKA_HEAP")
    """``CLICKPULSE_KAFKA_HEAP``: broker JVM heap (default ``768m``)."""
    topic_partitions: int = Field(4, alias="CLICKPULSE_TOPIC_PARTITIONS", gt=0)
    """``CLICKPULSE_TOPIC_PARTITIONS``: partitions of each contract topic created (default 4)."""
    startup_timeout_ms: int = Field(120_000, alias="CLICKPULSE_STACK_STARTUP_TIMEOUT_MS", gt=0)
    """``CLICKPULSE_STACK_STARTUP_TIMEOUT_MS``: how long ``up`` waits for health (default 120000)."""

    @property
    def root(self) -> Path:
        """Absolute state directory."""
        return self.home.resolve()

    @property
    def jars(self) -> Path:
        """Absolute jar cache directory."""
        return (self.jars_dir or REPO_ROOT / ".clickpulse" / "jars").resolve()


@dataclass
class ServiceState:
    """What ``up`` recorded about one service."""

    name: str
    url: str
    external: bool = False
    pid: int | None = None
    ports: dict[str, int] = field(default_factory=dict)
    marker: str = ""
    secrets: dict[str, str] = field(default_factory=dict)
    """Credentials the service was started with (the embedded endpoint's read-only user)."""

    def to_json(self) -> dict[str, object]:
        """Plain dict for stack.json."""
        return {
            "url": self.url,
            "external": self.external,
            "pid": self.pid,
            "ports": self.ports,
            "marker": self.marker,
            "secrets": self.secrets,
        }


# --------------------------------------------------------------------------- files and URLs


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600 from the start (never readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def display_url(url: str) -> str:
    """``url`` as it may be printed or logged: any password replaced by ``***``."""
    if "://" not in url:
        return url  # host:port lists (Kafka) hold no credentials
    try:
        return redact_url(url)
    except ValueError:
        return url.split("://", 1)[0] + "://***"  # unparsable: show nothing that could be a secret


# --------------------------------------------------------------------------- processes and ports


def pid_alive(pid: int | None, marker: str = "") -> bool:
    """True when ``pid`` runs and (if given) its command line contains ``marker``."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # zombie: exited, not yet reaped
        return False
    return marker in cmdline


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` and we may bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LISTEN_PORTS_FLOOR = 10_000


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (32768 when it cannot be read)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now, picked at random *below* the kernel's ephemeral range.

    A port the kernel picks (bind to 0) comes from the ephemeral range, which every outgoing connection
    (Kafka clients, JVMs, Redis clients) draws from too: one of them could take it between our pick and
    the server's bind ("Address already in use" in a test's own Kafka). Below that range only listeners
    bind. Falls back to the kernel's pick when no port there is free."""
    low = _ephemeral_low()
    if low > _LISTEN_PORTS_FLOOR + 100:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(_LISTEN_PORTS_FLOOR, low)
            if port_free(port, host):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_pid(pid: int, marker: str, *, timeout_s: float = 30.0) -> None:
    """SIGTERM the process group we started, then SIGKILL after ``timeout_s``."""
    if not pid_alive(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid, marker):
            return
        time.sleep(0.2)
    log.warning("pid %d did not stop within %.0fs; killing it", pid, timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for _ in range(50):
        if not pid_alive(pid, marker):
            return
        time.sleep(0.1)


def _spawn(cmd: list[str], log_file: Path, cwd: Path, env: Mapping[str, str] | None = None) -> int:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv built here
            cmd,
            env=None if env is None else dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )
    return proc.pid


# --------------------------------------------------------------------------- the stack


class Stack:
    """Start, stop and inspect the local services described by :class:`StackSettings`."""

    def __init__(self, settings: StackSettings, environ: Mapping[str, str] | None = None) -> None:
        """Use ``environ`` (default ``os.environ``; not ``stack.env``) to find externally configured
        services and the topic prefix."""
        self.settings = settings
        self.environ = translate(os.environ if environ is None else environ)
        self.topic_prefix = Connections.from_env(self.environ).topic_prefix
        self.root = settings.root
        self.logs = self.root / "logs"
        self.state_file = self.root / "stack.json"
        self._services: dict[str, ServiceState] = {}
        self.env_file = self.root / "stack.env"

    # state ------------------------------------------------------------------------------------
    def load_state(self) -> dict[str, ServiceState]:
        """Read stack.json (empty when absent or unreadable)."""
        try:
            raw = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        out: dict[str, ServiceState] = {}
        for name, item in raw.get("services", {}).items():
            out[name] = ServiceState(
                name=name,
                url=str(item.get("url", "")),
                external=bool(item.get("external", False)),
                pid=item.get("pid"),
                ports={k: int(v) for k, v in item.get("ports", {}).items()},
                marker=str(item.get("marker", "")),
                secrets={str(k): str(v) for k, v in (item.get("secrets") or {}).items()},
            )
        return out

    def save_state(self, state: dict[str, ServiceState]) -> None:
        """Write stack.json atomically, readable by the owner only (external URLs may hold passwords)."""
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"services": {n: s.to_json() for n, s in state.items()}}, indent=2)
        write_private(self.state_file, text)

    def write_env(self, state: dict[str, ServiceState]) -> None:
        """Write stack.env with one line per service, readable by the owner only (it may hold passwords)."""
        lines = [f"{ENV_VARS[name]}={state[name].url}" for name in SERVICES if name in state]
        readonly = self.readonly_credentials(state.get("clickhouse"))
        if readonly:
            lines += [f"{READONLY_USER_VAR}={readonly[0]}", f"{READONLY_PASSWORD_VAR}={readonly[1]}"]
        key = self.write_key(state)
        if key:
            lines.append(f"{WRITE_KEY_VAR}={key}")
        if self.topic_prefix:
            lines.append(f"CLICKPULSE_TOPIC_PREFIX={self.topic_prefix}")
        write_private(self.env_file, "\n".join(lines) + "\n")

    def readonly_credentials(self, clickhouse: ServiceState | None) -> tuple[str, str] | None:
        """The read-only ClickHouse user and password: the environment's when both are set, else those the
        embedded endpoint was started with (None for an external server without them)."""
        user, password = self.environ.get(READONLY_USER_VAR), self.environ.get(READONLY_PASSWORD_VAR)
        if user and password is not None:
            return user, password
        if clickhouse is not None and not clickhouse.external and clickhouse.secrets.get("readonly_user"):
            return clickhouse.secrets["readonly_user"], clickhouse.secrets.get("readonly_password", "")
        return None

    def write_key(self, state: Mapping[str, ServiceState]) -> str:
        """The collector's write key: the environment's for an external collector, else the local one
        (generated once into ``<home>/collector/write_key``, mode 0600)."""
        svc = state.get("collector")
        if svc is None:
            return ""
        if svc.external:
            return self.environ.get(WRITE_KEY_VAR, "")
        path = self.root / "collector" / "write_key"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_private(path, "wk_" + secrets.token_urlsafe(24))
        return path.read_text().strip()

    def external_url(self, name: str, state: dict[str, ServiceState]) -> str | None:
        """The URL of an externally configured service, or None when we should run it ourselves."""
        value = self.environ.get(ENV_VARS[name])
        if not value:
            return None
        mine = state.get(name)
        if mine and not mine.external and mine.url == value:
            return None  # the user sourced our own stack.env
        return value

    # health -----------------------------------------------------------------------------------
    @staticmethod
    def healthy(name: str, url: str) -> bool:
        """Probe one service."""
        if name == "kafka":
            return kafka_io.is_healthy(url, timeout_s=2.0)
        if name == "redis":
            import redis

            try:
                return bool(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping())
            except redis.RedisError:
                return False
        if name == "dashboard":
            try:
                with urllib.request.urlopen(f"{url.rstrip('/')}/healthz", timeout=2) as r:  # noqa: S310
                    return bool(r.status == 200)
            except (OSError, urllib.error.URLError, ValueError):
                return False
        try:
            base = url.split("@", 1)[-1] if "@" in url else url.split("://", 1)[-1]
            scheme = url.split("://", 1)[0]
            with urllib.request.urlopen(f"{scheme}://{base.rstrip('/')}/ping", timeout=2) as r:  # noqa: S310
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError, ValueError):
            return False

    # up ---------------------------------------------------------------------------------------
    def _port(self, name: str, key: str, configured: int | None, previous: ServiceState | None) -> int:
        if configured:
            if not port_free(configured):
                raise StackError(
                    f"{name}: port {configured} is taken by another process; "
                    f"set CLICKPULSE_{key.upper()}_PORT to a free port or stop that process"
                )
            return configured
        if previous and key in previous.ports and port_free(previous.ports[key]):
            return previous.ports[key]
        return free_port()

    def up(self, *, progress: Callable[[str], None] = log.info) -> dict[str, ServiceState]:
        """Start what is not running or external, wait for health, create topics, write stack.env."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        state = self.load_state()
        new_state: dict[str, ServiceState] = {}
        self._services = new_state  # later services read the earlier ones' addresses from it
        started: list[str] = []
        try:
            self._start_missing(state, new_state, started, progress)
            for name in SERVICES:
                self._wait(name, new_state[name])
                if name in started:
                    progress(f"{name}: started (pid {new_state[name].pid}) at {new_state[name].url}")
            self.save_state(new_state)
            self.write_env(new_state)
            created = kafka_io.ensure_topics(
                new_state["kafka"].url,
                {f"{self.topic_prefix}{t}": cfg for t, cfg in CONTRACT_TOPICS.items()},
                partitions=self.settings.topic_partitions,
            )
        except KeyboardInterrupt:
            # Ctrl-C: what this run started goes again (what was already running stays)
            for name in reversed(started):
                svc = new_state[name]
                if svc.pid:
                    progress(f"{name}: interrupted, stopping pid {svc.pid}")
                    stop_pid(svc.pid, svc.marker)
                    svc.pid = None
            self.save_state({**state, **new_state})
            raise
        except BaseException:
            self.save_state({**state, **new_state})
            raise
        if created:
            progress(f"kafka: created topics {', '.join(created)}")
        return new_state

    def _start_missing(
        self,
        state: dict[str, ServiceState],
        new_state: dict[str, ServiceState],
        started: list[str],
        progress: Callable[[str], None],
    ) -> None:
        """Fill ``new_state`` with every service: external, already running, or started now (appended to
        ``started``)."""
        for name in SERVICES:
            ext = self.external_url(name, state)
            if ext:
                progress(f"{name}: using external {ENV_VARS[name]}")
                new_state[name] = ServiceState(name=name, url=ext, external=True)
                continue
            prev = state.get(name)
            if prev and not prev.external and pid_alive(prev.pid, prev.marker):
                progress(f"{name}: already running (pid {prev.pid})")
                new_state[name] = prev
                continue
            new_state[name] = getattr(self, f"_start_{name}")(prev if prev and not prev.external else None)
            started.append(name)
            self.save_state({**state, **new_state})

    def _wait(self, name: str, svc: ServiceState) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_ms / 1000
        while time.monotonic() < deadline:
            if self.healthy(name, svc.url):
                return
            if not svc.external and not pid_alive(svc.pid, svc.marker):
                raise StackError(f"{name} exited during start-up; see {self.logs / (name + '.log')}")
            time.sleep(0.3)
        raise StackError(
            f"{name} at {display_url(svc.url)} not healthy after "
            f"{self.settings.startup_timeout_ms / 1000:.0f}s; see {self.logs / (name + '.log')}"
        )

    def _start_kafka(self, prev: ServiceState | None) -> ServiceState:
        java = shutil.which("java")
        if not java:
            raise StackError(
                "java not found: install a Java 17 runtime "
                "(apt-get install openjdk-17-jre-headless) or put it on PATH"
            )
        jars = self.settings.jars / "kafka"
        if not any(jars.glob("kafka_*.jar")):
            raise StackError(f"Kafka broker jars not found in {jars}: run `make jars`")
        port = self._port("kafka", "kafka", self.settings.kafka_port, prev)
        cport = self._port("kafka", "kafka_controller", self.settings.kafka_controller_port, prev)
        while cport == port:
            cport = free_port()
        kdir = self.root / "kafka"
        data = kdir / "data"
        kdir.mkdir(parents=True, exist_ok=True)
        props = kdir / "server.properties"
        props.write_text(
            _KAFKA_PROPERTIES.format(
                port=port, cport=cport, data=data, partitions=self.settings.topic_partitions
            )
        )
        log4j = kdir / "log4j2.properties"
        log4j.write_text(_KAFKA_LOG4J)
        classpath = f"{jars}/*"
        if not (data / "meta.properties").exists():
            cluster_id = _kafka_cluster_id()
            fmt = subprocess.run(  # noqa: S603
                [java, f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath, "kafka.tools.StorageTool",
                 "format", "-t", cluster_id, "-c", str(props), "--ignore-formatted"],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            if fmt.returncode != 0:
                raise StackError(f"kafka storage format failed: {fmt.stderr.strip().splitlines()[-1:]}")
        heap = self.settings.kafka_heap
        cmd = [
            java, f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}",
            "-cp", classpath, "kafka.Kafka", str(props),
        ]  # fmt: skip
        pid = _spawn(cmd, self.logs / "kafka.log", self.root)
        return ServiceState(
            name="kafka",
            url=f"127.0.0.1:{port}",
            pid=pid,
            ports={"kafka": port, "kafka_controller": cport},
            marker=str(props),
        )

    def _start_redis(self, prev: ServiceState | None) -> ServiceState:
        exe = shutil.which("redis-server")
        if not exe:
            raise StackError(
                "redis-server not found: run `make sysdeps` as root or `sudo apt-get install redis-server`"
            )
        port = self._port("redis", "redis", self.settings.redis_port, prev)
        rdir = self.root / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(rdir),
            "--appendonly", "yes", "--save", "", "--daemonize", "no",
            "--logfile", str(self.logs / "redis.log"), "--pidfile", str(rdir / "redis.pid"),
            # keep the command line: by default Redis retitles itself "redis-server 127.0.0.1:PORT" a few
            # ms after start, and a marker matching only one of the two titles made a health wait right
            # after the spawn (a restart) take the starting server for a dead one
            "--set-proc-title", "no",
        ]  # fmt: skip
        pid = _spawn(cmd, self.logs / "redis.stdout.log", self.root)
        return ServiceState(
            name="redis",
            url=f"redis://127.0.0.1:{port}/0",
            pid=pid,
            ports={"redis": port},
            marker=f"--port {port} --dir {rdir} ",
        )

    def _start_clickhouse(self, prev: ServiceState | None) -> ServiceState:
        port = self._port("clickhouse", "clickhouse", self.settings.clickhouse_port, prev)
        data = self.root / "clickhouse"
        data.mkdir(parents=True, exist_ok=True)
        # the read-only user: the environment's, else the one of the last start, else a new one
        kept = prev.secrets if prev and prev.secrets.get("readonly_user") else {}
        user, password = self.readonly_credentials(None) or (
            kept.get("readonly_user", READONLY_USER),
            kept.get("readonly_password") or secrets.token_urlsafe(24),
        )
        cmd = [
            sys.executable, "-m", "devstack.chserver", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(data), "--log-file", str(self.logs / "clickhouse.log"),
            "--readonly-user", user, "--readonly-password-env", READONLY_PASSWORD_VAR,
        ]  # fmt: skip
        env = {**os.environ, READONLY_PASSWORD_VAR: password}  # the password never goes on a command line
        pid = _spawn(cmd, self.logs / "clickhouse.stdout.log", REPO_ROOT, env)
        return ServiceState(
            name="clickhouse",
            url=f"http://127.0.0.1:{port}",
            pid=pid,
            ports={"clickhouse": port},
            marker="devstack.chserver",
            secrets={"readonly_user": user, "readonly_password": password},
        )

    def _start_dashboard(self, prev: ServiceState | None) -> ServiceState:
        port = self._port("dashboard", "stack_dashboard", self.settings.dashboard_port, prev)
        state = self._services or self.load_state()
        clickhouse = state.get("clickhouse")
        if clickhouse is None:
            raise StackError("dashboard: no ClickHouse to read from; run `clickpulse stack up`")
        # the dashboard's configuration, explicit: stack.env is written only once every service is up
        env = {k: v for k, v in os.environ.items() if k not in (READONLY_USER_VAR, READONLY_PASSWORD_VAR)}
        env["CLICKHOUSE_URL"] = clickhouse.url
        for key in ("CLICKPULSE_CLICKHOUSE_DATABASE", "CLICKPULSE_DASHBOARD_REFRESH_MS"):
            if key in self.environ:
                env[key] = self.environ[key]
        readonly = self.readonly_credentials(clickhouse)
        if readonly:
            env[READONLY_USER_VAR], env[READONLY_PASSWORD_VAR] = readonly
        cmd = [sys.executable, "-m", "connectors.dashboard", "--host", "127.0.0.1", "--port", str(port)]
        pid = _spawn(cmd, self.logs / "dashboard.log", REPO_ROOT, env)
        return ServiceState(
            name="dashboard",
            url=f"http://127.0.0.1:{port}",
            pid=pid,
            ports={"stack_dashboard": port},
            marker=f"connectors.dashboard --host 127.0.0.1 --port {port}",
        )

    def _start_collector(self, prev: ServiceState | None) -> ServiceState:
        kafka = self._services.get("kafka") or self.load_state().get("kafka")
        if kafka is None:
            raise StackError("collector: Kafka is not known yet; run `clickpulse stack up`")
        port = self._port("collector", "collector", None, prev)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CLICKPULSE_") and k not in ENV_VARS.values()
        }
        env.update({k: v for k, v in self.environ.items() if k.startswith("CLICKPULSE_KAFKA_")})  # TLS/SASL
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=kafka.url,
            CLICKPULSE_TOPIC_PREFIX=self.topic_prefix,
            CLICKPULSE_STATE_DIR=str(self.root),
            **{WRITE_KEY_VAR: self.write_key({"collector": ServiceState("collector", "")})},
        )
        marker = f"connectors.collector --host 127.0.0.1 --port {port}"
        cmd = [sys.executable, "-m", *marker.split()]
        pid = _spawn(cmd, self.logs / "collector.log", REPO_ROOT, env)
        return ServiceState(
            name="collector",
            url=f"http://127.0.0.1:{port}",
            pid=pid,
            ports={"collector": port},
            marker=marker,
        )

    # restart ------------------------------------------------------------------------------------
    def restart(
        self, name: str, *, port_timeout_s: float = 30.0, progress: Callable[[str], None] = log.info
    ) -> ServiceState:
        """Stop one service ``up`` started (SIGTERM, SIGKILL after 30 s) and start it again on the same
        port(s) and data directory; return its new state once it is healthy.

        What a restarted broker, Redis or ClickHouse server looks like to the jobs: connections drop, the
        service is gone for a few seconds, then it is back at the same address with its data. Raises
        :class:`StackError` for an external or unknown service, or when a port does not come free.
        """
        state = self.load_state()
        svc = state.get(name)
        if name not in SERVICES or svc is None or svc.external or not svc.pid:
            raise StackError(f"{name}: not a service `stack up` started; nothing to restart")
        progress(f"{name}: restarting pid {svc.pid}")
        stop_pid(svc.pid, svc.marker)
        deadline = time.monotonic() + port_timeout_s
        while not all(port_free(p) for p in svc.ports.values()):
            if time.monotonic() > deadline:
                raise StackError(
                    f"{name}: port(s) {sorted(svc.ports.values())} still taken after stopping it"
                )
            time.sleep(0.1)
        fresh = getattr(self, f"_start_{name}")(svc)
        if fresh.ports != svc.ports:
            if fresh.pid:
                stop_pid(fresh.pid, fresh.marker)
            raise StackError(f"{name}: came back on {fresh.ports}, not {svc.ports}")
        state[name] = fresh
        self.save_state(state)
        self._wait(name, fresh)
        progress(f"{name}: restarted (pid {fresh.pid}) at {display_url(fresh.url)}")
        return fresh

    # down / status ------------------------------------------------------------------------------
    def down(self, *, progress: Callable[[str], None] = log.info) -> list[str]:
        """Stop the processes ``up`` started; keep their data and remembered ports."""
        state = self.load_state()
        stopped: list[str] = []
        for name in reversed(SERVICES):
            svc = state.get(name)
            if not svc or svc.external or not svc.pid:
                continue
            if pid_alive(svc.pid, svc.marker):
                progress(f"{name}: stopping pid {svc.pid}")
                stop_pid(svc.pid, svc.marker)
                stopped.append(name)
            svc.pid = None
        self.save_state(state)
        self.env_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[dict[str, object]]:
        """One row per service: name, source, state, url (passwords masked), pid, healthy.

        ``state`` is ``external``, ``running``, ``dead`` (``up`` started it, its recorded pid is gone and
        ``down`` did not stop it: ``stack up`` restarts it) or ``stopped``.
        """
        state = self.load_state()
        rows: list[dict[str, object]] = []
        for name in SERVICES:
            ext = self.external_url(name, state)
            svc = state.get(name)
            row: dict[str, object] = {"service": name, "source": "embedded", "state": "stopped", "url": "",
                                      "pid": None, "healthy": False}  # fmt: skip
            if ext:
                row.update(source="external", state="external", url=display_url(ext))
                row["healthy"] = self.healthy(name, ext)
            elif svc and pid_alive(svc.pid, svc.marker):
                row.update(state="running", url=display_url(svc.url), pid=svc.pid)
                row["healthy"] = self.healthy(name, svc.url)
            elif svc and not svc.external and svc.pid:
                log.warning(
                    "%s: pid %d recorded by `stack up` is gone; `stack up` restarts it", name, svc.pid
                )
                row.update(state="dead", url=display_url(svc.url), pid=svc.pid)
            rows.append(row)
        return rows


_KAFKA_PROPERTIES = """\
# Written by `clickpulse stack up`: a single-node KRaft broker+controller on loopback.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{cport}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions={partitions}
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Flink's exactly-once sinks keep transactions open for a checkpoint interval plus restart time;
# 15 min is the broker's ceiling for transaction.timeout.ms (Kafka's default, stated explicitly).
transaction.max.timeout.ms=900000
# Local data is kept by size, not age: simulated and replayed traffic may carry old timestamps.
log.retention.ms=-1
log.retention.bytes=1073741824
log.segment.bytes=134217728
"""

_KAFKA_LOG4J = """\
# Written by `clickpulse stack up`: broker logs to stdout (-> logs/kafka.log), WARN+ for chatty loggers.
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = warn
logger.controller.name = org.apache.kafka.controller
logger.controller.level = warn
logger.state.name = state.change.logger
logger.state.level = warn
logger.storage.name = org.apache.kafka.storage
logger.storage.level = warn
"""
