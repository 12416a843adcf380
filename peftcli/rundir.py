"""The run dir: what ``peft train`` writes, where, and how, known here only.

    RUN/
      recipe.yaml             the resolved recipe (written once data, model and method are good)
      adapter/                the trained adapter (:mod:`peftcli.artifacts` writes its files)
      metrics.jsonl           one JSON event per line (:class:`RunLog`, :func:`read_events`)
      summary.json            the run's summary (:func:`write_json_atomic`)
      loss.png                train and eval loss against step (:func:`plot_loss`)
      checkpoints/step-N/     adapter/, optimizer.pt, scheduler.pt, rng.pt, state.json
      tensorboard/            tracker logs (``train.report_to``)
      .peft-lock              held by the ``peft train`` writing here (:meth:`RunDir.lock`)

Every file and directory peft writes appears whole or not at all (:func:`atomic_dir`,
:func:`write_text_atomic`), peft writes only inside the run dir (:meth:`RunDir.refuse_links`),
and a failed write (no space, read-only, ...) is one line naming the file
(:func:`peftcli.errors.writing`). This module knows no method and no adapter
format: a checkpoint's adapter is written by a callable the trainer passes in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from peftcli.atomic import atomic_dir, atomic_file, write_json_atomic, write_text_atomic
from peftcli.errors import UserError, writing

try:
    import fcntl
except ImportError:  # not POSIX: no lock (two trains into one dir are then not refused)
    fcntl = None

WHERE = "output.dir"  # the knob that moves a run's writes elsewhere, named in write-fault messages

# ---------------------------------------------------------------------------------------------
# the metrics log


def read_events(path: Path) -> list[dict]:
    """The events of a ``metrics.jsonl``. A torn last line (the process was killed while
    appending it) is skipped; a bad line elsewhere is an error.

    Raises:
        UserError: a line other than the last is not JSON (names the file and line).
    """
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    events = []
    for i, line in enumerate(lines):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}:{i + 1}: not a JSON line") from None
    return events


class RunLog:
    """Appends one JSON object per event to ``metrics.jsonl``.

    ``upto_step``: keep the file's events up to that step (a resumed run drops what the
    interrupted run logged after its checkpoint); None starts an empty file. ``enabled=False``
    (processes other than the first) writes nothing.
    """

    def __init__(self, path: Path, upto_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.accelerator = None  # set to an Accelerator with trackers to mirror train/eval events
        self.tracker_dir: Path | None = None  # where those trackers write (named when a write there fails)
        self.events = [] if upto_step is None or not path.exists() else [
            e for e in read_events(path) if e.get("step", 0) <= upto_step]
        if enabled:
            with writing(path, WHERE):
                write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in self.events))

    def write(self, event: dict) -> None:
        """Append ``event`` (and mirror a train/eval event's numbers to the trackers, if any)."""
        self.events.append(event)
        if not self.enabled:  # a process other than the first keeps events in memory only
            return
        with writing(self.path, WHERE), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")  # a kill mid-line leaves a torn last line, which read_events skips
        if self.accelerator is not None and event.get("event") in ("train", "eval"):
            kind = event["event"]
            values = {f"{kind}/{k}": v for k, v in event.items() if k not in ("event", "step") and isinstance(v, (int, float))}
            with writing(self.tracker_dir or self.path.parent, WHERE):
                self.accelerator.log(values, step=event["step"])


def plot_loss(events: list[dict], path: Path) -> None:
    """``loss.png``: train and eval loss (nats per supervised token) against optimizer step,
    written through :func:`atomic_file`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train"]
    evals = [(e["step"], e["eval_loss"]) for e in events if e.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per supervised token (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# checkpoints


def _sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_sums(checkpoint: Path) -> dict[str, dict]:
    """What ``state.json`` records of a checkpoint's files: every file under ``checkpoint``
    except ``state.json`` itself (``adapter/*`` too), by path relative to it (``/``-separated)
    -> ``{"bytes": size, "sha256": hex digest}``."""
    return {p.relative_to(checkpoint).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(checkpoint.rglob("*")) if p.is_file() and p != checkpoint / "state.json"}


def _save_torch(obj, path: Path) -> None:
    """``torch.save`` through a Python file object: a failed write is then a plain ``OSError``
    with its errno (to a path, torch raises a ``RuntimeError`` without one)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _load_torch(path: Path):
    """``torch.load(weights_only=True)``: tensors and plain containers only, never a pickled object.

    Raises:
        UserError: one line naming the file: it holds a pickled object that is not weights
            (refused, unpickling could run code), it is not a readable torch file (truncated,
            overwritten), or it is missing.
    """
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except Exception as e:  # torch reports a truncated or foreign file as RuntimeError, KeyError, EOFError, ...
        if "Weights only load failed" in str(e):  # weights_only refused a pickled object (UnpicklingError)
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise UserError(f"{path}: holds a pickled object{what} that is not weights; refused, not loaded "
                            "(unpickling it could run code)") from None
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path}: not a readable torch file, truncated or overwritten ({type(e).__name__}: {first})") from None


def _is_record(rel, want) -> bool:
    """Whether ``rel -> want`` is an entry of a ``"files"`` map: a relative path inside the
    checkpoint -> ``{"bytes": int, "sha256": str}``."""
    inside = isinstance(rel, str) and not Path(rel).is_absolute() and ".." not in Path(rel).parts
    return inside and isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)


def _file_fault(file: Path, want: dict) -> str | None:
    """What is wrong with a checkpoint file against its ``state.json`` record ``want``
    (``{"bytes", "sha256"}``), as the one-line message naming it; None if it matches."""
    if not file.is_file():
        return f"{file}: missing (state.json records {want['bytes']} bytes)"
    size = file.stat().st_size
    if size != want["bytes"]:
        how = "truncated" if size < want["bytes"] else "size differs"
        return f"{file}: {how} ({size} bytes, state.json records {want['bytes']})"
    if _sha256(file) != want["sha256"]:
        return f"{file}: checksum differs from state.json's (same size, other bytes: changed after it was written)"
    return None


def _dir_reads(path: Path) -> bool:
    """Whether a dir of JSON and safetensors files (an adapter dir) reads back: it exists, holds a
    safetensors file, every ``.json`` parses and every ``.safetensors`` loads (header and sizes;
    a changed byte inside a tensor is not seen without a checksum)."""
    from safetensors.torch import load_file

    if not path.is_dir() or not any(path.glob("*.safetensors")):
        return False
    try:
        for f in path.iterdir():
            if f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix == ".safetensors":
                load_file(f)
    except Exception:  # any way of not reading back
        return False
    return True


def _fault_in(checkpoint: Path) -> UserError | None:
    """What :meth:`RunDir.verify_checkpoint` finds wrong with ``checkpoint``; None if it is intact."""
    try:
        RunDir.verify_checkpoint(checkpoint)
    except UserError as e:
        return e
    return None


@dataclass
class Checkpoint:
    """What a ``checkpoints/step-N`` dir holds, read back (:meth:`RunDir.read_checkpoint`).

    ``adapter``: its adapter dir (the caller loads the weights through the method);
    ``optimizer`` / ``scheduler``: their ``state_dict``s; ``rng``: torch's CPU RNG state of each
    process (index = process rank); ``position``: the data stream's ``{"epoch", "index"}``;
    ``progress``: the loop's counters as saved (empty for checkpoints written before they were).
    """

    path: Path
    step: int
    adapter: Path
    optimizer: dict
    scheduler: dict
    rng: list[torch.Tensor]
    position: dict
    progress: dict


class RunDir:
    """A run dir's layout (see the module docstring): the paths of its files, its checkpoints,
    and the rules for writing into it."""

    FILES = ("recipe.yaml", "metrics.jsonl", "summary.json", "loss.png", "adapter", "checkpoints", "tensorboard", "smoke.json",
             ".peft-lock")
    # an earlier run's outputs, besides checkpoints (smoke.json: the report of a --smoke run)
    REPLACED = ("adapter", "summary.json", "loss.png", "tensorboard", "metrics.jsonl", "smoke.json")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The dir of the checkpoint after optimizer step ``step``: ``checkpoints/step-N``."""
        return self.checkpoints_dir / f"step-{step}"

    @staticmethod
    def adapter_of(checkpoint: Path) -> Path:
        """The adapter dir inside a ``checkpoints/step-N`` dir."""
        return checkpoint / "adapter"

    @staticmethod
    def step_of(checkpoint: Path) -> int:
        """The step of a ``checkpoints/step-N`` dir: N."""
        return int(checkpoint.name.removeprefix("step-"))

    @classmethod
    def owning(cls, adapter_dir: str | Path) -> RunDir | None:
        """The run dir an adapter dir belongs to: RUN for ``RUN/adapter`` or
        ``RUN/checkpoints/step-N/adapter``; None for an adapter dir elsewhere (the dir may not
        hold a run: check :attr:`recipe` before reading it)."""
        adapter_dir = Path(adapter_dir)
        if adapter_dir.name != "adapter":
            return None
        run = adapter_dir.parent
        if run.parent.name == "checkpoints":
            run = run.parent.parent
        return cls(run)

    # ------------------------------------------------------------------ writing rules

    def refuse_links(self) -> None:
        """peft writes only inside the run dir: a symbolic link in place of one of its files or dirs
        (which would send the write elsewhere) is refused. The run dir itself may be a link.

        Raises:
            UserError: names the link.
        """
        for name in self.FILES:
            if (self.path / name).is_symlink():
                raise UserError(f"output.dir: {self.path / name} is a symbolic link; peft writes only inside the run dir, "
                                "not through links (remove it)")

    def holds_run(self) -> bool:
        """Whether an earlier run wrote here (its metrics or any checkpoint, even a partial one)."""
        return self.metrics.exists() or bool(self.checkpoints(complete=False))

    def earlier_work(self) -> list[str]:
        """What an earlier run trained here and a fresh run would replace: its checkpoints
        (``"checkpoints/step-N"``, newest last; a damaged one too) and its ``"adapter"``. Empty
        when there is nothing (metrics of a run killed before its first checkpoint are not work)."""
        found = [f"checkpoints/{p.name}" for p in self.named_checkpoints()]
        return found + ["adapter"] * self.adapter.exists()

    def bytes_held(self) -> int:
        """Bytes of the files :meth:`remove_earlier_run` would delete (they free that much)."""
        paths = self.checkpoints(complete=False) + [self.path / name for name in self.REPLACED]
        return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())

    def remove_earlier_run(self) -> None:
        """Delete what an earlier run wrote here: every checkpoint (partial ones too; other files a
        user keeps in ``checkpoints/`` stay, and the dir with them), ``adapter/``, ``summary.json``,
        ``loss.png``, ``tensorboard/``, ``metrics.jsonl``. Nothing else in the run dir is touched.

        Raises:
            WriteFault: a file could not be deleted (read-only, no permission).
        """
        with writing(self.path, WHERE):
            for old in self.checkpoints(complete=False):
                shutil.rmtree(old)
            with contextlib.suppress(OSError):
                self.checkpoints_dir.rmdir()  # only when nothing else is in it
            for name in self.REPLACED:
                p = self.path / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()

    def _temporaries(self) -> Iterator[tuple[Path, Path, str]]:
        """(temporary, the file or dir it stands for, "tmp" | "old") for every temporary of
        peft's own atomic writes in the run dir and ``checkpoints/``."""
        for parent in (self.path, self.checkpoints_dir):
            for p in sorted(parent.glob(".*")) if parent.is_dir() else []:
                found = re.fullmatch(r"\.(.+)\.(tmp|old)(-.+)?", p.name)
                if found and (found.group(1) in self.FILES or re.fullmatch(r"step-\d+", found.group(1))):
                    yield p, parent / found.group(1), found.group(2)

    def put_back(self) -> list[str]:
        """A swap killed between its two renames left ``NAME`` missing and the complete old one as
        ``.NAME.old-*``: put it back (call with :meth:`lock` held, before reading the dir).
        Returns what was put back, relative to the run dir."""
        done = []
        for p, target, kind in self._temporaries():
            if kind == "old" and not target.exists() and not p.is_symlink():
                os.replace(p, target)
                done.append(f"{target.relative_to(self.path)} put back")
        return done

    def remove_temporaries(self) -> list[str]:
        """Delete what killed writes left (``.NAME.tmp-*``, ``.NAME.old-*``, ``.NAME.tmp``; a link
        is removed, never followed). Call with :meth:`lock` held, after :meth:`put_back`.
        Returns what was deleted, relative to the run dir."""
        done = []
        for p, _, _ in self._temporaries():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            done.append(f"{p.relative_to(self.path)} deleted")
        return done

    def write_recipe(self, text: str) -> None:
        """``recipe.yaml`` (the resolved recipe), atomically."""
        with writing(self.recipe, WHERE):
            write_text_atomic(self.recipe, text)

    def write_summary(self, summary: dict) -> None:
        """``summary.json``, atomically (:func:`write_json_atomic`)."""
        with writing(self.summary, WHERE):
            write_json_atomic(self.summary, summary)

    def plot_loss(self, events: list[dict]) -> None:
        """``loss.png`` from the metrics events (:func:`plot_loss`)."""
        with writing(self.loss_plot, WHERE):
            plot_loss(events, self.loss_plot)

    def check_room(self, needed: int, freed: int = 0) -> None:
        """Refuse to start when the run dir's file system has less free space than ``needed``
        bytes (plus ``freed``: what removing an earlier run will give back).

        Raises:
            UserError: names the run dir, the bytes needed and free, and what to change.
        """
        free = shutil.disk_usage(self.path).free + freed
        if free < needed:
            raise UserError(f"{WHERE} {self.path}: the run needs about {_mib(needed)} (adapter and checkpoints) and "
                            f"{_mib(free)} is free there; free space, keep fewer checkpoints (train.keep_checkpoints, "
                            f"train.save_every) or choose another {WHERE}")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``.peft-lock`` while a ``peft train`` writes here, so a second one into the same
        dir stops at once. The lock is the OS's (``flock``): a killed run never leaves it stuck.
        Creates the run dir (its parents too); a run dir this call created that is still empty
        when the block ends with an error is removed again.

        Raises:
            UserError: another process holds the lock (names its pid); WriteFault: the dir
            cannot be created or written (read-only, no permission, ...).
        """
        created = not self.path.exists()
        lock_file = self.path / ".peft-lock"
        with writing(self.path, WHERE):
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise UserError(f"{WHERE} {self.path}: another peft train (pid {holder}) is writing this run dir; "
                                    f"wait for it to finish or choose another {WHERE}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        except BaseException:
            os.close(fd)
            if created and [p.name for p in self.path.iterdir()] == [lock_file.name]:
                lock_file.unlink()
                self.path.rmdir()
            raise
        else:
            os.close(fd)

    # ------------------------------------------------------------------ checkpoints

    def checkpoints(self, complete: bool = True) -> list[Path]:
        """The complete ``checkpoints/step-N`` dirs, oldest first; with ``complete=False`` also the
        partial ones (a temporary ``.step-N.tmp-*`` or ``.step-N.old-*`` left by a kill) — only
        names peft writes, never other files a user keeps in ``checkpoints/``."""
        found = []
        for p in self.checkpoints_dir.glob("*step-*"):
            name = p.name.removeprefix("step-")
            if name.isdigit() and (p / "state.json").is_file():
                found.append((int(name), p))
            elif not complete and (name.isdigit() or re.fullmatch(r"\.step-\d+\.(tmp|old)-.+", p.name)):
                found.append((-1, p))
        return [p for _, p in sorted(found)]

    def named_checkpoints(self) -> list[Path]:
        """Every ``checkpoints/step-N`` dir by its name, oldest first, whether or not it is complete:
        a written checkpoint always has its ``state.json`` (:meth:`save_checkpoint` renames it into
        place whole), so a ``step-N`` without one was damaged after it was written."""
        found = [(int(p.name.removeprefix("step-")), p) for p in self.checkpoints_dir.glob("step-*")
                 if p.is_dir() and p.name.removeprefix("step-").isdigit()]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        """The highest complete ``checkpoints/step-N`` dir, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def prune_checkpoints(self, keep: int | None) -> None:
        """Delete all but the newest ``keep`` checkpoints (None keeps all). The newest is written
        (atomically) before any older one is removed, so a complete checkpoint always exists."""
        if keep:
            for old in self.checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def save_checkpoint(self, step: int, write_adapter: Callable[[Path], object], optimizer, scheduler,
                        rng: list[torch.Tensor], position: dict, progress: dict | None = None) -> Path:
        """Write ``checkpoints/step-N/`` through :func:`atomic_dir`, so a checkpoint on disk is
        never partial (call it on the first process only). ``state.json`` is written last and
        records the size and SHA-256 of every other file (``"files"``, :meth:`verify_checkpoint`).

        Args:
            write_adapter: writes the adapter dir it is given (``adapter/`` of the checkpoint).
            optimizer, scheduler: anything with ``state_dict()``; saved as optimizer.pt / scheduler.pt.
            rng: torch's CPU RNG state of every process (dropout draws from it only).
            position: the data stream's ``{"epoch", "index"}``; progress: the loop's counters
                (losses not logged yet, tokens seen, elapsed seconds).
        Returns:
            the checkpoint dir.
        Raises:
            WriteFault: a write fault (no space, read-only, no permission, ...) naming the
                checkpoint dir; nothing of it is left on disk (the caller says what is kept).
        """
        final = self.checkpoint(step)
        with writing(final, WHERE), atomic_dir(final) as tmp:
            write_adapter(RunDir.adapter_of(tmp))
            _save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
            _save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
            _save_torch({"torch": rng}, tmp / "rng.pt")
            state = {"step": step, "data": position, "progress": progress or {}, "files": _file_sums(tmp)}
            (tmp / "state.json").write_text(json.dumps(state))
        return final

    @staticmethod
    def verify_checkpoint(checkpoint: Path) -> None:
        """Check a checkpoint dir against what its ``state.json`` records: each file's size and
        SHA-256 (``"files"``, written by :meth:`save_checkpoint`). A checkpoint written before
        they were recorded (no ``"files"``) is accepted as before, unchecked: only loading it
        (:meth:`read_checkpoint`, the adapter's reader) can then find a bad file.

        Raises:
            UserError: one line naming the first bad file: ``state.json`` missing or unreadable,
                a recorded file missing, its size differs (truncated), or its checksum differs.
        """
        state = RunDir._read_state(checkpoint)
        files = state.get("files")
        if files is None:
            return  # an older checkpoint: nothing recorded to check against
        if not isinstance(files, dict) or not all(_is_record(rel, want) for rel, want in files.items()):
            raise UserError(f"{checkpoint / 'state.json'}: unreadable ('files' is not a map of path -> bytes and sha256)")
        for rel, want in files.items():
            fault = _file_fault(checkpoint / rel, want)
            if fault is not None:
                raise UserError(fault)

    @staticmethod
    def _read_state(checkpoint: Path) -> dict:
        """A checkpoint's ``state.json``.

        Raises:
            UserError: missing, not JSON, or not a checkpoint's state (no integer step and data position).
        """
        file = checkpoint / "state.json"
        try:
            state = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{file}: missing (the checkpoint was not written to the end)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{file}: unreadable ({e})") from None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("data"), dict):
            raise UserError(f"{file}: unreadable (not a checkpoint's state: no step and data position)")
        return state

    def resume_point(self, skip_corrupt: bool = False, say: Callable[[str], None] = print) -> Path | None:
        """The checkpoint ``peft train --resume`` continues from: the newest complete one that
        verifies (:meth:`verify_checkpoint`); None when there is none. A corrupt checkpoint is
        never deleted here.

        Args:
            skip_corrupt: (``--skip-corrupt``) pass over corrupt checkpoints to the newest intact
                one (None if none is), saying one line through ``say`` that names those skipped.
        Raises:
            UserError: the newest checkpoint is corrupt and ``skip_corrupt`` is False: names its bad
                file and ends with the way on (``--resume --skip-corrupt`` to the newest intact
                checkpoint, or ``--overwrite`` when none is intact).
        """
        corrupt, intact = [], None
        for checkpoint in reversed(self.named_checkpoints()):  # a step-N that lost its state.json is corrupt too
            fault = _fault_in(checkpoint)
            if fault is None:
                intact = checkpoint
                break
            corrupt.append(fault)
        if not corrupt:
            return intact
        if not skip_corrupt:
            usable = None if intact else self.usable_adapter()
            way = (f"resume from the newest intact checkpoint ({intact.name}) with --resume --skip-corrupt" if intact else
                   f"no intact checkpoint: {usable} loads and is usable as it is (peft eval, generate, merge); starting again "
                   "with --overwrite deletes it (copy it elsewhere first)" if usable else
                   "no intact checkpoint: start again with --overwrite")
            raise UserError(f"{corrupt[0]}; {way}")
        say(f"note: --skip-corrupt: skipped {len(corrupt)} corrupt checkpoint{'s' * (len(corrupt) > 1)} "
            f"({'; '.join(map(str, corrupt))}); " + (f"resuming from {intact}" if intact else "no intact checkpoint is left"))
        return intact

    def usable_adapter(self) -> Path | None:
        """An adapter of this run that can be used as it is when no checkpoint can be resumed:
        ``adapter/`` when its files read (:func:`_dir_reads`), else the adapter of the newest
        checkpoint whose adapter files match their recorded checksums. None when neither."""
        if _dir_reads(self.adapter):
            return self.adapter
        for checkpoint in reversed(self.named_checkpoints()):
            try:
                files = RunDir._read_state(checkpoint).get("files")
            except UserError:
                continue
            adapter = {rel: want for rel, want in (files or {}).items() if rel.startswith("adapter/") and _is_record(rel, want)}
            if adapter and all(_file_fault(checkpoint / rel, want) is None for rel, want in adapter.items()):
                return RunDir.adapter_of(checkpoint)
        return None

    @staticmethod
    def read_checkpoint(checkpoint: Path) -> Checkpoint:
        """The states a checkpoint dir holds (:class:`Checkpoint`); the adapter weights are left
        to the caller. A checkpoint of one process holds one RNG state (older ones a bare tensor).
        It is not verified here (:meth:`verify_checkpoint`; :meth:`resume_point` does).

        Raises:
            UserError: one line naming the file that cannot be loaded: ``state.json`` unreadable,
                a ``.pt`` file truncated or holding a pickled object (refused by ``weights_only``).
        """
        state = RunDir._read_state(checkpoint)
        rng = _load_torch(checkpoint / "rng.pt")["torch"]
        return Checkpoint(path=checkpoint, step=state["step"], adapter=RunDir.adapter_of(checkpoint),
                          optimizer=_load_torch(checkpoint / "optimizer.pt"),
                          scheduler=_load_torch(checkpoint / "scheduler.pt"),
                          rng=rng if isinstance(rng, list) else [rng],
                          position=state["data"], progress=state.get("progress", {}))
