"""One measured subprocess: wall time, CPU time and peak resident memory of exactly that process."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` from the project root with stdout and stderr in ``log``.

    Returns:
        {"wall_s": seconds, "cpu_s": user + system seconds, "peak_rss_gib": the process's peak
        resident set} — from ``wait4`` on that child, so earlier or parallel processes do not count.
    Raises:
        SystemExit: the command failed (names its log).
    """
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n  see {log}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss / 2**20}  # KiB on Linux


def replace_marked_block(doc: Path, begin: str, end: str, body: str) -> None:
    """Rewrite ``doc`` with the text between its ``begin`` and ``end`` markers replaced by ``body``
    (the markers kept): how a bench script puts its measured table into the docs.

    Raises:
        SystemExit: ``doc`` lacks one of the markers.
    """
    text = doc.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: markers {begin} / {end} not found")
    head, rest = text.split(begin, 1)
    doc.write_text(f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}")
