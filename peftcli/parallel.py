"""A function over many rows, in row order, across forked worker processes on large sets, with a
progress bar: what tokenising a large data set runs (:func:`peftcli.data.tokenize_rows`).

The workers are forked (Linux), so the function's arguments (a tokenizer with its chat template)
are inherited, never pickled; only the rows go out and the results come back, in chunks of
:data:`CHUNK` rows. Ctrl-C is left to the parent, which stops the pool.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from peftcli.errors import UserError

# From this many rows on they are mapped by worker processes, one per core. Measured tokenising
# alpaca rows with SmolLM2's tokenizer (2-core x86_64, other jobs running): serial 0.27-0.45 ms
# CPU a row; the workers' CPU sum is 15-30% more (the examples pickled back, 0.05 ms a row in
# the parent); 20k rows took 6.9 s serial and 4.1 s on two workers, while 5k and 10k rows were
# not faster (1.5 s -> 1.8-2.1 s, 2.6 s -> 3.4-4.0 s) with the second core shared.
PARALLEL_MIN_ROWS = 20_000
PROGRESS_MIN_ROWS = 10_000  # a progress bar from here on (about 5 s of tokenising on one core)
CHUNK = 1_000  # rows per task sent to a worker (and per progress-bar step)
MAX_WORKERS = 8
WORKERS_ENV = "PEFTCLI_TOKENIZE_WORKERS"
# (quota file, period file): cgroup v2's cpu.max holds "QUOTA PERIOD"; v1 has two files
CGROUP_CPU_FILES = (("/sys/fs/cgroup/cpu.max", None),
                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def map_rows(fn: Callable, rows: list, name: str, args: tuple = (), what: str = "processing") -> list:
    """``[fn(row, *args) for row in rows]``, in row order; from :data:`PARALLEL_MIN_ROWS` rows on
    split across :func:`workers` processes, from :data:`PROGRESS_MIN_ROWS` with a progress bar
    ("WHAT NAME") on a terminal's stderr.

    Raises:
        UserError: "NAME (row N): MESSAGE" for the first row (1-based) whose ``fn`` raised one.
    """
    jobs = [(start, rows[start : start + CHUNK]) for start in range(0, len(rows), CHUNK)]
    n_workers = workers(len(rows))
    results: list = []
    with contextlib.ExitStack() as stack:
        if n_workers > 1:  # the pool forks before the progress bar's thread starts
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(
                n_workers, initializer=_start_worker, initargs=(fn, name, args)))
            done = pool.imap(_chunk_in_worker, jobs)
        else:
            done = (_chunk(fn, start, chunk, name, args) for start, chunk in jobs)
        advance = stack.enter_context(progress(len(rows), f"{what} {name}"))
        for part in done:
            results += part
            advance(len(part))
    return results


def workers(n_rows: int) -> int:
    """Worker processes for ``n_rows`` rows: ``$PEFTCLI_TOKENIZE_WORKERS`` when set (1: serial),
    else one per usable core (:func:`usable_cores`, at most :data:`MAX_WORKERS`) from
    :data:`PARALLEL_MIN_ROWS` rows on; always 1 off Linux (the workers are forked) and in a
    process that may not have children (a daemon)."""
    if not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        return 1
    asked = os.environ.get(WORKERS_ENV, "").strip()
    if asked.isdigit():
        return max(1, int(asked))
    return 1 if n_rows < PARALLEL_MIN_ROWS else max(1, min(usable_cores(), MAX_WORKERS))


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a container's
    ``--cpus``, which the affinity does not show)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for quota_file, period_file in CGROUP_CPU_FILES:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(quota_file).read_text().split()
            quota, period = fields[0], fields[1] if period_file is None else Path(period_file).read_text().strip()
            if quota not in ("max", "-1"):
                cores = min(cores, max(1, -(-int(quota) // int(period))))
    return cores


def _chunk(fn: Callable, start: int, chunk: list, name: str, args: tuple) -> list:
    """``fn(row, *args)`` of each row of a chunk that starts at row index ``start``."""
    results = []
    for n, row in enumerate(chunk, start=start + 1):
        try:
            results.append(fn(row, *args))
        except UserError as e:
            raise UserError(f"{name} (row {n}): {e}") from None
    return results


_job: tuple = ()  # a worker process's (fn, name, args), given at its start (inherited, not pickled)


def _start_worker(fn: Callable, name: str, args: tuple) -> None:
    """A worker's start: its job, and Ctrl-C left to the parent (which stops the pool), so the
    workers print no tracebacks of their own."""
    global _job
    _job = (fn, name, args)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chunk_in_worker(task: tuple[int, list]) -> list:
    """:func:`_chunk` of one ``(start, chunk)`` task, in a worker process."""
    fn, name, args = _job
    return _chunk(fn, task[0], task[1], name, args)


@contextlib.contextmanager
def progress(total: int, label: str, console=None):
    """Yields ``advance(n)``: a rich progress bar labelled ``label`` on ``console`` (default:
    stderr) for ``total`` rows when there are at least :data:`PROGRESS_MIN_ROWS`, it is a
    terminal, and this is the first process of a distributed run; else a no-op."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True)
    if total < PROGRESS_MIN_ROWS or not console.is_terminal or os.environ.get("RANK", "0") != "0":
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(escape(label)), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("rows", total=total)
        yield lambda n: bar.advance(task, n)
