"""Running the dashboard: ``python -m connectors.dashboard [--host H] [--port P]``, ``clickpulse dashboard``.

Settings are read once, in :func:`main`, from the command line over the environment over
``.clickpulse/stack.env``; the server stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from connectors.dashboard.app import create_app
from connectors.dashboard.settings import DashboardSettings, add_dashboard_args
from connectors.runtime import setup_logging
from connectors.settings import Connections, environment

log = logging.getLogger(__name__)


async def serve(
    settings: DashboardSettings,
    conn: Connections,
    *,
    ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (default: until SIGTERM/SIGINT); ``ready`` gets the URL once listening."""
    app = create_app(settings, conn)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
    except OSError:
        sock.close()
        await runner.cleanup()
        raise
    site = web.SockSite(runner, sock, shutdown_timeout=5.0)
    await site.start()
    port = int(sock.getsockname()[1])
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{port}"
    log.info("dashboard listening on %s", url)
    if ready is not None:
        ready(url)
    done = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if stop is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, done.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
    try:
        await done.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        log.info("dashboard stopping")
        await runner.cleanup()


def run(options: dict[str, Any], env: dict[str, str] | None = None) -> int:
    """Build the settings from ``env`` (default: :func:`environment`) and ``options``, serve; exit status."""
    env = environment() if env is None else env
    try:
        settings = DashboardSettings.from_env(env, options)
        conn = Connections.from_env(env)
    except ValueError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    try:
        asyncio.run(serve(settings, conn))
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m connectors.dashboard``."""
    p = argparse.ArgumentParser(
        prog="python -m connectors.dashboard", description="The clickpulse dashboard."
    )
    add_dashboard_args(p)
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = p.parse_args(argv)
    setup_logging(getattr(logging, args.log_level.upper(), logging.INFO))
    return run(vars(args))
