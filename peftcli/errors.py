"""The one exception type a user can cause, and the mapping of a failed write to one.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; anything else is an
internal error (exit 1, traceback kept).
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from typing import Iterator


class UserError(Exception):
    """A problem the user can fix: a bad recipe key or value, a missing file, a malformed row,
    an adapter used with the wrong base model. The message is one line naming the key, file or row."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint. The CLI prints the message
    (where the checkpoint is, how to resume) and exits 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# what to do about each kind of failed write (the errno of the OSError)
WRITE_FAULTS = {
    errno.ENOSPC: "free space on its device or write elsewhere",
    errno.EDQUOT: "free space within your disk quota or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "you may not write there: fix its permissions or write elsewhere",
    errno.EPERM: "you may not write there: fix its permissions or write elsewhere",
    errno.EISDIR: "a directory is in the way of a file: move it or write elsewhere",
    errno.ENOTDIR: "a file is in the way of a directory: move it or write elsewhere",
    errno.EEXIST: "a file is in the way: move it or write elsewhere",
    errno.ENAMETOOLONG: "the path is too long: write elsewhere",
    errno.ENOENT: "it cannot be created there (e.g. inside /proc): write elsewhere",
}


def fault_errno(exc: BaseException) -> int | None:
    """The errno of a failed write, if ``exc`` is one of :data:`WRITE_FAULTS`: an ``OSError``, or
    an error from a library that writes through its own (Rust) I/O and reports the OS error in
    its message: safetensors' ``SafetensorError("Error while serializing: I/O error: No space
    left on device (os error 28)")``, tokenizers' ``Exception("... (os error 28)")`` (both
    measured on a full tmpfs), or the debug form ``Os { code: 28, ... }``. None otherwise."""
    if isinstance(exc, OSError):
        code = exc.errno
    else:
        found = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", str(exc))
        code = int(found.group(1) or found.group(2)) if found else None
    return code if code in WRITE_FAULTS else None


class WriteFault(UserError):
    """A write that failed for a reason the user can fix (:data:`WRITE_FAULTS`): one line naming
    the path, what went wrong and what to do; :meth:`keeping` adds what the failure did not lose."""

    def __init__(self, message: str, path, code: int):
        super().__init__(message)
        self.path, self.code = path, code

    def keeping(self, kept: str) -> WriteFault:
        """The same fault, its message ending with ``kept`` (e.g. where the trained adapter is)."""
        return WriteFault(f"{self}; {kept}", self.path, self.code)


def write_error(exc: BaseException, path, where: str = "", kept: str = "") -> WriteFault | None:
    """The one-line :class:`WriteFault` for a failed write of ``path``, or None if ``exc`` is not
    a write fault (:func:`fault_errno`). ``path`` is the file or dir the user knows (not the
    temporary sibling an atomic write fills); None names the OS error's own file.

    Args:
        where: the knob that picks the place (``output.dir``, ``-o``), named in the advice.
        kept: what the failure did not lose (e.g. where the trained adapter is), appended.
    """
    code = fault_errno(exc)
    if code is None:
        return None
    where_hint = f" (set {where})" if where else ""
    failed = path if path is not None else getattr(exc, "filename", None)
    message = f"{failed}: cannot write ({os.strerror(code)}); {WRITE_FAULTS[code]}{where_hint}"
    return WriteFault(message + (f"; {kept}" if kept else ""), failed, code)


@contextmanager
def writing(path, where: str = "", kept: str = "") -> Iterator[None]:
    """Run a write of ``path``; a write fault (no space, read-only, no permission, something in
    the way) becomes :func:`write_error`'s one-line :class:`WriteFault`. Other errors pass, and
    so does a :class:`WriteFault` raised inside (it already names its path)."""
    try:
        yield
    except WriteFault:
        raise
    except Exception as exc:
        error = write_error(exc, path, where, kept)
        if error is None:
            raise
        raise error from None
