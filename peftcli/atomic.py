"""Atomic writes: a file or directory peft writes appears whole or not at all.

A directory (:func:`atomic_dir`) or file (:func:`atomic_file`) is written into a temporary
sibling, fsynced, and renamed over its name; a kill at any moment leaves the old one or the new
one, plus at most a temporary (``.NAME.tmp-*``, ``.NAME.old-*``, ``.NAME.tmp``) that the next
run in the dir finishes (:meth:`peftcli.rundir.RunDir.put_back`, ``remove_temporaries``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from peftcli.errors import UserError


def _fsync(path: Path) -> None:
    """Flush a file (or, where the OS allows, a dir entry) to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # dirs cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Write a directory atomically: yields an empty temporary sibling of ``out_dir`` to fill;
    on success its files are fsynced and it is renamed to ``out_dir`` (an existing ``out_dir`` is
    renamed aside first, then deleted; if the swap fails the old one is put back). On any
    exception the temporary dir is removed and ``out_dir`` is left as it was.

    Raises:
        UserError: ``out_dir`` exists and is not a directory.
    """
    out_dir = Path(os.path.abspath(out_dir))  # "x/." and "x/../y" get a real name and parent
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); give it a plain dir's mode
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out_dir.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _swap_in(new: Path, out_dir: Path) -> None:
    """Rename ``new`` to ``out_dir``, replacing an existing dir without a moment where neither
    the old nor the new one is complete on disk."""
    if not out_dir.exists():
        os.replace(new, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rmdir(old)  # only the unique name is wanted
    os.replace(out_dir, old)
    try:
        os.replace(new, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``path`` to write; on success it is fsynced and renamed to
    ``path``, so a reader (or a kill at any moment) sees the old file or the new one, never half
    of one. On an exception the temporary file is removed and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON through :func:`atomic_file`."""
    write_text_atomic(path, json.dumps(obj, indent=2))
