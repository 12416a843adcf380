"""A run killed at any moment resumes to the same adapter, bit for bit; SIGINT/SIGTERM checkpoint and stop.

Real `peft train` subprocesses on a tiny model (float32, CPU, dropout 0, a checkpoint every step,
the loss logged every 3rd step so a checkpoint falls between two log lines).
``PEFTCLI_KILL_REPEAT=N`` runs the SIGKILL test at N kill moments (the suite runs 3).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl, write_recipe
from safetensors.torch import load_file
from tiny import SORT_ROWS

from peftcli.errors import UserError

STEPS = 12


def _recipe(tmp_path: Path, tiny_dir, name: str, **train) -> Path:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, SORT_ROWS * 3)
    recipe = {
        "model": {"name_or_path": str(tiny_dir), "dtype": "float32"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": {"path": str(data), "format": "alpaca"}, "max_seq_len": 128},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 2,
                  "log_every": 3, "eval_every": 0, "save_every": 1, "mixed_precision": "no", **train},
        "output": {"dir": str(tmp_path / name)},
    }
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


def _peft(*args) -> list[str]:
    return [sys.executable, "-m", "peftcli.cli", *map(str, args)]


def _start(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen(_peft("train", recipe), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _logged(run_dir: Path) -> list[tuple[int, float]]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in events if e.get("event") == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    """The uninterrupted run's adapter and logged losses."""
    tmp = tmp_path_factory.mktemp("reference")
    subprocess.run(_peft("train", _recipe(tmp, tiny_dir, "run")), check=True, capture_output=True)
    return {"adapter": _adapter(tmp / "run"), "logged": _logged(tmp / "run")}


def _kill_moments() -> list[int]:
    n = int(os.environ.get("PEFTCLI_KILL_REPEAT", "3"))
    return list(range(n))


@pytest.mark.parametrize("attempt", _kill_moments())
def test_sigkill_at_any_moment_then_resume_is_bit_identical(tmp_path, tiny_dir, reference, attempt):
    rng = random.Random(attempt)
    recipe = _recipe(tmp_path, tiny_dir, "run")
    proc = _start(recipe)
    _wait_for_step(tmp_path / "run", rng.randint(1, STEPS - 3), proc)
    time.sleep(rng.uniform(0.0, 0.3))  # anywhere inside a step: forward, backward, or writing a checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a checkpoint on disk is complete or absent: every one listed loads
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step-*"):
        assert (ckpt / "state.json").is_file() and load_file(ckpt / "adapter" / "adapter_model.safetensors")
    done = subprocess.run(_peft("train", recipe, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed = _adapter(tmp_path / "run")
    assert resumed.keys() == reference["adapter"].keys()
    for k in reference["adapter"]:
        assert torch.equal(resumed[k], reference["adapter"][k]), k
    # each log line once, with the uninterrupted run's losses (those of steps before the kill too)
    assert _logged(tmp_path / "run") == reference["logged"] and [s for s, _ in reference["logged"]] == [3, 6, 9, 12]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_dir, reference, sig):
    recipe = _recipe(tmp_path, tiny_dir, "run", save_every=0, keep_checkpoints=2)  # no periodic checkpoints
    proc = _start(recipe)
    _wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"{signal.Signals(sig).name}: stopped after step") and "--resume" in last
    saved = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and saved[0].name in last
    done = subprocess.run(last.split("Resume with: ")[1].split(), capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    resumed = _adapter(tmp_path / "run")
    assert all(torch.equal(resumed[k], reference["adapter"][k]) for k in reference["adapter"])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000  # the stopped run plotted what it had


def test_keep_checkpoints_keeps_the_last_k(tmp_path, tiny_dir):
    from peftcli.recipe import load_recipe
    from peftcli.trainer import train

    r = load_recipe(_recipe(tmp_path, tiny_dir, "run", max_steps=6, keep_checkpoints=2))
    train(r)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-5", "step-6"]  # the last step too


def test_resume_of_a_finished_run_redoes_nothing(tmp_path, tiny_dir):
    from peftcli.recipe import load_recipe
    from peftcli.trainer import train

    r = load_recipe(_recipe(tmp_path, tiny_dir, "run", max_steps=4, save_every=3))
    train(r)
    before, adapter = (tmp_path / "run" / "metrics.jsonl").read_text(), _adapter(tmp_path / "run")
    done = subprocess.run(_peft("train", tmp_path / "run.yaml", "--resume"), capture_output=True, text=True)
    assert done.returncode == 0 and "resumed from" in done.stderr and "step-4" in done.stderr and "the run was complete" in done.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert all(torch.equal(_adapter(tmp_path / "run")[k], adapter[k]) for k in adapter)


def test_a_new_run_replaces_only_what_peft_wrote(tmp_path, tiny_dir):
    from peftcli.recipe import load_recipe
    from peftcli.trainer import train

    run = tmp_path / "run"
    (run / "checkpoints" / "mine").mkdir(parents=True)
    (run / "checkpoints" / "mine" / "model.ckpt").write_text("keep")
    (run / "checkpoints" / "step-9").mkdir()  # an earlier peft run's checkpoint
    (run / "checkpoints" / "step-9" / "state.json").write_text("{}")
    (run / "checkpoints" / ".step-10.tmp-abc").mkdir()  # and one it was killed while writing
    (run / "notes.txt").write_text("keep")
    recipe = load_recipe(_recipe(tmp_path, tiny_dir, "run", max_steps=2, save_every=0))
    with pytest.raises(UserError, match=r"holds an earlier run \(checkpoints/step-9\); continue it with --resume, "
                                        r"or replace it with --overwrite"):
        train(recipe)
    assert (run / "checkpoints" / "step-9" / "state.json").exists() and (run / "checkpoints" / ".step-10.tmp-abc").exists()
    train(recipe, overwrite=True)
    assert (run / "checkpoints" / "mine" / "model.ckpt").read_text() == "keep" and (run / "notes.txt").read_text() == "keep"
    assert not (run / "checkpoints" / "step-9").exists() and not (run / "checkpoints" / ".step-10.tmp-abc").exists()


@pytest.mark.parametrize("name", ["loss.png", "checkpoints", "adapter", "metrics.jsonl"])
def test_links_in_the_run_dir_are_refused(tmp_path, tiny_dir, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to(outside if name in ("checkpoints", "adapter") else outside / "victim")
    done = subprocess.run(_peft("train", _recipe(tmp_path, tiny_dir, "run", max_steps=1)), capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: output.dir: {tmp_path / 'run' / name} is a symbolic link; peft writes only inside the run dir, "
        "not through links (remove it)"]
    assert list(outside.iterdir()) == []


def test_resume_refuses_a_checkpoint_of_another_base(tmp_path, tiny_dir):
    from tiny import save_tiny

    recipe = _recipe(tmp_path, tiny_dir, "run", max_steps=2)
    subprocess.run(_peft("train", recipe), check=True, capture_output=True)
    other = save_tiny(tmp_path / "other", seed=1)
    done = subprocess.run(_peft("train", recipe, "--resume", "--set", f"model.name_or_path={other}"), capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--resume:" in done.stderr and "different base model" in done.stderr
