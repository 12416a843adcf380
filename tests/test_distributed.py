"""Data parallelism: 2 CPU processes (torchrun, gloo) == 1 process with twice the gradient accumulation."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import write_jsonl, write_recipe
from safetensors.torch import load_file
from tiny import SORT_ROWS

from peftcli.rundir import read_events


def _recipe(tmp_path, tiny_dir) -> str:
    data = write_jsonl(tmp_path / "train.jsonl", SORT_ROWS * 2)
    recipe = {
        "model": {"name_or_path": str(tiny_dir), "dtype": "float32"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": {"path": str(data), "format": "alpaca"}, "max_seq_len": 128},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-2, "log_every": 1,
                  "eval_every": 0, "save_every": 2, "mixed_precision": "no"},
        "output": {"dir": str(tmp_path / "unused")},
    }
    return str(write_recipe(tmp_path / "recipe.yaml", recipe))


def _train(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "peftcli.cli", "train", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_equal_one_process_with_double_accumulation(tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, tiny_dir)
    two = _train(recipe, "--num-processes", "2", "--output-dir", str(tmp_path / "two"))
    _train(recipe, "--set", "train.grad_accum=2", "--output-dir", str(tmp_path / "one"))
    assert "distributed: ddp (2 processes" in two.stderr  # really ran data-parallel
    a, b = load_file(tmp_path / "two/adapter/adapter_model.safetensors"), load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert not torch.equal(a[next(k for k in a if "lora_B" in k)], torch.zeros_like(a[next(k for k in a if "lora_B" in k)]))
    loss = lambda run: [e["loss"] for e in read_events(tmp_path / run / "metrics.jsonl") if e.get("event") == "train"]  # noqa: E731
    assert loss("two") == pytest.approx(loss("one"), abs=1e-5)
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert summary["processes"] == 2 and summary["examples_per_step"] == 4
    assert sorted(p.name for p in (tmp_path / "two/checkpoints").iterdir()) == ["step-2", "step-4"]
    assert len(torch.load(tmp_path / "two/checkpoints/step-2/rng.pt", weights_only=True)["torch"]) == 2  # one per process


def test_more_processes_than_gpus_is_a_user_error(monkeypatch):
    # seen on a 1-GPU machine: two processes on cuda:0 died inside NCCL ("Duplicate GPU detected")
    from peftcli import launch
    from peftcli.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="--num-processes 2: only 1 GPU"):
        launch.check_devices(2)
    launch.check_devices(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launch.check_devices(4)  # CPU processes (gloo): any number


def test_a_data_error_in_the_workers_is_one_line_exit_2(tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, tiny_dir)
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "peftcli.cli", "train", recipe, "--num-processes", "2"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.jsonl:2" in lines[0], done.stderr


def _long_run_after_its_first_step(tmp_path, tiny_dir) -> tuple[subprocess.Popen, object]:
    """A 2-process run of (nearly) endless steps, returned once its first step is logged; and its run dir."""
    recipe = _recipe(tmp_path, tiny_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "peftcli.cli", "train", recipe, "--num-processes", "2", "--output-dir", str(run),
                             "--set", "train.max_steps=100000", "--set", "train.save_every=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and '"event": "train"' in (run / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "no step"
        time.sleep(0.05)
    return proc, run


def test_sigterm_to_the_parent_checkpoints_every_process_and_says_how_to_resume(tmp_path, tiny_dir):
    proc, run = _long_run_after_its_first_step(tmp_path, tiny_dir)
    proc.send_signal(signal.SIGTERM)  # to the parent only, as a CI timeout does
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    last = [line for line in stderr.splitlines() if "stopped after step" in line]
    assert len(last) == 1 and "Traceback" not in stderr and "death signal" not in stderr, stderr
    assert last[0].startswith("SIGTERM: stopped after step") and last[0].endswith("--resume --num-processes 2")
    saved = list((run / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and len(torch.load(saved[0] / "rng.pt", weights_only=True)["torch"]) == 2


def test_a_worker_killed_from_outside_is_one_line(tmp_path, tiny_dir):
    # the OOM killer's SIGKILL to one worker: the other stopped on the lost connection with a
    # 128-line gloo traceback and exit 1; now the launcher names the process and the signal
    proc, _ = _long_run_after_its_first_step(tmp_path, tiny_dir)
    workers = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    assert "was killed by SIGKILL" in lines[0] and "--resume" in lines[0]
