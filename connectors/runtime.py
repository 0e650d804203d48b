"""Process plumbing every job shares: logging set-up, stopping on signals, the operator's error type."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

#: The exit status of a command stopped with Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 128 + signal.SIGINT

_signals_seen: list[int] = []


class CliError(Exception):
    """A problem the operator can fix (bad input, a service not there): the command line prints the
    message as one ``error: ...`` line on stderr, without a traceback, and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        """``message``: one sentence saying what is wrong and, where it helps, what to do."""
        super().__init__(message)
        self.exit_code = exit_code


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
        _signals_seen.append(signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def interrupted() -> bool:
    """True once a handler of :func:`stop_on_signals` saw SIGINT (Ctrl-C) in this process."""
    return signal.SIGINT in _signals_seen


def exit_status(main: Callable[[], int]) -> int:
    """``main()``'s exit status, a :class:`CliError` printed as its one ``error: ...`` line: for the
    ``python -m jobs.<job>`` entry points (``clickpulse`` handles the error itself)."""
    try:
        return int(main())
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
