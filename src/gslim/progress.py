"""What a long stage shows on stderr: progress bars, numbered steps and warnings (rich).

One display type for every stage. Bars are drawn only when enabled and stderr is a terminal
(a log file or a CI capture gets no animation); step lines and warnings are printed whenever
the display is enabled, so they reach logs too.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, Optional

_BAR_COLUMNS = ("description", "bar", "count", "elapsed", "remaining")


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Task:
    """One bar of a :class:`Display` (all methods are no-ops for a display that draws nothing)."""

    def __init__(self, progress: Any = None, task_id: Any = None, total: Optional[int] = None):
        self._progress, self._id, self.total = progress, task_id, total

    @property
    def active(self) -> bool:
        return self._progress is not None

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(self._id, advance=n)

    def update(
        self,
        completed: Optional[int] = None,
        total: Optional[int] = None,
        *,
        remove: bool = False,
        **fields: Any,
    ) -> None:
        """Set the count (and total, and the shown fields); ``remove`` drops the bar once it is full."""
        if self._progress is None:
            return
        if total is not None:
            self.total = total
        self._progress.update(self._id, completed=completed, total=total, **fields)
        if remove and completed is not None and self.total is not None and completed >= self.total:
            self._progress.remove_task(self._id)
            self._progress = None


class Display:
    """A rich display on stderr, used as a context manager.

    ``task(description, total, **fields)`` adds a bar; ``fields`` are shown after the bar
    (``stats`` for training, ``unit`` for selection). ``step(text)`` numbers a step and prints
    how long it took; ``warn(message)`` always prints.
    """

    def __init__(self, enabled: bool = True, *, steps: int = 0):
        self.enabled = enabled
        self.steps, self._step = steps, 0
        self._console = None
        self._progress = None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    def __enter__(self) -> "Display":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def task(self, description: str, total: Optional[int] = None, **fields: Any) -> Task:
        if not (self.enabled and stderr_is_tty()):
            return Task(total=total)
        if self._progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            extra = [TextColumn("{task.fields[%s]}" % k) for k in fields]
            # stderr was found to be a terminal above: rich need not decide again.
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("<"),
                TimeRemainingColumn(),
                *extra,
                console=Console(stderr=True, force_terminal=True),
                transient=True,
            )
            self._progress.start()
        return Task(self._progress, self._progress.add_task(description, total=total, **fields), total)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        self._step += 1
        if not self.enabled:
            yield
            return
        label = f"[{self._step}/{self.steps}] {text}" if self.steps else text
        start = time.perf_counter()
        with self.console.status(label) if stderr_is_tty() else contextlib.nullcontext():
            yield
        self.print(f"{label} [dim]({time.perf_counter() - start:.1f}s)[/dim]")

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def bar(enabled: bool, description: str, total: Optional[int], **fields: Any) -> Iterator[Task]:
    """One bar on its own display: ``with bar(on, "eval", n) as b: ... b.advance()``."""
    with Display(enabled) as display:
        yield display.task(description, total, **fields)
