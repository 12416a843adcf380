"""``peft merge -o DIR`` never destroys what peft did not write (CASES C20): DIR must be new,
empty, or a dir peft merged into before (its ``peft_merge.json`` lists the files it wrote);
``--overwrite`` replaces those files only, and a failed write leaves DIR as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import method_recipe, perturb, saved_adapter
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import modeling_utils as transformers_modeling
from typer.testing import CliRunner

from peftcli import __version__, errors, merge
from peftcli.cli import app
from peftcli.errors import UserError

PEFT = str(Path(sys.executable).with_name("peft"))
NOTES = "my notes: which prompts worked\n"
DATA = bytes(range(256)) * 64  # 16 KiB of every byte value


def trained_run(base_dir, run_dir, seed):
    """A run dir whose LoRA adapter (q_proj, v_proj) has random non-zero B, as if trained."""
    recipe = method_recipe("lora", base_dir, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    saved_adapter(recipe, run_dir / "adapter", lambda model: perturb(model, ["lora_B"], seed=seed))
    return run_dir


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    return trained_run(tiny_dir, tmp_path_factory.mktemp("run"), seed=1)


@pytest.fixture(scope="module")
def run2(tiny_dir, tmp_path_factory):
    return trained_run(tiny_dir, tmp_path_factory.mktemp("run2"), seed=2)


def tree(root: Path) -> dict[str, object]:
    """Everything under ``root``: file bytes, symlink targets, dir modes, by relative path."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            found[rel] = ("dir", path.stat().st_mode)
        else:
            found[rel] = (path.read_bytes(), path.stat().st_mode)
    return found


def add_user_files(out: Path) -> None:
    """What a user keeps next to a merged model: notes, a subdir with data, a link, a read-only file."""
    (out / "NOTES.md").write_text(NOTES)
    (out / "eval" / "prompts").mkdir(parents=True)
    (out / "eval" / "prompts" / "data.bin").write_bytes(DATA)
    (out / "eval" / "prompts").chmod(0o750)
    (out / "latest-notes").symlink_to("NOTES.md")
    (out / "frozen.txt").write_text("do not touch")
    (out / "frozen.txt").chmod(0o444)


def no_base_load(monkeypatch):
    """Make loading the base fail loudly: a check that must come before the slow load."""
    def boom(*args, **kwargs):
        raise AssertionError("the base was loaded before -o was checked")
    monkeypatch.setattr(merge, "load_adapted", boom)


def quiet(_message):
    pass


# ---------------------------------------------------------------------------------------------
# where a merge may write


def test_merge_into_a_new_dir_records_the_files_it_wrote(run, tmp_path):
    out = merge.merge_adapter(run, tmp_path / "new", log=quiet)
    marker = json.loads((out / merge.MARKER).read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(marker["files"]) == on_disk and "model.safetensors" in on_disk and merge.MARKER in on_disk
    assert marker["written_by"] == "peft merge" and marker["peftcli_version"] == __version__
    assert marker["adapter"] == str((run / "adapter").resolve()) and marker["dtype"] == "float32"
    AutoModelForCausalLM.from_pretrained(out)  # the marker does not disturb a plain load
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # no temporaries


def test_merge_into_an_empty_dir_keeps_its_mode(run, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    out.chmod(0o750)
    merge.merge_adapter(run, out, log=quiet)
    assert (out / "model.safetensors").is_file() and (out / merge.MARKER).is_file()
    assert out.stat().st_mode & 0o777 == 0o750


def foreign_dir(kind: str, out: Path, tiny_dir: Path) -> None:
    """A non-empty dir peft merge did not write."""
    if kind == "notes":
        out.mkdir()
        add_user_files(out)
    elif kind == "transformers":  # a plain model dir with config.json, written by someone else
        shutil.copytree(tiny_dir, out)
    elif kind == "forged marker":  # a marker that would make peft drop a file outside DIR
        shutil.copytree(tiny_dir, out)
        (out / merge.MARKER).write_text(json.dumps({"written_by": "peft merge", "files": ["../victim"]}))
    else:  # "other marker": another tool's file of that name
        out.mkdir()
        (out / merge.MARKER).write_text(json.dumps({"files": ["config.json"]}))
        (out / "config.json").write_text("{}")


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", ["notes", "transformers", "forged marker", "other marker"])
def test_merge_refuses_a_dir_peft_did_not_write(run, tiny_dir, tmp_path, monkeypatch, kind, overwrite):
    out = tmp_path / "theirs"
    foreign_dir(kind, out, tiny_dir)
    before = tree(out)
    no_base_load(monkeypatch)
    with pytest.raises(UserError) as err:
        merge.merge_adapter(run, out, overwrite=overwrite, log=quiet)
    assert str(err.value) == (f"-o {out}: is not empty and peft merge did not write it (no {merge.MARKER}); "
                              "choose a new or empty dir")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]


def test_merge_refuses_an_earlier_merge_without_overwrite(run, tmp_path, monkeypatch):
    out = merge.merge_adapter(run, tmp_path / "merged", log=quiet)
    add_user_files(out)
    before = tree(out)
    no_base_load(monkeypatch)
    with pytest.raises(UserError, match=f"-o {out}: holds an earlier peft merge; pass --overwrite"):
        merge.merge_adapter(run, out, log=quiet)
    assert tree(out) == before


def test_cli_earlier_merge_without_overwrite_exits_2_with_one_line(run, tmp_path):
    out = merge.merge_adapter(run, tmp_path / "merged", log=quiet)
    before = tree(out)
    p = subprocess.run([PEFT, "merge", str(run), "-o", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: -o {out}: ") and "--overwrite" in lines[0]
    assert tree(out) == before


def test_cli_overwrite_does_not_open_a_foreign_dir(run, tiny_dir, tmp_path):
    out = tmp_path / "theirs"
    foreign_dir("transformers", out, tiny_dir)
    before = tree(out)
    result = CliRunner().invoke(app, ["merge", str(run), "-o", str(out), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"error: -o {out}: is not empty and peft merge did not")
    assert tree(out) == before


# ---------------------------------------------------------------------------------------------
# --overwrite replaces peft's own files, and only those


def test_C20_merge_never_destroys_user_files(run, run2, tmp_path):
    out = merge.merge_adapter(run, tmp_path / "merged", log=quiet)
    first = load_file(str(out / "model.safetensors"))
    # an earlier peftcli that wrote a file this merge does not: it is peft's, so it goes
    marker = json.loads((out / merge.MARKER).read_text())
    (out / "stale-shard.bin").write_bytes(b"old")
    (out / merge.MARKER).write_text(json.dumps({**marker, "files": marker["files"] + ["stale-shard.bin"]}))
    add_user_files(out)
    mine = {k: v for k, v in tree(out).items() if k not in marker["files"] + ["stale-shard.bin"]}
    inode = (out / "eval" / "prompts" / "data.bin").stat().st_ino
    messages = []

    merge.merge_adapter(run2, out, overwrite=True, log=messages.append)

    # the user's files, dirs, modes and link: all there, byte for byte, the same inode (a hard link)
    assert {k: v for k, v in tree(out).items() if k in mine} == mine and set(mine) <= set(tree(out))
    assert (out / "eval" / "prompts" / "data.bin").stat().st_ino == inode
    assert not (out / "stale-shard.bin").exists()
    assert "kept 4 other file(s) there" in messages[-1]
    # the weights are run2's merge: equal to merging run2 into a new dir (the reference), not run's
    fresh = merge.merge_adapter(run2, tmp_path / "fresh", log=quiet)
    now, want = load_file(str(out / "model.safetensors")), load_file(str(fresh / "model.safetensors"))
    assert now.keys() == want.keys() and all((now[k] == want[k]).all() for k in want)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not (now[q] == first[q]).all()
    record = json.loads((out / merge.MARKER).read_text())
    assert record["adapter"] == str((run2 / "adapter").resolve())
    assert not set(record["files"]) & set(mine)  # the user's files never become peft's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "merged"]  # no temporaries


def test_overwrite_refuses_a_user_file_named_like_a_new_peft_file(run, tmp_path):
    out = merge.merge_adapter(run, tmp_path / "merged", log=quiet)
    marker = json.loads((out / merge.MARKER).read_text())
    # as if the earlier merge had not written chat_template.jinja, and the user had put one there
    marker["files"].remove("chat_template.jinja")
    (out / merge.MARKER).write_text(json.dumps(marker))
    (out / "chat_template.jinja").write_text("{{ mine }}")
    before = tree(out)
    with pytest.raises(UserError, match=f"{out / 'chat_template.jinja'}: not a file peft merge wrote there"):
        merge.merge_adapter(run, out, overwrite=True, log=quiet)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# ---------------------------------------------------------------------------------------------
# write faults: one line, and DIR as it was


def _half_safetensors(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 100)  # what a full disk leaves: part of the file
    # the message safetensors 0.8 raises on a full tmpfs (measured)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _fault(kind: str, monkeypatch, out: Path) -> str:
    """Inject a write fault into a merge to ``out``; returns the strerror the message must carry."""
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    save_tokenizer = PreTrainedTokenizerFast.save_pretrained

    def tokenizer_then(exc):
        def save(self, *args, **kwargs):
            save_tokenizer(self, *args, **kwargs)  # written in part, then the fault
            raise exc
        return save

    def fail(exc):
        def raising(*args, **kwargs):
            raise exc
        return raising

    if kind == "safetensors ENOSPC":
        monkeypatch.setattr(transformers_modeling, "safe_save_file", _half_safetensors)
    elif kind == "tokenizer ENOSPC":
        monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", tokenizer_then(enospc))
    elif kind == "tokenizers (Rust) ENOSPC":  # tokenizer.json is written by tokenizers' Rust I/O (measured)
        monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained",
                            tokenizer_then(Exception("No space left on device (os error 28)")))
    elif kind == "read-only temporary dir":
        temporary = str(out.parent / f".{out.name}.tmp-x")  # mkdtemp names the dir it could not make
        monkeypatch.setattr("tempfile.mkdtemp", fail(OSError(errno.EROFS, os.strerror(errno.EROFS), temporary)))
        no_base_load(monkeypatch)  # found before the slow load
        return os.strerror(errno.EROFS)
    elif kind == "no space for the user's files":  # link and copy both fail
        monkeypatch.setattr(os, "link", fail(OSError(errno.EXDEV, os.strerror(errno.EXDEV))))
        monkeypatch.setattr(shutil, "copy2", fail(enospc))
    return os.strerror(errno.ENOSPC)


FAULTS = ["safetensors ENOSPC", "tokenizer ENOSPC", "tokenizers (Rust) ENOSPC", "read-only temporary dir",
          "no space for the user's files"]


@pytest.mark.parametrize("kind", FAULTS)
def test_write_fault_on_overwrite_is_one_line_and_keeps_the_old_dir(run, tmp_path, monkeypatch, kind):
    out = merge.merge_adapter(run, tmp_path / "merged", log=quiet)
    add_user_files(out)
    before = tree(out)
    strerror = _fault(kind, monkeypatch, out)
    with pytest.raises(UserError) as err:
        merge.merge_adapter(run, out, overwrite=True, log=quiet)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{out}: cannot write ({strerror}); ")
    assert "(set -o)" in message and message.endswith(f"-o {out} is as it was")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # nothing half-written beside it


@pytest.mark.parametrize("kind", ["safetensors ENOSPC", "read-only temporary dir"])
def test_write_fault_into_a_new_dir_leaves_nothing(run, tmp_path, monkeypatch, kind):
    out = tmp_path / "merged"
    strerror = _fault(kind, monkeypatch, out)
    with pytest.raises(UserError) as err:
        merge.merge_adapter(run, out, log=quiet)
    assert str(err.value).startswith(f"{out}: cannot write ({strerror}); ")
    assert str(err.value).endswith(f"(set -o); nothing was written to {out}")
    assert list(tmp_path.iterdir()) == []


def test_fault_errno_reads_the_rust_writers_messages():
    # the exact errors safetensors 0.8 and tokenizers 0.23 raised on a full 3 MiB tmpfs (measured)
    assert errors.fault_errno(SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")) == errno.ENOSPC
    assert errors.fault_errno(Exception("No space left on device (os error 28)")) == errno.ENOSPC
    assert errors.fault_errno(Exception('IoError(Os { code: 30, kind: ReadOnlyFilesystem, message: "x" })')) == 30
    assert errors.fault_errno(Exception("invalid header (error 28)")) is None


def test_a_file_in_the_way_is_found_before_the_slow_load(run, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "sub" / "merged"
    no_base_load(monkeypatch)
    with pytest.raises(UserError) as err:
        merge.merge_adapter(run, out, log=quiet)
    assert str(err.value).startswith(f"{out}: cannot write (Not a directory); a file is in the way")
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_overwrite_through_a_symlinked_out_dir_keeps_the_link(run, run2, tmp_path):
    real = merge.merge_adapter(run, tmp_path / "real", log=quiet)
    (real / "NOTES.md").write_text(NOTES)
    (tmp_path / "link").symlink_to("real")
    merge.merge_adapter(run2, tmp_path / "link", overwrite=True, log=quiet)
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == "real"
    assert (real / "NOTES.md").read_text() == NOTES
    assert json.loads((real / merge.MARKER).read_text())["adapter"] == str((run2 / "adapter").resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
