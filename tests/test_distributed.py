"""Data parallelism: 2 CPU processes (torchrun, gloo) == 1 process with twice the gradient accumulation."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import SORT_ROWS

from peftcli.trainer import read_events


def _recipe(tmp_path, tiny_dir) -> str:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SORT_ROWS * 2))
    recipe = {
        "model": {"name_or_path": str(tiny_dir)},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": {"path": str(data), "format": "alpaca"}, "max_seq_len": 128},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-2, "log_every": 1,
                  "eval_every": 0, "save_every": 2, "mixed_precision": "no"},
        "output": {"dir": str(tmp_path / "unused")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _train(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "peftcli.cli", "train", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_equal_one_process_with_double_accumulation(tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, tiny_dir)
    two = _train(recipe, "--num-processes", "2", "--output-dir", str(tmp_path / "two"))
    _train(recipe, "--set", "train.grad_accum=2", "--output-dir", str(tmp_path / "one"))
    assert "processes: 2" in two.stderr  # really ran data-parallel
    a, b = load_file(tmp_path / "two/adapter/adapter_model.safetensors"), load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert not torch.equal(a[next(k for k in a if "lora_B" in k)], torch.zeros_like(a[next(k for k in a if "lora_B" in k)]))
    loss = lambda run: [e["loss"] for e in read_events(tmp_path / run / "metrics.jsonl") if e.get("event") == "train"]  # noqa: E731
    assert loss("two") == pytest.approx(loss("one"), abs=1e-5)
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert summary["processes"] == 2 and summary["examples_per_step"] == 4
    assert sorted(p.name for p in (tmp_path / "two/checkpoints").iterdir()) == ["step-2"]
    assert len(torch.load(tmp_path / "two/checkpoints/step-2/rng.pt", weights_only=True)["torch"]) == 2  # one per process


def test_more_processes_than_gpus_is_a_user_error(monkeypatch):
    # seen on a 1-GPU machine: two processes on cuda:0 died inside NCCL ("Duplicate GPU detected")
    from peftcli import cli
    from peftcli.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="--num-processes 2: only 1 GPU"):
        cli._check_devices(2)
    cli._check_devices(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli._check_devices(4)  # CPU processes (gloo): any number
