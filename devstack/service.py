"""A local HTTP server process (``python -m module --port P``) started for a test or a bench."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from devstack.stack import free_port

REPO = Path(__file__).resolve().parent.parent


class ServiceError(RuntimeError):
    """The process exited, or did not answer its health check in time (the message has its log tail)."""


@dataclass
class Service:
    """A server process on a loopback port of its own, its output in ``log``."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        """SIGTERM, then wait (SIGKILL after 30 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def serve(module: str, env: dict[str, str], log: Path, health: str, timeout_s: float = 60.0) -> Service:
    """Start ``python -m module --port P`` (a free port) and return once ``health`` answers 200."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [sys.executable, "-m", module, "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    svc = Service(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ServiceError(f"{module} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(svc.url + health, timeout=2).status_code == 200:
                return svc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            svc.stop()
            raise ServiceError(
                f"{module} did not answer {health} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.2)
