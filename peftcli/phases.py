"""Progress of a command's phases (e.g. ``peft eval``'s base loss, base exact match, adapted
loss, ...) on a rich console, usually stderr, so stdout (``--json``) stays clean."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Phases:
    """Reports named phases of known size on ``console``: on a terminal, a bar per phase with its
    count, elapsed and remaining time; elsewhere (a log, a pipe), one line per phase when it ends,
    ``"base loss: 100/100 examples in 12.3 s"``. ``console`` None: silent."""

    def __init__(self, console=None):
        self.console = console

    @contextmanager
    def phase(self, name: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        """A phase of ``total`` ``unit``; yields ``advance(n)``, to be called as n more are done."""
        if self.console is None:
            yield lambda n: None
            return
        start = time.perf_counter()
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            columns = (TextColumn(name), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
                       TimeRemainingColumn())
            with Progress(*columns, console=self.console) as bar:
                task = bar.add_task(name, total=total)
                yield lambda n: bar.advance(task, n)
            return
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n

        yield advance
        self.console.print(f"{name}: {done}/{total} {unit} in {time.perf_counter() - start:.1f} s",
                           highlight=False, markup=False)


SILENT = Phases()
