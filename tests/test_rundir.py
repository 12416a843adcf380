"""The run dir: checkpoint listing, pruning, save/read round trip, layout lookups, metrics log."""

import json

import pytest
import torch

from peftcli.atomic import write_json_atomic
from peftcli.errors import UserError
from peftcli.rundir import RunDir, read_events


def _complete(run: RunDir, step: int):
    d = run.checkpoint(step)
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step}))
    return d


def test_checkpoints_are_listed_by_step_number_and_only_peft_names(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.checkpoints() == [] and run.latest_checkpoint() is None  # no checkpoints/ dir at all
    ten, two = _complete(run, 10), _complete(run, 2)
    (run.checkpoints_dir / "step-5").mkdir()  # no state.json: killed while writing
    (run.checkpoints_dir / ".step-7.tmp-abc").mkdir()  # atomic_dir's temporary
    (run.checkpoints_dir / "mine").mkdir()  # a user's dir
    (run.checkpoints_dir / "step-x").mkdir()  # not a step number
    assert run.checkpoints() == [two, ten]  # 2 before 10: numeric, not by name
    assert run.latest_checkpoint() == ten
    partial = {p.name for p in run.checkpoints(complete=False)}
    assert partial == {"step-2", "step-10", "step-5", ".step-7.tmp-abc"}
    assert RunDir.step_of(ten) == 10


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    run = RunDir(tmp_path)
    for step in (1, 2, 3, 4):
        _complete(run, step)
    (run.checkpoints_dir / "step-9").mkdir()  # partial: not a complete checkpoint, not pruned by count
    run.prune_checkpoints(None)
    assert len(run.checkpoints()) == 4
    run.prune_checkpoints(2)
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-3", "step-4", "step-9"]


def test_remove_earlier_run_keeps_what_peft_did_not_write(tmp_path):
    run = RunDir(tmp_path)
    assert not run.holds_run() and run.earlier_work() == []
    _complete(run, 3)
    (run.checkpoints_dir / ".step-4.old-xyz").mkdir()
    (run.checkpoints_dir / "mine").mkdir()
    run.adapter.mkdir()
    (run.adapter / "adapter_model.safetensors").write_bytes(b"x" * 10)
    run.summary.write_text("{}")
    (tmp_path / "notes.txt").write_text("my notes")
    assert run.holds_run() and run.earlier_work() == ["checkpoints/step-3", "adapter"]
    assert run.bytes_held() >= 12
    run.remove_earlier_run()
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["mine"] and not run.holds_run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "my notes"
    (run.checkpoints_dir / "mine").rmdir()
    _complete(run, 1)
    run.remove_earlier_run()
    assert not run.checkpoints_dir.exists()  # emptied: the dir itself goes too
    run.metrics.write_text("")
    assert run.holds_run() and run.earlier_work() == []  # an earlier run's metrics alone count, but are not work


def test_checkpoint_round_trip(tmp_path):
    run = RunDir(tmp_path)
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    param.grad = torch.tensor([0.3, 0.4])
    optimizer.step()
    scheduler.step()
    rng = [torch.get_rng_state(), torch.manual_seed(5).get_state()]

    def write_adapter(out):
        out.mkdir()
        (out / "weights").write_text("w")

    saved = run.save_checkpoint(7, write_adapter, optimizer, scheduler, rng, {"epoch": 1, "index": 3}, {"tokens_seen": 42})
    assert saved == tmp_path / "checkpoints" / "step-7" and run.latest_checkpoint() == saved
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-7"]  # no temporary left beside it
    back = RunDir.read_checkpoint(saved)
    assert (back.step, back.position, back.progress) == (7, {"epoch": 1, "index": 3}, {"tokens_seen": 42})
    assert (back.adapter / "weights").read_text() == "w"
    assert torch.equal(back.optimizer["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert back.scheduler["last_epoch"] == 1
    assert len(back.rng) == 2 and all(torch.equal(a, b) for a, b in zip(back.rng, rng))


def test_a_failed_checkpoint_leaves_nothing(tmp_path):
    run = RunDir(tmp_path)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def crash(out):
        raise OSError("disk full")

    with pytest.raises(OSError):
        run.save_checkpoint(1, crash, optimizer, optimizer, [torch.get_rng_state()], {"epoch": 0, "index": 0})
    assert run.checkpoints(complete=False) == []


def test_owning_finds_the_run_of_an_adapter_dir(tmp_path):
    assert RunDir.owning(tmp_path / "run" / "adapter").path == tmp_path / "run"
    assert RunDir.owning(tmp_path / "run" / "checkpoints" / "step-4" / "adapter").path == tmp_path / "run"
    assert RunDir.owning(tmp_path / "my-adapter") is None
    assert RunDir.adapter_of(tmp_path / "run" / "checkpoints" / "step-4") == tmp_path / "run" / "checkpoints" / "step-4" / "adapter"


def test_refuse_links_names_the_link(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.refuse_links()  # nothing there yet: fine
    (tmp_path / "elsewhere").mkdir()
    run.adapter.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=f"output.dir: {run.adapter} is a symbolic link"):
        run.refuse_links()


def test_read_events_skips_only_a_torn_last_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"event": "train", "step": 1}\n{"event": "tr')
    assert read_events(f) == [{"event": "train", "step": 1}]
    f.write_text('{"event": "train", "step": 1}\nnot json\n{"event": "eval", "step": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON line"):
        read_events(f)


def test_write_json_atomic_replaces_the_file(tmp_path):
    f = tmp_path / "summary.json"
    f.write_text("old")
    write_json_atomic(f, {"steps": 3})
    assert json.loads(f.read_text()) == {"steps": 3} and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
