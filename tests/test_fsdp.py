"""``train.distributed: fsdp`` (FSDP2, every parameter sharded over 2 CPU processes, gloo) trains what
one process with twice the gradient accumulation trains; its checkpoints resume after a SIGKILL;
``--nnodes`` runs one job from two ``peft train`` commands."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import method_recipe, nudge, random_example, write_recipe
from safetensors.torch import load_file
from tiny import SORT_ROWS, tiny_run_recipe
from zoo import VARIANTS

from peftcli.rundir import read_events

STEPS = 8


def _recipe(tmp_path: Path, tiny_dir) -> str:
    """8 float32 steps of LoRA at a constant lr (so a run's steps do not depend on its length), a
    checkpoint every 2, an eval at step 4 and at the end (under FSDP every process computes it)."""
    lora = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    recipe = tiny_run_recipe(tmp_path, tiny_dir, lora, rows=SORT_ROWS * 2, eval_rows=True, max_steps=STEPS,
                             save_every=2, eval_every=4, scheduler="constant")
    return str(write_recipe(tmp_path / "recipe.yaml", recipe.model_dump(mode="json")))


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}


def _peft(*args) -> list[str]:
    return [sys.executable, "-m", "peftcli.cli", "train", *map(str, args)]


def _train(*args) -> subprocess.CompletedProcess:
    done = subprocess.run(_peft(*args), capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _adapter(run: Path) -> dict:
    return load_file(run / "adapter/adapter_model.safetensors")


def _losses(run: Path) -> list[float]:
    return [e["loss"] for e in read_events(run / "metrics.jsonl") if e.get("event") == "train"]


def _assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    """The reference (1 process, grad_accum 2) and the uninterrupted FSDP run on 2 processes."""
    tmp = tmp_path_factory.mktemp("fsdp")
    recipe = _recipe(tmp, tiny_dir)
    one = _train(recipe, "--set", "train.grad_accum=2", "--output-dir", tmp / "one")
    fsdp = _train(recipe, "--num-processes", "2", "--set", "train.distributed=fsdp", "--output-dir", tmp / "fsdp")
    return {"tmp": tmp, "recipe": recipe, "one": tmp / "one", "fsdp": tmp / "fsdp", "fsdp_stderr": fsdp.stderr,
            "one_stderr": one.stderr}


def test_fsdp_on_two_processes_equals_one_process_with_double_accumulation(runs):
    assert "distributed: fsdp (2 processes, every parameter sharded" in runs["fsdp_stderr"]  # really sharded
    assert "distributed:" not in runs["one_stderr"]
    # per-step losses: float32 reduction order differs (reduce-scatter vs one sum), nothing else
    assert _losses(runs["fsdp"]) == pytest.approx(_losses(runs["one"]), abs=1e-5) and len(_losses(runs["one"])) == STEPS
    sharded, one = _adapter(runs["fsdp"]), _adapter(runs["one"])
    _assert_same_adapter(sharded, one, atol=1e-5)  # the full tensors, gathered: keys and shapes of one process's
    lora_b = [k for k in sharded if "lora_B" in k]
    assert lora_b and all(sharded[k].abs().max() > 1e-3 for k in lora_b)  # trained: never the empty / zero adapter
    # the checkpoint holds the whole optimizer state (AdamW's moments gathered), as one process writes it
    ckpt = torch.load(runs["fsdp"] / "checkpoints/step-4/optimizer.pt", weights_only=True)
    ref = torch.load(runs["one"] / "checkpoints/step-4/optimizer.pt", weights_only=True)
    assert ckpt["state"].keys() == ref["state"].keys()
    for i, state in ref["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ckpt["state"][i][key], state[key], atol=1e-5, rtol=1e-3)
    assert len(torch.load(runs["fsdp"] / "checkpoints/step-4/rng.pt", weights_only=True)["torch"]) == 2  # per process
    evals = {run: [(e["step"], e["eval_loss"]) for e in read_events(runs[run] / "metrics.jsonl") if e.get("event") == "eval"]
             for run in ("fsdp", "one")}
    assert [s for s, _ in evals["fsdp"]] == [4, STEPS]  # during the run and at the end, sharded
    assert [x for _, x in evals["fsdp"]] == pytest.approx([x for _, x in evals["one"]], abs=1e-5)


def test_qlora_under_fsdp_equals_one_process_with_double_accumulation(runs):
    # NF4 base: its packed bytes stored as bfloat16 and sharded like any weight; each Linear4bit
    # keeps its quantisation state (the reference: the same recipe on one process, uint8 storage)
    qlora = ["--set", "method.name=qlora", "--set", "train.max_steps=4", "--set", "train.save_every=0"]
    one = runs["tmp"] / "qlora-one"
    _train(runs["recipe"], *qlora, "--set", "train.grad_accum=2", "--output-dir", one)
    sharded = _train(runs["recipe"], *qlora, "--num-processes", "2", "--set", "train.distributed=fsdp",
                     "--output-dir", runs["tmp"] / "qlora-fsdp")
    assert "distributed: fsdp (2 processes" in sharded.stderr and "base nf4" in sharded.stderr
    assert _losses(runs["tmp"] / "qlora-fsdp") == pytest.approx(_losses(one), abs=1e-5) and len(_losses(one)) == 4
    a = _adapter(runs["tmp"] / "qlora-fsdp")
    _assert_same_adapter(a, _adapter(one), atol=1e-5)
    assert all(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def test_fsdp_killed_with_sigkill_resumes_to_the_uninterrupted_adapter(runs):
    run = runs["tmp"] / "killed"
    proc = subprocess.Popen(_peft(runs["recipe"], "--num-processes", "2", "--set", "train.distributed=fsdp",
                                  "--output-dir", run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and any(e.get("step", 0) >= 3 for e in read_events(run / "metrics.jsonl"))):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "no step 3"
        time.sleep(0.01)
    workers = _children(proc.pid)  # the launcher's workers run in their own sessions: killed one by one
    for pid in [*workers, proc.pid]:  # a machine lost: every process at once, nothing gets to checkpoint
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2
    newest = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert 2 <= newest < STEPS and not (run / "adapter").exists()
    done = _train(run / "recipe.yaml", "--resume", "--num-processes", "2")
    assert f"(step {newest})" in done.stderr
    _assert_same_adapter(_adapter(run), _adapter(runs["fsdp"]), atol=0)  # bit for bit
    assert _losses(run) == _losses(runs["fsdp"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_this_machine_train_what_two_processes_train(runs):
    nodes = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    out = runs["tmp"] / "nodes"
    procs = [subprocess.Popen(_peft(runs["recipe"], *nodes, "--node-rank", str(rank), "--output-dir", out),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for rank in (1, 0)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[1][1][-3000:] + results[0][1][-3000:]
    assert "distributed: ddp (2 processes" in results[1][1]  # node 0's first process reports
    _assert_same_adapter(_adapter(out), _adapter(runs["one"]), atol=1e-5)
    assert _losses(out) == pytest.approx(_losses(runs["one"]), abs=1e-5)


@pytest.mark.parametrize("args, says", [
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"], "--node-rank 2: must be below --nnodes 2"),
    (["--nnodes", "2", "--node-rank", "1"], "--nnodes 2: every node needs --master-addr"),
    (["--num-processes", "2", "--smoke", "--set", "train.distributed=fsdp"], "--smoke with train.distributed: fsdp"),
    (["--master-addr", "127.0.0.1"], "--master-addr 127.0.0.1: only with --nnodes above 1"),
])
def test_bad_launch_flags_are_one_line_exit_2(tmp_path, tiny_dir, args, says):
    done = subprocess.run(_peft(_recipe(tmp_path, tiny_dir), *args), capture_output=True, text=True, env=_env())
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr


def test_an_8bit_base_under_fsdp_is_refused_in_one_line_before_loading(tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, tiny_dir)
    done = subprocess.run(_peft(recipe, "--num-processes", "2", "--set", "train.distributed=fsdp",
                                "--set", "model.quantization=int8"), capture_output=True, text=True, env=_env())
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "train.distributed: fsdp with model.quantization int8" in lines[0], done.stderr


@pytest.mark.parametrize("objective, neftune, says", [
    ("dpo", None, "train.distributed: fsdp with train.objective dpo is not tested yet"),
    ("orpo", None, "train.distributed: fsdp with train.objective orpo is not tested yet"),
    ("sft", 5.0, "train.distributed: fsdp with train.neftune_alpha is not tested yet"),
])
def test_untested_combinations_under_fsdp_are_refused_in_one_line(objective, neftune, says):
    from peftcli import sharding
    from peftcli.errors import UserError

    with pytest.raises(UserError, match=says):
        sharding.check("fsdp", "none", 2, objective, neftune)
    sharding.check("fsdp", "none", 1, objective, neftune)  # one process: nothing is sharded
    sharding.check("ddp", "none", 2, objective, neftune)


# ---------------------------------------------------------------------------------------------
# every method, sharded: the same loss, gradients and saved weights as the whole model


# one variant per kind of method (rslora and pfeiffer shard as lora and houlsby do); both loss paths
# for lora (the reference path is the model's own forward, which the guard falls back to)
CASES = [(variant, "fast-padded") for variant in ("lora", "qlora", "dora", "houlsby", "ia3", "prefix", "prompt", "p_tuning")]
CASES.append(("lora", "reference"))


def _method_check(rank: int, world: int, init: str, model_dir: str, out: str) -> None:
    """One of ``world`` processes: for each of :data:`CASES`, the loss and trainable gradients of
    the sharded model on one batch (the same on every process, so FSDP's average is the
    one-process gradient) against the whole model's, and the gathered file against the whole
    model's. Each process compares its own shard of each gradient (no gathering)."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    from peftcli import data, guard, methods, models, sharding
    from peftcli.loss import SupervisedLoss, supervised_loss_sum

    torch.set_num_threads(1)  # one core each, as the launcher sets OMP_NUM_THREADS (oversubscribed: 10x slower)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    batch = data.collate([random_example(12, 4, seed) for seed in range(3)], pad_id=2)
    found = {}
    for variant, path in CASES:
        v = VARIANTS[variant]
        loss_sum = supervised_loss_sum if path == "fast-padded" else guard.reference_loss_sum
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            # a 4-bit base as peft loads it to shard: NF4, its packed bytes stored as bfloat16
            model = models.load_model(model_dir, "nf4" if v.quantized else "none", quant_storage="bfloat16")
            recipe = method_recipe(v.method["name"], model_dir, **{k: x for k, x in v.method.items() if k != "name"})
            method = methods.get(recipe.method.name)
            method.apply(model, recipe.method)
            nudge(model)  # off the identity start: every trainable parameter gets a gradient
            model.eval()  # no dropout
            loss, n = loss_sum(model, batch)
            (loss / n).backward()
            want = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
            saved = method.state_dict(model)
            model.zero_grad(set_to_none=True)
            root = SupervisedLoss(model, loss_sum)
            sharding.shard(root, model)
            got_loss, got_n = root(batch)
            (got_loss / got_n).backward()
            got = {k: p.grad.to_local() for k, p in model.named_parameters() if p.requires_grad}
            want = {k: distribute_tensor(want[k], p.device_mesh, p.placements, src_data_rank=None).to_local()
                    for k, p in model.named_parameters() if p.requires_grad}
            with sharding.gathered(model):
                gathered = method.state_dict(model)
            sharded = sum(sharding.is_sharded(p) for p in model.parameters())
            grad_diff = max(float((got[k] - want[k]).abs().max()) for k in want)
            file_diff = max(float((gathered[k] - saved[k]).abs().max()) for k in saved)
            found[f"{variant}/{path}"] = {"loss_diff": abs(float(got_loss.detach()) - float(loss.detach())), "grad_diff": grad_diff,
                                          "keys": sorted(got) == sorted(want), "file_diff": file_diff,
                                          "file_keys": sorted(gathered) == sorted(saved),
                                          "sharded": sharded == len(list(model.parameters())),
                                          "seconds": time.perf_counter() - t0}
        except Exception as e:  # recorded: the test names the variant that cannot shard
            found[f"{variant}/{path}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if rank == 0:
        Path(out).write_text(json.dumps(found, indent=1))
    dist.destroy_process_group()


def test_every_method_sharded_gives_the_whole_models_loss_gradients_and_file(tmp_path, tiny_dir):
    import torch.multiprocessing as mp

    out = tmp_path / "found.json"
    mp.start_processes(_method_check, args=(2, str(tmp_path / "init"), str(tiny_dir), str(out)), nprocs=2,
                       start_method="spawn")
    found = json.loads(out.read_text())
    assert len(found) == len(CASES)
    for case, r in found.items():
        assert "error" not in r, (case, r)
        assert r["keys"] and r["file_keys"] and r["sharded"], (case, r)  # every parameter a shard, the file whole
        assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5 and r["file_diff"] == 0, (case, r)


def test_nodes_that_train_different_recipes_or_data_are_refused(tiny_dir, tmp_path, monkeypatch):
    # seen in a trial: node 1 started with --set train.lr=0.5 trained its FSDP shards at that rate and
    # the run finished with a mixed adapter; now every process compares what it trains with process 0
    import torch.distributed as dist

    from peftcli import prepare, trainer
    from peftcli.errors import UserError
    from peftcli.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, tiny_dir))
    prepared = prepare.load(recipe)

    class TwoProcesses:
        num_processes = 2

    def gather(node1_recipe, node1_drops=0):
        def all_gather_object(out, mine):
            out[0] = mine
            theirs = trainer._flat(node1_recipe.model_dump(mode="json"))
            out[1] = {**{k: v for k, v in theirs.items() if not k.startswith("output.")},
                      "train examples": mine["train examples"] - node1_drops, "train tokens": mine["train tokens"]}
        return all_gather_object

    monkeypatch.setattr(dist, "all_gather_object", gather(recipe))
    trainer._check_same_run_everywhere(TwoProcesses(), recipe, prepared)  # the same run: nothing said
    other = recipe.model_copy(deep=True)
    other.train.lr = 0.5
    monkeypatch.setattr(dist, "all_gather_object", gather(other))
    with pytest.raises(UserError, match="process 1 does not train what process 0 trains: train.lr is 0.5 there"):
        trainer._check_same_run_everywhere(TwoProcesses(), recipe, prepared)
    monkeypatch.setattr(dist, "all_gather_object", gather(recipe, node1_drops=1))
    with pytest.raises(UserError, match="train examples is"):
        trainer._check_same_run_everywhere(TwoProcesses(), recipe, prepared)


def test_resume_on_another_number_of_processes_is_refused(tmp_path):
    # a step takes processes x grad_accum micro-batches: resuming on fewer would halve every step from there on
    from types import SimpleNamespace

    from peftcli import trainer
    from peftcli.errors import UserError

    saved = SimpleNamespace(rng=[torch.get_rng_state()] * 2)
    trainer._check_resumed_processes(saved, 2, tmp_path)
    with pytest.raises(UserError, match="written by 2 process.*this run has 1.*resume with --num-processes 2"):
        trainer._check_resumed_processes(saved, 1, tmp_path)
    with pytest.raises(UserError, match="resume with one process"):
        trainer._check_resumed_processes(SimpleNamespace(rng=[torch.get_rng_state()]), 2, tmp_path)
