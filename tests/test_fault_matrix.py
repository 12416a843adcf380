"""The fault matrix (issue 16, CASES C20): every place ``peft train`` and ``peft merge`` write ×
{disk full, read-only file system, SIGKILL during the write}.

Each cell runs the command with the fault injected (tests/faults.py) and asserts what a user
sees and keeps: the exit code; one ``error:`` line naming the file, with no traceback; that
what the message says is kept is there; that no file a user put in the run dir changed; and
that nothing trained is lost — once the fault is gone, ``peft train --resume`` (or the merge
again) finishes with the adapter of an uninterrupted run, bit for bit.

The table in docs/troubleshooting.md ("The fault matrix") is this test's output: each cell
checks its row there (``PEFTCLI_FAULT_TABLE=update`` rewrites the rows from the run instead).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from faults import Site, inject
from helpers import peft_in_process, write_jsonl, write_recipe
from safetensors.torch import load_file
from tiny import SORT_ROWS

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "troubleshooting.md"
FAULTS = ("ENOSPC", "EROFS", "kill")

# site: (where the fault hits (a run file, or checkpoints/step-N), writes let through first, the recipe needs TensorBoard)
TRAIN_SITES = {
    "recipe.yaml": ("recipe.yaml", 0),
    "metrics.jsonl": ("metrics.jsonl", 4),  # the file, the data event, steps 1-2: step 3's line fails
    "checkpoint (mid-run)": ("checkpoints/step-2", 0),
    "checkpoint (last step)": ("checkpoints/step-4", 0),
    "adapter": ("adapter", 0),
    "summary.json": ("summary.json", 0),
    "loss.png": ("loss.png", 0),
    "tensorboard (setup)": ("tensorboard", 0),
    "tensorboard (mid-run)": ("tensorboard", "log"),  # the writer's thread fails: raised at step 3's log call
}
MERGE_AFTER = 3  # merge probes that it may create a dir there, then fills a temporary one: the fault hits its 2nd file


def _recipe(tmp_path: Path, tiny_dir, name: str) -> Path:
    data = write_jsonl(tmp_path / "rows.jsonl", SORT_ROWS * 2)
    return write_recipe(tmp_path / f"{name}.yaml", {
        "model": {"name_or_path": str(tiny_dir), "dtype": "float32"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": {"path": str(data), "format": "alpaca"}, "eval": {"path": str(data), "format": "alpaca"},
                 "max_seq_len": 128},
        "train": {"max_steps": 4, "micro_batch_size": 2, "lr": 1e-2, "log_every": 1, "eval_every": 0, "save_every": 2,
                  "mixed_precision": "no", "report_to": ["tensorboard"]},
        "output": {"dir": str(tmp_path / name)},
    })


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    """The uninterrupted run: its adapter weights."""
    from peftcli.recipe import load_recipe
    from peftcli.trainer import train

    tmp = tmp_path_factory.mktemp("reference")
    train(load_recipe(_recipe(tmp, tiny_dir, "run")))
    return {"dir": tmp / "run", "adapter": _adapter(tmp / "run")}


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _normal(text: str, *paths: tuple[Path, str]) -> str:
    for path, name in paths:
        text = text.replace(str(path), name)
    return text


def _on_disk(run: Path) -> str:
    """What is in the run dir, peft's files only, as a short list."""
    names = []
    for name in ("adapter", "summary.json", "loss.png", "tensorboard"):
        if (run / name).exists():
            names.append(name)
    names += [f"step-{p.name.removeprefix('step-')}" for p in sorted((run / "checkpoints").glob("step-*"))]
    litter = sorted(re.sub(r"\.tmp-\w+$", ".tmp-*", p.name) for p in run.rglob(".*") if p.name != ".peft-lock")
    return ", ".join(names or ["nothing"]) + (f"; a killed write's temporary: {', '.join(litter)}" if litter else "")


def _kept_is_there(line: str, run: Path, reference) -> None:
    """What the message says is kept exists: the final adapter (equal to the reference's) or the
    newest checkpoint (complete)."""
    if "the trained adapter is saved in" in line:
        assert all(torch.equal(_adapter(run)[k], v) for k, v in reference["adapter"].items())
    found = re.search(r"the newest checkpoint is (\S+) ", line)
    if found:
        assert (Path(found.group(1)) / "state.json").is_file(), line
    found = re.search(r"is saved instead in (\S+) ", line)  # the steps since the checkpoint, outside the run dir
    if found:
        rescued = load_file(Path(found.group(1)) / "adapter_model.safetensors")
        assert rescued.keys() == reference["adapter"].keys() and all(v.isfinite().all() for v in rescued.values())


def _check_row(site: str, fault: str, row: str) -> None:
    """The docs table's row for (site, fault) is ``row`` (or, with PEFTCLI_FAULT_TABLE=update, becomes it)."""
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index("<!-- fault-matrix -->"), text.index("<!-- /fault-matrix -->")
    rows = text[start:end].splitlines()[1:]
    key = f"| {site} | {fault} |"
    if os.environ.get("PEFTCLI_FAULT_TABLE") == "update":
        header, body = rows[:2], [r for r in rows[2:] if r.strip() and not r.startswith(key)]
        order = [f"| {s} | {f} |" for s in [*TRAIN_SITES, "merge output"] for f in FAULTS]
        body = sorted(body + [row], key=lambda r: next(i for i, k in enumerate(order) if r.startswith(k)))
        DOC.write_text(text[:start] + "\n".join(["<!-- fault-matrix -->", *header, *body, ""]) + text[end:], encoding="utf-8")
        return
    assert row in rows, f"docs/troubleshooting.md has no row\n{row}\n(PEFTCLI_FAULT_TABLE=update rewrites the table)"


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("site", list(TRAIN_SITES))
def test_C20_fault_matrix_train(tmp_path, tiny_dir, reference, capsys, monkeypatch, site, fault):
    target, after = TRAIN_SITES[site]
    rescue = tmp_path / "tmp"  # TMPDIR, where the steps since the last checkpoint are saved when the run dir fails
    rescue.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue))
    recipe, run = _recipe(tmp_path, tiny_dir, "run"), tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")  # a file of the user's: never touched
    name, _, step = target.partition("/")
    if fault == "kill":
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "faults.py"), run, name + ("/" + step if step else ""),
                               fault, str(after), "--", "train", recipe],
                              capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == -9, done.stderr
        shown, code = "(killed)", "SIGKILL"
    else:
        with inject(Site(run, name, step or None), fault, after):
            exit_code, stderr = peft_in_process(["train", recipe], capsys)
        assert exit_code == 2, stderr
        line = _one_line(stderr)
        assert str(run / target) in line and ("No space left" in line if fault == "ENOSPC" else "Read-only" in line), line
        _kept_is_there(line, run, reference)
        shown, code = _normal(line, (run, "RUN"), (rescue, "TMP")).removeprefix("error: "), "2"
        shown = re.sub(r"(peft-rescued-run-step\d+-)\w+", r"\1*", shown)
    after_fault = _on_disk(run)
    exit_code, stderr = peft_in_process(["train", recipe, "--resume"], capsys)  # the fault is gone: finish the run
    assert exit_code == 0, stderr
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", stderr)
    redone = 4 - int(resumed.group(1)) if resumed else 4
    assert all(torch.equal(_adapter(run)[k], v) for k, v in reference["adapter"].items()), "trained work lost"
    assert (run / "notes.txt").read_text() == "mine"
    assert _on_disk(run) == "adapter, summary.json, loss.png, tensorboard, step-2, step-4", _on_disk(run)
    _check_row(site, fault, f"| {site} | {fault} | {code} | {shown} | {after_fault} | {redone} of 4 |")


@pytest.mark.parametrize("fault", FAULTS)
def test_C20_fault_matrix_merge(tmp_path, reference, capsys, fault):
    out = tmp_path / "merged"
    user_file = tmp_path / "mine.txt"
    user_file.write_text("mine")
    args = ["merge", reference["dir"], "-o", out]
    if fault == "kill":
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "faults.py"), tmp_path, "merged", fault, str(MERGE_AFTER), "--",
                               *map(str, args)], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == -9, done.stderr
        shown, code = "(killed)", "SIGKILL"
    else:
        with inject(Site(tmp_path, "merged"), fault, MERGE_AFTER):
            exit_code, stderr = peft_in_process(args, capsys)
        assert exit_code == 2, stderr
        line = _one_line(stderr)
        assert str(out) in line, line
        shown, code = _normal(line, (out, "OUT"), (reference["dir"], "RUN")).removeprefix("error: "), "2"
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "mine.txt")
    after_fault = ", ".join(left) if left else "nothing"
    assert not out.exists(), "a failed merge left a partial output dir"
    # a killed merge's temporary (never named OUT) stays; merging again works beside it
    exit_code, stderr = peft_in_process(args, capsys)
    assert exit_code == 0, stderr
    assert json.loads((out / "config.json").read_text()) and user_file.read_text() == "mine"
    after_fault = re.sub(r"\.merged\.tmp-\w+", ".merged.tmp-*", after_fault)
    _check_row("merge output", fault, f"| merge output | {fault} | {code} | {shown} | {after_fault} | - |")
