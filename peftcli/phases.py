"""Progress of a command's phases (e.g. ``peft eval``'s base loss, base exact match, adapted
loss, ...) on a rich console, usually stderr, so stdout (``--json``) stays clean."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def clock(seconds: float) -> str:
    """``3725.2`` -> ``"1:02:05"`` (h:mm:ss)."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Phases:
    """Reports named phases of known size on ``console``: on a terminal, a bar per phase with its
    count, elapsed and remaining time (the mean time per unit so far × units left, from the first
    update on); elsewhere (a log, a pipe), one line per phase when it ends,
    ``"base loss: 100/100 examples in 12.3 s"``. ``console`` None: silent."""

    def __init__(self, console=None):
        self.console = console

    @contextmanager
    def phase(self, name: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        """A phase of ``total`` ``unit``; yields ``advance(n)``, to be called as n more are done."""
        if self.console is None:
            yield lambda n: None
            return
        start, done = time.perf_counter(), 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if bar is not None:
                left = (time.perf_counter() - start) / max(done, 1) * max(total - done, 0)
                bar.update(task, advance=n, left=clock(left), refresh=True)  # drawn at each update

        bar = None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn(name), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
                       TextColumn("left {task.fields[left]}"))
            with Progress(*columns, console=self.console) as bar:
                task = bar.add_task(name, total=total, left="-:--:--")
                yield advance
            return
        yield advance
        self.console.print(f"{name}: {done}/{total} {unit} in {time.perf_counter() - start:.1f} s",
                           highlight=False, markup=False)


SILENT = Phases()
