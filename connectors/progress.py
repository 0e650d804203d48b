"""The progress bar of every long ``clickpulse`` command (stack up, topics, migrate, simulate).

One helper so every command looks and behaves the same: the bar is drawn with rich on the console it is
given (stderr: stdout stays for results), disappears when done, and is not drawn at all when that console
is not a terminal (logs, pipes, CI) or the command writes ``--json``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn


class Bar:
    """What a command updates while it works; does nothing when the bar is not shown."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        """Wrap ``progress``'s ``task`` (both ``None``: a bar that is not shown)."""
        self._progress = progress
        self._task = task

    @property
    def shown(self) -> bool:
        """True when the bar is drawn."""
        return self._progress is not None

    def update(
        self,
        *,
        completed: float | None = None,
        advance: float = 0,
        total: float | None = None,
        description: str | None = None,
    ) -> None:
        """Set the completed amount or the total, advance it, or change the text beside the bar."""
        if self._progress is None or self._task is None:
            return
        self._progress.update(
            self._task, completed=completed, advance=advance, total=total, description=description
        )

    def message(self, text: str) -> None:
        """Show ``text`` beside the bar (``[`` is shown as is, not read as rich markup)."""
        self.update(description=text.replace("[", r"\["))


@contextmanager
def progress_bar(
    console: Console, description: str, total: float | None = None, *, enabled: bool = True
) -> Iterator[Bar]:
    """A transient bar on ``console`` for ``total`` steps (``None``: a spinner with the elapsed time).

    Not drawn when ``enabled`` is false (``--json``) or ``console`` is not a terminal; the :class:`Bar`
    yielded then ignores updates.
    """
    if not enabled or not console.is_terminal:
        yield Bar(None, None)
        return
    columns = (
        [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
        if total is None
        else [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
            TimeElapsedColumn(),
        ]
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description.replace("[", r"\["), total=total)
        yield Bar(progress, task)
