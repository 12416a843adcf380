"""Never lose a user's work (issue 16): one writer per run dir, room checked before the first
write, the leftovers of a killed write finished, every write fault one line; and a real full
disk (a small tmpfs) in a slow test where the machine allows ``mount``."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import peft_in_process, write_jsonl
from safetensors.torch import load_file
from tiny import SORT_ROWS, tiny_run_recipe

from peftcli import errors, rundir
from peftcli.errors import UserError, WriteFault
from peftcli.rundir import RunDir
from peftcli.trainer import train

ROOT = Path(__file__).resolve().parent.parent


def _peft(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftcli.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kwargs)


def _files(run: Path) -> dict[Path, bytes]:
    """Every file in ``run`` and its bytes, but the lock (it holds the pid of the last run)."""
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".peft-lock"}


# ---------------------------------------------------------------------------------------------
# one writer per run dir


def test_a_second_train_into_the_same_dir_exits_2_and_a_killed_one_leaves_no_lock(tmp_path, tiny_dir, capsys):
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora"}, max_steps=1)
    path = tmp_path / "recipe.yaml"
    from peftcli.recipe import dump

    path.write_text(dump(recipe))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from peftcli.rundir import RunDir
        with RunDir({str(tmp_path / 'run')!r}).lock():
            print("locked", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, stderr = peft_in_process(["train", path], capsys)
        assert code == 2 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines() == [
            f"error: output.dir {tmp_path / 'run'}: another peft train (pid {holder.pid}) is writing this run dir; "
            "wait for it to finish or choose another output.dir"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    code, stderr = peft_in_process(["train", path], capsys)  # the kernel dropped the killed holder's lock
    assert code == 0, stderr


def test_a_failed_first_run_leaves_no_empty_run_dir(tmp_path, tiny_dir):
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora"}, max_steps=1)
    recipe.data.train.path = str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="missing.jsonl: data file not found"):
        train(recipe)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# checked before the first write


def test_too_little_room_is_refused_before_anything_is_written(tmp_path, tiny_dir, monkeypatch):
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora", "r": 4}, max_steps=4, save_every=1)
    train(recipe)
    run = tmp_path / "run"
    before = _files(run)
    real = shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(UserError) as err:
        train(recipe, overwrite=True)
    message = str(err.value)
    assert message.startswith(f"output.dir {run}: the run needs about ") and "MiB is free there" in message
    assert "train.keep_checkpoints" in message and "\n" not in message
    assert _files(run) == before  # the earlier run is untouched


def test_bytes_needed_counts_the_adapter_and_the_checkpoints_kept_at_once(tmp_path, tiny_dir):
    from peftcli import prepare
    from peftcli.trainer import bytes_needed

    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora", "r": 4}, save_every=2, keep_checkpoints=1)
    p = prepare.load(recipe)
    adapter = 4 * sum(t.numel() for t in p.model.parameters() if t.requires_grad)  # float32
    checkpoint = 3 * adapter + 2**16  # adapter + AdamW's two moments + small states
    assert bytes_needed(p, 10) == int(1.1 * (adapter + 2 * checkpoint + 2**20))  # 5 written, 2 at once (keep 1 + the new)
    recipe.train.keep_checkpoints = None
    assert bytes_needed(p, 10) == int(1.1 * (adapter + 5 * checkpoint + 2**20))
    recipe.train.save_every = 0
    assert bytes_needed(p, 10) == int(1.1 * (adapter + 2**20))


@pytest.mark.parametrize("flags, expect", [
    (["--resume", "--overwrite"], "error: --resume and --overwrite: choose one"),
    (["--skip-corrupt"], "error: --skip-corrupt: only with --resume"),
])
def test_contradictory_flags_are_one_line(tmp_path, tiny_dir, flags, expect):
    from peftcli.recipe import dump

    path = tmp_path / "recipe.yaml"
    path.write_text(dump(tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora"}, max_steps=1)))
    done = _peft("train", path, *flags)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[0].startswith(expect), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_smoke_run_replaces_the_smoke_run_before_it_and_nothing_else(tmp_path, tiny_dir, capsys):
    from peftcli.recipe import dump

    path = tmp_path / "recipe.yaml"
    path.write_text(dump(tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora"}, max_steps=1)))
    assert peft_in_process(["train", path], capsys)[0] == 0  # the real run, in RUN
    real = _files(tmp_path / "run")
    for _ in range(2):  # a CI job run twice: the second replaces the first's RUN-smoke
        code, stderr = peft_in_process(["train", path, "--smoke"], capsys)
        assert code == 0 and "smoke FAIL" not in stderr, stderr
    assert "held an earlier run; its checkpoints, adapter and metrics are replaced" in stderr
    assert _files(tmp_path / "run") == real and (tmp_path / "run-smoke" / "smoke.json").is_file()
    for flags in (["--output-dir", tmp_path / "run"], ["--output-dir", tmp_path / "run", "--resume"]):  # a real run: refused
        code, stderr = peft_in_process(["train", path, "--smoke", *flags], capsys)
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert _files(tmp_path / "run") == real
    assert "--smoke and --resume: a smoke run always starts fresh" in stderr
    shutil.rmtree(tmp_path / "run-smoke")  # a real run that happens to have the -smoke name: not a smoke run's
    shutil.copytree(tmp_path / "run", tmp_path / "run-smoke")
    code, stderr = peft_in_process(["train", path, "--smoke"], capsys)
    assert code == 2 and "holds an earlier run (adapter/)" in stderr, stderr


def test_resume_without_a_checkpoint_does_not_replace_a_finished_adapter(tmp_path, tiny_dir):
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora"}, max_steps=1)  # save_every 0: no checkpoint
    train(recipe)
    before = _files(tmp_path / "run")
    with pytest.raises(UserError, match=r"holds an earlier run \(adapter/\); it has no checkpoint to resume from; its "
                                        r"adapter/ is usable as it is \(peft eval, generate, merge\); replace it with --overwrite"):
        train(recipe, resume=True)
    assert _files(tmp_path / "run") == before


@pytest.mark.parametrize("change, expect", [
    ({"train.lr": 1e-4}, r"--resume: train.lr is 0.0001, but the run in \S+ was trained with 0.01; a resumed run keeps "
                         r"its recipe \(only when to log, evaluate, save and stop may change\)"),
    ({"method.r": 8}, r"--resume: method.r is 8, but the run"),
    ({"train.max_steps": 1}, r"--resume: train.max_steps 1 is below the step of \S+step-2 \(2\); set it to 2 or more"),
    ({"train.max_steps": 4, "train.log_every": 2}, None),  # when to stop and log may change
])
def test_a_resume_keeps_its_recipe_and_a_refused_one_writes_nothing(tmp_path, tiny_dir, change, expect):
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora", "r": 4}, max_steps=2, save_every=1)
    train(recipe)
    before = _files(tmp_path / "run")
    changed = recipe.model_copy(deep=True)
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(changed, section), name, value)
    if expect is None:
        assert train(changed, resume=True).summary["steps"] == 4
        return
    with pytest.raises(UserError, match=expect):
        train(changed, resume=True)
    assert _files(tmp_path / "run") == before


def test_a_checkpoint_that_does_not_fit_is_refused_before_any_write(tmp_path, tiny_dir):
    """Without the run's recipe.yaml to compare with, restoring the checkpoint is the check: it
    runs before recipe.yaml (the command the run prints to resume) is written."""
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora", "r": 4}, max_steps=2, save_every=1)
    train(recipe)
    (tmp_path / "run" / "recipe.yaml").unlink()
    before = _files(tmp_path / "run")
    changed = recipe.model_copy(deep=True)
    changed.method.r = 8
    with pytest.raises(UserError, match=r"lora_A.weight has shape \(4, 64\), the model needs \(8, 64\)"):
        train(changed, resume=True)
    assert _files(tmp_path / "run") == before


def test_no_intact_checkpoint_but_a_finished_adapter_says_it_is_usable(tmp_path, tiny_dir):
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora"}, max_steps=2, save_every=2)
    train(recipe)
    state = tmp_path / "run" / "checkpoints" / "step-2" / "optimizer.pt"
    state.write_bytes(state.read_bytes()[:10])
    with pytest.raises(UserError) as err:
        train(recipe, resume=True)
    run = tmp_path / "run"
    ending = ("loads and is usable as it is (peft eval, generate, merge); starting again with --overwrite deletes it "
              "(copy it elsewhere first)")
    assert str(err.value).endswith(f"no intact checkpoint: {run / 'adapter'} {ending}")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the final adapter cut short: the checkpoint's adapter is still intact
    with pytest.raises(UserError) as err:
        train(recipe, resume=True)
    assert str(err.value).endswith(f"no intact checkpoint: {run / 'checkpoints' / 'step-2' / 'adapter'} {ending}")
    shutil.rmtree(run / "checkpoints" / "step-2" / "adapter")  # nothing usable left: the plain advice
    with pytest.raises(UserError) as err:
        train(recipe, resume=True)
    assert str(err.value).endswith("no intact checkpoint: start again with --overwrite")


# ---------------------------------------------------------------------------------------------
# what a killed write leaves


def test_a_swap_killed_between_its_renames_is_put_back(tmp_path):
    run = RunDir(tmp_path)
    old = tmp_path / ".adapter.old-abc123"  # the previous adapter, renamed aside; the new one never came in
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / ".adapter.tmp-def456").mkdir()  # the new one, partial
    (tmp_path / ".summary.json.tmp").write_text("{")
    (tmp_path / ".mine.tmp").write_text("not peft's")
    assert run.put_back() == ["adapter put back"]
    assert sorted(run.remove_temporaries()) == [".adapter.tmp-def456 deleted", ".summary.json.tmp deleted"]
    assert (run.adapter / "adapter_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.tmp", "adapter"]


# ---------------------------------------------------------------------------------------------
# every kind of write fault is one line


@pytest.mark.parametrize("code, says", [
    (errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
    (errno.EACCES, "Permission denied"), (errno.EISDIR, "Is a directory"), (errno.ENOTDIR, "Not a directory"),
    (errno.EDQUOT, "Disk quota exceeded"),
])
def test_each_write_fault_is_one_line_naming_the_path_and_what_to_do(code, says):
    with pytest.raises(WriteFault) as err:
        with errors.writing("/runs/a/adapter", "output.dir", kept="the newest checkpoint is x"):
            raise OSError(code, os.strerror(code), "/runs/a/.adapter.tmp-1/adapter_model.safetensors")
    assert str(err.value) == (f"/runs/a/adapter: cannot write ({says}); {errors.WRITE_FAULTS[code]} (set output.dir); "
                              "the newest checkpoint is x")
    with pytest.raises(OSError) as err, errors.writing("/x"):  # not a write fault: passes unchanged
        raise OSError(errno.EBADF, "Bad file descriptor")
    assert not isinstance(err.value, WriteFault) and err.value.errno == errno.EBADF


def test_an_output_dir_under_a_file_is_one_line(tmp_path, tiny_dir):
    from peftcli.recipe import dump

    (tmp_path / "afile").write_text("mine")
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora"}, max_steps=1)
    recipe.output.dir = str(tmp_path / "afile" / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(dump(recipe))
    done = _peft("train", path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: {tmp_path / 'afile' / 'run'}: cannot write (") and "Traceback" not in done.stderr
    assert (tmp_path / "afile").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# a real full disk


FILL = """
import sys, torch
from pathlib import Path
from peftcli import cli, rundir

mount = Path(sys.argv[1])
real = rundir.RunDir.save_checkpoint

def save_then_fill(self, step, *args, **kwargs):
    saved = real(self, step, *args, **kwargs)
    if step == 2:  # the disk fills up after the first checkpoint (another job, a log, ...)
        with open(mount / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\\0" * 65536)
                    f.flush()
            except OSError:
                pass
    return saved

rundir.RunDir.save_checkpoint = save_then_fill
sys.argv = ["peft", *sys.argv[2:]]
cli.run()
"""


@pytest.mark.slow
def test_C20_disk_full_on_a_real_tmpfs_keeps_the_work(tmp_path, tiny_dir):
    """A 16 MiB tmpfs fills up after step 2's checkpoint: the run stops with one line (exit 2)
    naming the file, the trained adapter saved in TMPDIR instead (equal to an uninterrupted
    run's) and the checkpoint kept; with the space freed, --resume finishes with that adapter."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("this machine does not allow a private mount namespace (unshare -rm); the in-process fault "
                    "matrix covers the same writes")
    from peftcli.recipe import dump

    mount = tmp_path / "mnt"
    mount.mkdir()
    write_jsonl(tmp_path / "rows.jsonl", SORT_ROWS * 2)

    def recipe(out: Path) -> Path:
        r = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora", "r": 4, "dropout": 0.0}, rows=SORT_ROWS * 2, max_steps=4,
                            save_every=2)
        r.output.dir = str(out)
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(dump(r))
        return path

    assert _peft("train", recipe(tmp_path / "reference")).returncode == 0
    script = tmp_path / "fill.py"
    script.write_text(FILL)
    full = recipe(mount / "run")
    rescue = tmp_path / "rescue"  # TMPDIR: where the steps since the last checkpoint go when the run dir is full
    rescue.mkdir()
    shell = (f"mount -t tmpfs -o size=16m tmpfs {mount} && TMPDIR={rescue} {sys.executable} {script} {mount} train {full}; "
             "echo rc=$?; "
             f"rm -f {mount}/filler && {sys.executable} -m peftcli.cli train {full} --resume; echo rc=$?; "
             f"cp {mount}/run/adapter/adapter_model.safetensors {tmp_path}/resumed.safetensors")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if "mount:" in done.stderr and "rc=" not in done.stdout:
        pytest.skip(f"tmpfs mount refused here: {done.stderr.strip()}")
    errors_seen = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in done.stderr and done.stdout.count("rc=") == 2, done.stderr
    assert done.stdout.splitlines()[0] == "rc=2" and done.stdout.splitlines()[-1] == "rc=0", done.stdout + done.stderr
    assert len(errors_seen) == 1 and "cannot write (No space left on device)" in errors_seen[0], done.stderr
    assert f"the newest checkpoint is {mount}/run/checkpoints/step-2" in errors_seen[0], errors_seen[0]
    rescued = list(rescue.glob("peft-rescued-run-step4-*/adapter"))
    assert len(rescued) == 1 and f"the adapter trained to step 4 is saved instead in {rescued[0]}" in errors_seen[0]
    reference = load_file(tmp_path / "reference/adapter/adapter_model.safetensors")
    for adapter in (load_file(rescued[0] / "adapter_model.safetensors"), load_file(tmp_path / "resumed.safetensors")):
        assert adapter.keys() == reference.keys() and all(torch.equal(adapter[k], reference[k]) for k in reference)
