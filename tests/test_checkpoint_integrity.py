"""Checkpoint integrity (issue 16, item 3): the sizes and SHA-256 digests in ``state.json``, a
corrupt checkpoint refused in one line naming its file, and ``--resume --skip-corrupt``.

The reference for the recorded digests is ``hashlib`` on the file's bytes; for the resumed run,
the adapter of the same run trained without interruption (tensor for tensor)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl, write_recipe
from safetensors.torch import load_file, save_file
from tiny import SORT_ROWS
from typer.testing import CliRunner

from peftcli import artifacts, rundir
from peftcli.cli import app
from peftcli.errors import UserError
from peftcli.rundir import RunDir

WEIGHTS = "adapter/adapter_model.safetensors"


def _write_adapter(out: Path) -> None:
    out.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"lora_A": torch.randn(4, 32, generator=g), "lora_B": torch.randn(32, 4, generator=g)},
              out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({"r": 4}))


def _save(run: RunDir, step: int) -> Path:
    """A checkpoint as the trainer writes one: adapter dir, AdamW after one step, its schedule, RNG."""
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    param.grad = torch.tensor([0.3, 0.4, -0.1])
    optimizer.step()
    scheduler.step()
    return run.save_checkpoint(step, _write_adapter, optimizer, scheduler, [torch.get_rng_state()],
                               {"epoch": 0, "index": 2 * step}, {"tokens_seen": 10 * step})


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


def _rewrite_state(checkpoint: Path, change) -> None:
    state = _state(checkpoint)
    change(state)
    (checkpoint / "state.json").write_text(json.dumps(state))


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_state_json_records_every_file_with_its_size_and_sha256(tmp_path):
    checkpoint = _save(RunDir(tmp_path), 3)
    files = _state(checkpoint)["files"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"state.json"}
    assert set(files) == {"optimizer.pt", "scheduler.pt", "rng.pt", WEIGHTS, "adapter/adapter_config.json"}
    for rel, record in files.items():  # hashlib on the bytes on disk: an independent reading
        data = (checkpoint / rel).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    RunDir.verify_checkpoint(checkpoint)  # intact: no error
    assert RunDir.read_checkpoint(checkpoint).position == {"epoch": 0, "index": 6}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data, past the header: the file still loads, with another weight
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "optimizer.pt": (_truncate, "truncated"),
    WEIGHTS: (_flip_a_weight_byte, "checksum differs"),
    "rng.pt": (Path.unlink, "missing"),
    "state.json": (lambda p: p.write_text('{"step": 3, "data": {"ep'), "unreadable"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_file_is_refused_in_one_line_naming_it(tmp_path, name):
    checkpoint = _save(RunDir(tmp_path), 3)
    corrupt, what = CORRUPTIONS[name]
    corrupt(checkpoint / name)
    with pytest.raises(UserError) as err:
        RunDir.verify_checkpoint(checkpoint)
    _one_line(err, f"{checkpoint / name}: {what}")


def test_a_flipped_weight_byte_loads_silently_without_the_checksum(tmp_path):
    # why the digest is needed: the same flip passes safetensors' own reading, with a changed tensor
    checkpoint = _save(RunDir(tmp_path), 3)
    before = {k: v.clone() for k, v in load_file(checkpoint / WEIGHTS).items()}  # not views of the mapped file
    _flip_a_weight_byte(checkpoint / WEIGHTS)
    after = load_file(checkpoint / WEIGHTS)
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_state_json_that_is_not_a_checkpoints_state_is_unreadable(tmp_path):
    checkpoint = _save(RunDir(tmp_path), 3)
    _rewrite_state(checkpoint, lambda s: s.update(files={"../../outside": {"bytes": 1, "sha256": "0"}}))
    with pytest.raises(UserError) as err:
        RunDir.verify_checkpoint(checkpoint)
    _one_line(err, f"{checkpoint / 'state.json'}: unreadable")
    (checkpoint / "state.json").write_text("[1, 2]")
    with pytest.raises(UserError) as err:
        RunDir.verify_checkpoint(checkpoint)
    _one_line(err, f"{checkpoint / 'state.json'}: unreadable (not a checkpoint's state")


class _Payload:
    """Unpickling this runs code (it would create the file ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_payload_is_refused_in_one_line_and_not_run(tmp_path):
    checkpoint = _save(RunDir(tmp_path), 3)
    marker = tmp_path / "payload-ran"
    with open(checkpoint / "optimizer.pt", "wb") as f:
        torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, f)
    # a crafted checkpoint with digests to match: the checksums pass, loading must still refuse it
    _rewrite_state(checkpoint, lambda s: s.update(files=rundir._file_sums(checkpoint)))
    RunDir.verify_checkpoint(checkpoint)
    with pytest.raises(UserError) as err:
        RunDir.read_checkpoint(checkpoint)
    _one_line(err, f"{checkpoint / 'optimizer.pt'}: holds a pickled object", "refused")
    assert not marker.exists()


def test_an_old_checkpoint_without_files_still_reads(tmp_path):
    checkpoint = _save(RunDir(tmp_path), 3)
    _rewrite_state(checkpoint, lambda s: s.pop("files"))
    RunDir.verify_checkpoint(checkpoint)  # nothing recorded: accepted as before
    back = RunDir.read_checkpoint(checkpoint)
    assert (back.step, back.position, back.progress) == (3, {"epoch": 0, "index": 6}, {"tokens_seen": 30})
    assert RunDir(tmp_path).resume_point() == checkpoint
    # unchecked, but its loading still fails in one line naming the file
    _truncate(checkpoint / "optimizer.pt")
    with pytest.raises(UserError) as err:
        RunDir.read_checkpoint(checkpoint)
    _one_line(err, f"{checkpoint / 'optimizer.pt'}: not a readable torch file")
    (checkpoint / WEIGHTS).write_bytes(b"\xff" * 8 + b"{}")  # a bad safetensors header
    with pytest.raises(UserError) as err:
        artifacts.read_adapter_weights(back.adapter)
    _one_line(err, f"{checkpoint / WEIGHTS}: cannot read")


def test_resume_point_falls_back_only_when_asked(tmp_path):
    run = RunDir(tmp_path)
    one, two, three = (_save(run, s) for s in (1, 2, 3))
    assert run.resume_point() == three  # all intact: the newest
    _truncate(three / "optimizer.pt")
    with pytest.raises(UserError) as err:
        run.resume_point(skip_corrupt=False)
    message = _one_line(err, f"{three / 'optimizer.pt'}: truncated")
    assert message.endswith("resume from the newest intact checkpoint (step-2) with --resume --skip-corrupt")
    said = []
    assert run.resume_point(skip_corrupt=True, say=said.append) == two
    assert len(said) == 1 and "\n" not in said[0] and "step-3" in said[0] and "skipped 1 corrupt checkpoint " in said[0]
    (two / "rng.pt").unlink()
    said.clear()
    assert run.resume_point(skip_corrupt=True, say=said.append) == one
    assert len(said) == 1 and "skipped 2 corrupt checkpoints" in said[0] and str(two / "rng.pt") in said[0]
    (one / "state.json").write_text("garbled")
    with pytest.raises(UserError) as err:
        run.resume_point(skip_corrupt=False)
    assert _one_line(err, "step-3").endswith(  # step-3's own adapter files still match their digests
        f"no intact checkpoint: {three / 'adapter'} loads and is usable as it is (peft eval, generate, merge); "
        "starting again with --overwrite deletes it (copy it elsewhere first)")
    said.clear()
    assert run.resume_point(skip_corrupt=True, say=said.append) is None
    assert len(said) == 1 and "no intact checkpoint is left" in said[0]
    assert all(p.is_dir() for p in (one, two, three))  # nothing deleted


def test_a_checkpoint_that_lost_its_state_json_is_corrupt_not_absent(tmp_path):
    """A written step-N always has its state.json (it is renamed into place whole): one without
    it was damaged, and --resume stops on it instead of silently going back to an older one."""
    run = RunDir(tmp_path)
    two, three = _save(run, 2), _save(run, 3)
    (three / "state.json").unlink()
    with pytest.raises(UserError) as err:
        run.resume_point()
    assert _one_line(err, f"{three / 'state.json'}: missing").endswith(
        "resume from the newest intact checkpoint (step-2) with --resume --skip-corrupt")
    assert run.resume_point(skip_corrupt=True, say=lambda _: None) == two
    assert run.earlier_work() == ["checkpoints/step-2", "checkpoints/step-3"]  # still work: not replaced unasked


def test_a_torch_write_fault_is_an_oserror_with_its_errno(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux) for a real ENOSPC")
    with pytest.raises(OSError) as err:
        rundir._save_torch({"w": torch.zeros(10_000)}, Path("/dev/full"))
    assert err.value.errno == 28  # ENOSPC, which errors.write_error maps to one line


def test_a_failed_checkpoint_write_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch):
    """The fault names the checkpoint dir (not the temporary sibling it was filling) and leaves
    nothing partial; what is kept is the trainer's to say (tests/test_fault_matrix.py)."""
    run = RunDir(tmp_path)
    first = _save(run, 1)

    def full(obj, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(rundir, "_save_torch", full)
    with pytest.raises(UserError) as err:
        _save(run, 2)
    _one_line(err, f"{run.checkpoint(2)}: cannot write (No space left on device)", "output.dir")
    assert run.checkpoints(complete=False) == [first]  # nothing partial left


# ---------------------------------------------------------------------------------------------
# end to end: `peft train --resume` on a run whose newest checkpoint is corrupt


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_resume_refuses_a_corrupt_checkpoint_and_skip_corrupt_resumes_the_same_run(tmp_path, tiny_dir):
    write_jsonl(tmp_path / "train.jsonl", SORT_ROWS * 2)
    recipe = write_recipe(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_dir), "dtype": "float32"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": {"path": str(tmp_path / "train.jsonl"), "format": "alpaca"}, "max_seq_len": 128},
        "train": {"max_steps": 4, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "log_every": 1,
                  "eval_every": 0, "save_every": 2, "mixed_precision": "no"},
        "output": {"dir": str(tmp_path / "run")},
    })
    runner, run = CliRunner(), RunDir(tmp_path / "run")
    done = runner.invoke(app, ["train", str(recipe)])
    assert done.exit_code == 0, done.output
    uninterrupted = _adapter(run.path)
    older, newest = run.checkpoints()
    assert (older.name, newest.name) == ("step-2", "step-4")
    _truncate(newest / "optimizer.pt")
    shutil.rmtree(run.adapter)  # as after a kill: what the resumed run writes is all that is there

    refused = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    last = refused.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {newest / 'optimizer.pt'}: truncated")
    assert last.endswith("resume from the newest intact checkpoint (step-2) with --resume --skip-corrupt")
    assert not run.adapter.exists() and run.checkpoints() == [older, newest]  # nothing written, nothing deleted

    resumed = runner.invoke(app, ["train", str(recipe), "--resume", "--skip-corrupt"])
    assert resumed.exit_code == 0, resumed.output
    assert "skipped 1 corrupt checkpoint" in resumed.output and f"resumed from {older} (step 2)" in resumed.output
    adapter = _adapter(run.path)
    assert adapter.keys() == uninterrupted.keys()
    for k in uninterrupted:
        assert torch.equal(adapter[k], uninterrupted[k]), k
    RunDir.verify_checkpoint(newest)  # step 4 written again, whole
