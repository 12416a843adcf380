"""Write faults injected in-process, for the fault matrix (tests/test_fault_matrix.py).

:func:`inject` patches the calls through which peft (and the libraries it writes with: torch,
safetensors via Python, matplotlib, tensorboard, transformers' ``save_pretrained``) create,
write, rename and delete files, and makes those aimed at one *write site* fail the way the OS
would: ``ENOSPC`` (the disk is full), ``EROFS`` (read-only), or ``kill`` (the process gets
SIGKILL in the middle of the write: the file or dir is made, a byte written, then the kill).
A site is a path relative to a root (the run dir, or the merge output's parent) matched by its
first component, temporaries of atomic writes included (``adapter`` matches ``adapter/...``,
``.adapter.tmp-x/...`` and ``.adapter.old-x``).

Run as a script it injects a fault and then runs the ``peft`` command line, so the SIGKILL
cases can be observed from outside: ``python tests/faults.py ROOT SITE FAULT AFTER -- train R``.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class Site:
    """Which writes a fault hits: paths under ``root`` whose first component, with an atomic
    write's ``.`` prefix and ``.tmp``/``.old`` suffix taken off, is ``name`` (and, for
    ``checkpoints``, whose second component matches ``step``)."""

    def __init__(self, root: Path, name: str, step: str | None = None):
        self.root, self.name, self.step = Path(os.path.abspath(root)), name, step

    def __contains__(self, path) -> bool:
        try:
            rel = Path(os.path.abspath(os.fspath(path))).relative_to(self.root)
        except (TypeError, ValueError):
            return False
        if not rel.parts or _base(rel.parts[0]) != self.name:
            return False
        return self.step is None or (len(rel.parts) > 1 and _base(rel.parts[1]) == self.step)


def _base(part: str) -> str:
    found = re.fullmatch(r"\.(.+?)\.(tmp|old)(-.+)?", part)
    return found.group(1) if found else part


@contextmanager
def inject(site: Site, fault: str, after: int | str = 0):
    """Within the block, every write aimed at ``site`` fails with ``fault`` (``"ENOSPC"``,
    ``"EROFS"``, or ``"kill"``: SIGKILL to this process), from the ``after``-th such write on
    (0: the first; only file and dir creations and writes are counted). Reads pass; renames and
    deletes fail only on a read-only file system. Yields a dict counting the writes seen
    (``"seen"``).

    ``after="log"``: the fault hits the trackers instead (``site`` is their dir): the 3rd
    ``Accelerator.log`` call fails as TensorBoard's writer thread re-raises a failed write there."""
    state = {"seen": 0}
    real = {"open": builtins.open, "os_open": os.open, "mkdir": os.mkdir, "replace": os.replace,
            "rename": os.rename, "unlink": os.unlink, "rmdir": os.rmdir, "rmtree": shutil.rmtree}

    def fail(path, done=None) -> None:
        if fault == "kill":
            if done is not None:
                done()  # the file or dir is made: the process dies with it half-written
            os.kill(os.getpid(), signal.SIGKILL)
        code = getattr(errno, fault)
        raise OSError(code, os.strerror(code), os.fspath(path))

    def hit(path, kind: str, done=None) -> None:
        if path not in site:
            return
        if kind == "data":  # creating or writing a file or dir: these are counted
            state["seen"] += 1
        if state["seen"] <= after or (kind == "meta" and fault != "EROFS"):
            return  # not armed yet; a full disk still renames and deletes, a kill waits for a write
        fail(path, done)

    def writes(mode) -> bool:
        return any(c in str(mode) for c in "wax+")

    def fake_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and writes(mode):
            hit(file, "data", lambda: real["open"](file, mode, *args, **kwargs).write("x" if "b" not in mode else b"x"))
        return real["open"](file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS:
            hit(path, "data", lambda: real["os_open"](path, flags, *args, **kwargs))
        return real["os_open"](path, flags, *args, **kwargs)

    def on(name, kind, *paths_at):
        def fake(*args, **kwargs):
            for i in paths_at:
                if i < len(args):
                    hit(args[i], kind, lambda: real[name](*args, **kwargs))
            return real[name](*args, **kwargs)
        return fake

    def fake_save_file(tensors, filename, metadata=None):  # transformers' save_pretrained writes from Rust
        hit(filename, "data")
        return saved(tensors, filename, metadata=metadata)

    import accelerate
    import transformers.modeling_utils as modeling_utils

    if after == "log":
        real_log = accelerate.Accelerator.log

        def failing_log(self, values, step=None, log_kwargs=None):
            state["seen"] += 1
            if state["seen"] >= 3:
                fail(site.root / site.name)
            return real_log(self, values, step=step, log_kwargs=log_kwargs or {})

        with mock.patch.object(accelerate.Accelerator, "log", failing_log):
            yield state
        return

    saved = modeling_utils.safe_save_file
    with mock.patch.object(builtins, "open", fake_open), mock.patch.object(io, "open", fake_open), \
            mock.patch.object(os, "open", fake_os_open), mock.patch.object(os, "mkdir", on("mkdir", "data", 0)), \
            mock.patch.object(os, "replace", on("replace", "meta", 0, 1)), \
            mock.patch.object(os, "rename", on("rename", "meta", 0, 1)), \
            mock.patch.object(os, "unlink", on("unlink", "meta", 0)), mock.patch.object(os, "rmdir", on("rmdir", "meta", 0)), \
            mock.patch.object(shutil, "rmtree", on("rmtree", "meta", 0)), \
            mock.patch.object(modeling_utils, "safe_save_file", fake_save_file):
        yield state


def main(argv: list[str]) -> None:
    root, name, fault, after, dash, *command = argv
    assert dash == "--"
    site_name, _, step = name.partition("/")
    from peftcli import cli

    sys.argv = ["peft", *command]
    with inject(Site(Path(root), site_name, step or None), fault, after if after == "log" else int(after)):
        cli.run()


if __name__ == "__main__":
    main(sys.argv[1:])
