"""Process plumbing every job shares: logging set-up and stopping on signals."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

#: Top-level loggers of this project.
OUR_LOGGERS = ("clickpulse", "connectors", "jobs", "udfs")


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr; re-enable our loggers (PyFlink's import configures logging and disables them)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and name.split(".")[0] in OUR_LOGGERS:
            logger.disabled = False
    for top in OUR_LOGGERS:  # PyFlink's gateway later sets the root logger to WARNING
        logging.getLogger(top).setLevel(level)
    for noisy in ("apache_beam", "kafka", "urllib3", "clickhouse_connect"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stop_on_signals(stop: threading.Event) -> None:
    """Set ``stop`` on SIGTERM/SIGINT (only from the main thread; elsewhere this does nothing)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
