"""The training loop, read top to bottom: :func:`train` = :func:`setup` -> :func:`run_steps` ->
:func:`finish`.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch_size`` examples (with
``data.packing``, rows of several examples: :mod:`peftcli.packing`). The loss of
a step is the mean cross-entropy over **all supervised tokens of the step** (each micro-batch
contributes its token sum divided by the step's token count), so micro-batch 2 × accumulation 1
and micro-batch 1 × accumulation 2 give the same gradients. With ``train.objective`` dpo / orpo a
micro-batch is ``micro_batch_size`` preference pairs and the step's loss the mean over its pairs
(:func:`peftcli.preference.accumulate`), the rewards logged beside it. Accelerate provides the device,
mixed-precision autocast and (under ``accelerate launch``) data parallelism.

What the loop builds on lives beside it: the setup path in :mod:`peftcli.prepare`, the loss in
:mod:`peftcli.loss`, the run dir (metrics, checkpoints, atomic writes) in :mod:`peftcli.rundir`.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from peftcli import artifacts, data, guard, methods, packing, precision, preference, prepare, sharding
from peftcli.errors import Interrupted, UserError, WriteFault, write_error, writing
from peftcli.loss import SupervisedLoss, count_supervised, eval_loss, make_collate
from peftcli.neftune import NEFTune
from peftcli.phases import clock
from peftcli.prepare import Prepared
from peftcli.recipe import Recipe, dump
from peftcli.rundir import RunDir, RunLog

# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class TrainResult:
    """What :func:`train` returns: the run dir, its summary (as in ``summary.json``), the trained
    model (eval mode), its tokenizer and the :class:`peftcli.data.Datasets` it trained on."""

    run_dir: Path
    summary: dict
    model: nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    datasets: object = field(repr=False)


def train(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False,
          skip_corrupt: bool = False) -> TrainResult:
    """Train ``recipe`` and write the run dir (recipe.yaml, adapter/, metrics.jsonl, summary.json,
    loss.png, checkpoints/). Returns the run dir, summary and the trained model.

    Nothing is written until everything is checked: the run dir (not locked by another run; an
    earlier run's checkpoints or adapter are replaced only with ``overwrite``), the data, the
    model and method, the loss path, and the free space for the adapter and checkpoints. A
    failed write later (no space, read-only, ...) is one line naming the file and where the
    trained work is kept (:class:`peftcli.errors.WriteFault`); the final adapter is the first
    file written after the last step.

    Under a launcher that starts N processes (``peft train --num-processes N``, torchrun,
    ``accelerate launch``) each optimizer step takes N × ``grad_accum`` micro-batches from the
    same seeded stream, process i the i-th of every N: the same examples per step, and the
    same gradient, as one process with N × ``grad_accum``. Only the first process writes files.

    Raises:
        UserError: bad model/data (from loading), a non-finite loss, the run dir in use or holding
            an earlier run (without ``resume`` / ``overwrite``), too little free space.
        WriteFault: a write failed; the message says what was kept.
        Interrupted: SIGINT/SIGTERM; a checkpoint was written first.
    """
    rundir = RunDir(recipe.output.dir)
    with rundir.lock() if _first_process() else nullcontext():
        run = None
        try:
            run = setup(recipe, resume, console, overwrite, skip_corrupt)
            run_steps(run)
            return finish(run)
        except Exception as exc:
            fault = exc if isinstance(exc, WriteFault) else write_error(exc, None, "output.dir")
            if fault is None:
                raise
            raise fault.keeping(_kept(rundir, run)) from None


@dataclass
class Counters:
    """The loop's running counts; saved in each checkpoint (``state.json`` "progress") so they
    carry over a resume. Times are ``time.perf_counter()`` seconds."""

    t0: float  # when the run started (a resumed run: earlier by the time the run had already taken)
    tokens_seen: int = 0  # real (unpadded) tokens of every step so far, all processes
    last_logged: float | None = None  # the last logged train loss
    pending_losses: list[float] = field(default_factory=list)  # step losses not logged yet
    pending_metrics: list[dict] = field(default_factory=list)  # preference steps' rewards not logged yet
    grad_norm: float | None = None  # the last step's gradient norm before clipping
    window_tokens: int = 0  # tokens since the last log line (for tokens/s)
    window_t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, saved: dict) -> Counters:
        """Counters from a checkpoint's ``progress`` (empty: a fresh run)."""
        return cls(t0=time.perf_counter() - saved.get("elapsed_s", 0.0), tokens_seen=saved.get("tokens_seen", 0),
                   last_logged=saved.get("last_logged"), pending_losses=list(saved.get("pending_losses", [])),
                   pending_metrics=list(saved.get("pending_metrics", [])))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def saved(self) -> dict:
        """What a checkpoint keeps (:meth:`resumed` reads it back)."""
        return {"pending_losses": self.pending_losses, "pending_metrics": self.pending_metrics,
                "last_logged": self.last_logged, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed()}


@dataclass
class Run:
    """What :func:`setup` hands to :func:`run_steps` and :func:`finish`."""

    accelerator: object
    console: object
    rundir: RunDir
    prepared: Prepared
    path: guard.LossPath  # the loss path the run trains and evaluates on
    log: RunLog | None  # metrics.jsonl, opened by setup after the checks (None until then)
    params: list[nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: nn.Module  # the (possibly DDP-wrapped) SupervisedLoss, or PreferenceLoss (train.objective dpo / orpo)
    collate: Callable[[list[dict]], dict]
    stream: MicroBatches
    steps: int  # optimizer steps of the whole run
    start: int  # steps already done (a resumed run)
    counters: Counters
    trained: int = 0  # the last optimizer step done
    adapter_saved: bool = False  # the final adapter/ is written
    final_checkpoint_fault: WriteFault | None = None  # the last step's checkpoint failed; raised after adapter/
    noisy: NEFTune | None = None  # train.neftune_alpha's hooks (removed by finish)

    @property
    def recipe(self) -> Recipe:
        return self.prepared.recipe

    @property
    def preference(self) -> bool:
        """Whether the run tunes on preference pairs (``train.objective`` dpo / orpo)."""
        return self.recipe.train.objective != "sft"

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        """The parameters are sharded across the processes (``train.distributed: fsdp``)."""
        return _sharded(self.recipe, self.world)


# ---------------------------------------------------------------------------------------------
# 1. setup


def setup(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False,
          skip_corrupt: bool = False) -> Run:
    """Everything before the first step: the accelerator, the run dir's state
    (:func:`_earlier_run`), the model with its method (:func:`peftcli.prepare.load`), the loss
    path, the optimizer and schedule, with ``resume`` the checkpoint's state (a checkpoint that
    does not fit the recipe stops here), the free space (:func:`bytes_needed`); only then the
    first writes: an earlier run replaced, ``recipe.yaml``, the metrics log, the trackers.

    Raises:
        UserError: as :func:`train`; ``--resume`` with a checkpoint of another base.
    """
    from rich.console import Console

    t = recipe.train
    accelerator = _accelerator(recipe)
    main = accelerator.is_main_process
    console = (console or Console(stderr=True)) if main else Console(stderr=True, quiet=True)
    rundir = RunDir(recipe.output.dir)
    if main:
        for done in rundir.put_back():  # a swap killed half-way: the complete old file comes back first
            console.print(f"note: a killed run's write: {done}")
    checkpoint, replace = _earlier_run(rundir, resume, overwrite, skip_corrupt, console)
    sharding.check(t.distributed, recipe.model.quantization, accelerator.num_processes, t.objective, t.neftune_alpha)
    if t.distributed == "fsdp" and accelerator.num_processes == 1:
        console.print("note: train.distributed: fsdp on one process has nothing to shard with; it trains as one process "
                      "(peft train --num-processes N shards over N)")
    seed_everything(t.seed)
    prepared = prepare.load(recipe, check_base=partial(_check_resumed_base, checkpoint),
                            sharded=_sharded(recipe, accelerator.num_processes))
    prepare.fit_micro_batch(recipe, prepared.train_units, console.print)
    _check_same_run_everywhere(accelerator, recipe, prepared)
    _check_resumed_recipe(rundir, recipe, checkpoint)
    _print_prepared(console, prepared, accelerator.num_processes, accelerator.distributed_type)
    if recipe.model.quantization == "none":
        prepared.model.to(accelerator.device)  # the check runs where training does (4/8-bit weights are placed at load)
    path = prepare.loss_path(prepared, accelerator.autocast, console)
    console.print(path.describe())
    prepare.store_linear_weights(prepared)  # bf16 under bf16 autocast with model.dtype auto: the same matmuls
    if t.gradient_checkpointing:
        prepare.enable_gradient_checkpointing(prepared.model)
    run = _start_optimizing(accelerator, console, rundir, prepared, path, checkpoint)
    if main:
        _first_writes(rundir, prepared, replace, console)
    run.log = _open_log(rundir, checkpoint, prepared.datasets, main)
    if t.report_to:
        run_name = {"wandb": {"dir": str(rundir.path), "name": rundir.path.name}, "mlflow": {"run_name": rundir.path.name}}
        with writing(rundir.tensorboard, "output.dir"):
            accelerator.init_trackers("peftcli", config=_flat(recipe.model_dump(mode="json")), init_kwargs=run_name)
        run.log.accelerator, run.log.tracker_dir = accelerator, rundir.tensorboard
    return run


def _first_writes(rundir: RunDir, prepared: Prepared, replace: str, console) -> None:
    """Everything is known good: check the free space, replace an earlier run (``replace``: its
    note, "" for none), remove a killed run's temporaries, write ``recipe.yaml`` (after apply,
    which wrote the model's default target_modules into recipe.method: the explicit list).

    Raises:
        UserError: too little free space; WriteFault: a write failed.
    """
    recipe = prepared.recipe
    rundir.check_room(bytes_needed(prepared, total_steps(recipe, prepared.train_units)),
                      freed=rundir.bytes_held() if replace else 0)
    if replace:
        console.print(f"note: {rundir.path} held an earlier run; {replace}")
        rundir.remove_earlier_run()
    for done in rundir.remove_temporaries():
        console.print(f"note: a killed run's temporary: {done}")
    rundir.write_recipe(dump(recipe))


def _accelerator(recipe: Recipe):
    """The run's Accelerator: device, mixed precision, ``train.report_to``'s trackers (local files
    in ``RUN/tensorboard``).

    Raises:
        UserError: a tracker whose package is not installed (accelerate would drop it silently).
    """
    from accelerate import Accelerator
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import ProjectConfiguration

    t, rundir = recipe.train, RunDir(recipe.output.dir)
    available = {str(x) for x in get_available_trackers()}
    missing = [name for name in t.report_to if name not in available]
    if missing:
        raise UserError(f"train.report_to: {', '.join(missing)} needs its Python package, which is not installed "
                        f"(pip install {' '.join(missing)}), or remove it from train.report_to")
    mixed = precision.choose(recipe.model.dtype, t.mixed_precision).autocast  # as prepare.load chooses it
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed,
                       log_with=t.report_to or None,
                       project_config=ProjectConfiguration(project_dir=str(rundir.path), logging_dir=str(rundir.tensorboard)))


def _earlier_run(rundir: RunDir, resume: bool, overwrite: bool, skip_corrupt: bool, console) -> tuple[Path | None, str]:
    """What is in the run dir, read only: the checkpoint to resume from (None: start at step 0)
    and, when a fresh run will replace an earlier one (so ``--resume`` never mixes two runs),
    the note saying what goes ("" when nothing). A corrupt newest checkpoint is refused, or with
    ``skip_corrupt`` passed over (:meth:`RunDir.resume_point`). Deletes nothing: :func:`setup`
    does, once the recipe, data and model are known good.

    Raises:
        UserError: a link in place of a run file; ``resume`` and ``overwrite`` together; an
            earlier run's checkpoints or adapter without ``overwrite`` (names ``--resume`` and
            ``--overwrite``); a corrupt checkpoint; ``skip_corrupt`` without ``resume``.
    """
    rundir.refuse_links()
    if resume and overwrite:
        raise UserError("--resume and --overwrite: choose one (continue the run in output.dir, or replace it)")
    if skip_corrupt and not resume:
        raise UserError("--skip-corrupt: only with --resume (it picks the checkpoint to resume from)")
    checkpoint = rundir.resume_point(skip_corrupt, console.print) if resume else None
    if checkpoint is not None:
        return checkpoint, ""
    work = rundir.earlier_work()
    if work and not overwrite:
        checkpoints = [w for w in work if w != "adapter"]
        shown = ([checkpoints[-1] if len(checkpoints) == 1 else f"{len(checkpoints)} checkpoints up to {checkpoints[-1]}"]
                 if checkpoints else []) + ["adapter/"] * ("adapter" in work)
        shown = " and ".join(shown)
        hint = ("it has no checkpoint to resume from" + ("; its adapter/ is usable as it is (peft eval, generate, merge)"
                                                         if "adapter" in work else "") + "; replace it with --overwrite"
                if resume else "continue it with --resume, or replace it with --overwrite")
        raise UserError(f"output.dir {rundir.path}: holds an earlier run ({shown}); {hint} (or choose another output.dir)")
    if resume:  # killed before its first checkpoint: there is nothing to keep
        console.print(f"note: {rundir.path} has no checkpoint yet (train.save_every writes them); starting from step 0")
    if work:
        return None, "its checkpoints, adapter and metrics are replaced (--overwrite)"
    return None, "its metrics are replaced (it had no checkpoint or adapter)" if rundir.holds_run() else ""


def bytes_needed(prepared: Prepared, steps: int) -> int:
    """Disk bytes a run will write at most: the adapter (the trainable parameters) plus, at the
    peak, the checkpoints kept at once (each the adapter, AdamW's two moments per parameter and
    the small states; one more than ``train.keep_checkpoints`` exists while the newest is
    written), plus 1 MiB for the metrics, summary and plot, and 10% margin."""
    t = prepared.recipe.train
    adapter = sum(p.numel() * p.element_size() for p in prepared.model.parameters() if p.requires_grad)
    checkpoint = 3 * adapter + 2**16
    written = math.ceil(steps / t.save_every) if t.save_every else 0
    at_once = min(written, t.keep_checkpoints + 1) if t.keep_checkpoints else written
    return int(1.1 * (adapter + at_once * checkpoint + 2**20))


def _sharded(recipe: Recipe, world: int) -> bool:
    """Whether the run shards its parameters: ``train.distributed: fsdp`` with several processes
    (one process has nothing to shard with)."""
    return recipe.train.distributed == "fsdp" and world > 1


def _first_process() -> bool:
    """Whether this is the first process (the one that writes), known before the Accelerator is made."""
    return os.environ.get("RANK", "0") == "0"


def _kept(rundir: RunDir, run: Run | None) -> str:
    """What a failed write did not lose, for its message: nothing trained yet (``run`` is None:
    setup failed), the final adapter once written; else the adapter of the steps since the
    newest checkpoint, saved elsewhere (:func:`_rescue`), and the newest checkpoint with how to
    go on from it."""
    if run is None:
        return "nothing was trained yet"
    if run.adapter_saved:
        return f"the trained adapter is saved in {rundir.adapter}"
    checkpoint = rundir.resume_point(skip_corrupt=True, say=lambda _: None)  # the newest intact one
    saved_step = RunDir.step_of(checkpoint) if checkpoint is not None else 0
    rescued = _rescue(run) + "; " if run.trained > saved_step and run.main else ""
    go_on = f"peft train {rundir.recipe} --resume"
    if checkpoint is None:
        return f"{rescued}no checkpoint was written yet ({go_on} starts again)"
    if saved_step >= run.steps:
        return f"the trained adapter is kept in {RunDir.adapter_of(checkpoint)} (finish with: {go_on})"
    return f"{rescued}the newest checkpoint is {checkpoint} (continue with: {go_on})"


def _rescue(run: Run) -> str:
    """The steps trained since the newest checkpoint are not lost to a run dir that cannot be
    written: the adapter as it is now goes to a new dir in the system's temporary dir (``TMPDIR``)
    instead. Returns the line saying where, or that this failed too."""
    if run.sharded:  # gathering needs every process, and they are not all here
        return (f"the adapter trained to step {run.trained} is sharded across the processes and could not be "
                "gathered to be saved elsewhere")
    where = None
    try:
        where = Path(tempfile.mkdtemp(prefix=f"peft-rescued-{run.rundir.path.name}-step{run.trained}-"))
        _write_adapter(run.prepared, where / "adapter")
    except Exception as exc:  # the message being built is the user's: never a second traceback
        if where is not None:
            shutil.rmtree(where, ignore_errors=True)
        return f"the adapter trained to step {run.trained} could not be saved elsewhere either ({tempfile.gettempdir()}: {exc})"
    return f"the adapter trained to step {run.trained} is saved instead in {where / 'adapter'} (peft eval, generate and merge read it)"


# what --resume may change: when to log, evaluate, checkpoint and stop, and memory for speed; the rest
# (method, data, model, optimizer, schedule, seed, micro-batches) is the run's and stays
RESUMABLE = {"train.max_steps", "train.epochs", "train.save_every", "train.keep_checkpoints", "train.log_every",
             "train.eval_every", "train.eval_max_samples", "train.report_to", "train.gradient_checkpointing",
             "train.distributed", "output.dir"}  # distributed: checkpoints hold the whole (gathered) state either way


def _check_resumed_recipe(rundir: RunDir, recipe: Recipe, checkpoint: Path | None) -> None:
    """``--resume`` continues the run as it was trained: the resolved ``recipe`` must equal the
    run dir's ``recipe.yaml`` except in :data:`RESUMABLE` keys, and ``train.max_steps`` cannot go
    below the checkpoint's step (a changed lr or method would otherwise be recorded but not used,
    or used half-way). A run dir without a readable recipe.yaml is not compared.

    Raises:
        UserError: names the first key that differs, both values, and what to do.
    """
    from peftcli.recipe import read_yaml, validate

    if checkpoint is None or not rundir.recipe.is_file():
        return
    try:
        earlier = _flat(validate(read_yaml(rundir.recipe)).model_dump(mode="json"))
    except UserError:
        return
    now = _flat(recipe.model_dump(mode="json"))
    changed = [k for k in sorted(set(earlier) | set(now)) if k not in RESUMABLE and earlier.get(k) != now.get(k)]
    if changed:
        key = changed[0]
        raise UserError(f"--resume: {key} is {now.get(key)!r}, but the run in {rundir.path} was trained with "
                        f"{earlier.get(key)!r}; a resumed run keeps its recipe (only when to log, evaluate, save and stop "
                        "may change): drop the change, or train it as a new run in another output.dir")
    step = RunDir.step_of(checkpoint)
    if recipe.train.max_steps is not None and recipe.train.max_steps < step:
        raise UserError(f"--resume: train.max_steps {recipe.train.max_steps} is below the step of {checkpoint} ({step}); "
                        f"set it to {step} or more")


def _check_resumed_base(checkpoint: Path | None, model: nn.Module) -> None:
    """``--resume``: the checkpoint must have been trained on this base (``model``, before the method).

    Raises:
        UserError: its recorded base fingerprint differs from the base's.
    """
    if checkpoint is not None:
        recorded = artifacts.recorded_fingerprint(artifacts.read_adapter_config(RunDir.adapter_of(checkpoint)))
        artifacts.check_base(recorded, model, f"--resume: {checkpoint}")


def _print_prepared(console, p: Prepared, world: int, distributed_type) -> None:
    """The method, parameter, precision and data lines (and the process count when there are several)."""
    targets, s, t = p.targets, p.datasets.train_stats, p.recipe.train
    console.print(f"[bold]{p.recipe.method.name}[/] on {', '.join(targets[:2])}{', ...' if len(targets) > 2 else ''} "
                  f"({len(targets)} module{'s' * (len(targets) != 1)}): trainable parameters {p.trainable:,} = "
                  f"{100 * p.trainable / p.base_params:.3f}% of the base's {p.base_params:,} ({methods.kinds_line(p.model)})")
    for line in p.precision.lines():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"data: {s.describe()}, eval on {len(p.eval_examples)} examples", highlight=False, soft_wrap=True)
    for line in p.datasets.mixing:
        console.print(line, highlight=False, markup=False)
    if p.packing:
        console.print(p.packing.describe())
    if world > 1:
        how = ("every parameter sharded across them per decoder block (FSDP2)" if _sharded(p.recipe, world)
               else f"the whole model in each, gradients averaged (DDP, {distributed_type})")
        console.print(f"distributed: {t.distributed} ({world} processes, {how}); "
                      f"{world * t.grad_accum} micro-batches per step")


def _open_log(rundir: RunDir, checkpoint: Path | None, ds: data.Datasets, main: bool) -> RunLog:
    """``metrics.jsonl``: kept up to a resumed checkpoint's step, else started with the data event."""
    log = RunLog(rundir.metrics, upto_step=None if checkpoint is None else RunDir.step_of(checkpoint), enabled=main)
    if checkpoint is None:
        log.write({"event": "data", "train": vars(ds.train_stats), "eval": vars(ds.eval_stats) if ds.eval_stats else None,
                   "mixing": ds.mixing})
    return log


def _start_optimizing(accelerator, console, rundir: RunDir, prepared: Prepared, path: guard.LossPath,
                      checkpoint: Path | None) -> Run:
    """Optimizer (one AdamW group per method group, :func:`lr_groups`), schedule, NEFTune's hooks
    (``train.neftune_alpha``), the loss module wrapped for several processes (DDP by the
    accelerator, or sharded: :func:`peftcli.sharding.shard`, before the optimizer is built on the
    sharded parameters), the checkpoint's state when resuming (its adapter loaded before
    sharding), the data stream and the collate function."""
    recipe, model, train_set = prepared.recipe, prepared.model, prepared.datasets.train
    t = recipe.train
    saved = RunDir.read_checkpoint(checkpoint) if checkpoint is not None else None
    if saved is not None:
        _check_resumed_processes(saved, accelerator.num_processes, checkpoint)
        prepared.method.load_state_dict(model, artifacts.read_adapter_weights(saved.adapter))
    loss_fn = _loss_module(model, recipe, path)
    noisy = None
    if t.neftune_alpha:  # on the training forward only: the hooks act inside loss_fn's calls, in training mode
        noisy = NEFTune(t.neftune_alpha).attach(loss_fn, model.get_input_embeddings())
        console.print(f"NEFTune: input embeddings + U(-1, 1)·{t.neftune_alpha:g}/√(L·d) while training "
                      f"(L each example's length, d {model.get_input_embeddings().embedding_dim})")
    sharded = _sharded(recipe, accelerator.num_processes)
    if sharded:
        sharding.shard(loss_fn, model)
    groups = lr_groups(prepared)  # after sharding: the sharded parameters
    params = [p for _, group in groups for p in group]
    optimizer = make_optimizer(groups, recipe)
    if len(groups) > 1:
        console.print("learning rates: " + ", ".join(f"{t.lr * scale:.2e} for {len(g)} tensors" for scale, g in groups)
                      + " (the method's groups), each on the schedule")
    steps = total_steps(recipe, prepared.train_units)
    scheduler = make_scheduler(optimizer, recipe, steps)
    if sharded:
        optimizer = accelerator.prepare(optimizer)
    else:
        loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)
    start, position, done = 0, {"epoch": 0, "index": 0}, {}
    if saved is not None:
        start, position, done = _restore(saved, optimizer, scheduler, accelerator.process_index, sharded)
        console.print(f"resumed from {checkpoint} (step {start})" + (" — the run was complete" if start >= steps else ""))
    rows = prepared.packing.rows if prepared.packing else None
    stream = MicroBatches(train_set, t.micro_batch_size, t.seed, **position, rows=rows)
    model.train()
    collate = make_collate(path.padding_free, prepared.tokenizer.pad_token_id, recipe.data.pad_to_multiple_of)
    shape = "padding-free rows (no padding computed)" if path.padding_free else "right-padded rows"
    if t.objective != "sft":
        collate = partial(preference.collate_pairs, pad_id=prepared.tokenizer.pad_token_id,
                          multiple_of=recipe.data.pad_to_multiple_of)
        shape = (f"{t.micro_batch_size} preference pair{'s' * (t.micro_batch_size != 1)} each, chosen and rejected as "
                 f"right-padded rows; {_objective_line(recipe)}")
    if rows:
        shape = f"{t.micro_batch_size} packed row{'s' * (t.micro_batch_size != 1)} each, as {shape}"
    console.print(f"micro-batches: {shape}")
    return Run(accelerator, console, rundir, prepared, path, None, params, optimizer, scheduler, loss_fn, collate, stream,
               steps, start, Counters.resumed(done), noisy=noisy)  # counters carry over a resume; the log comes next


def lr_groups(prepared: Prepared) -> list[tuple[float, list[nn.Parameter]]]:
    """The method's optimizer groups (:meth:`peftcli.methods.Method.lr_groups`: (learning rate as
    a multiple of ``train.lr``, parameters)), empty ones left out.

    Raises:
        RuntimeError: the groups do not hold every trainable parameter exactly once (a method's bug).
    """
    groups = [(scale, group) for scale, group in prepared.method.lr_groups(prepared.model, prepared.recipe.method) if group]
    grouped = sorted(id(p) for _, group in groups for p in group)
    if grouped != sorted(id(p) for p in prepared.model.parameters() if p.requires_grad):
        raise RuntimeError(f"method {prepared.recipe.method.name}: lr_groups does not hold each trainable parameter once")
    return groups


def _loss_module(model: nn.Module, recipe: Recipe, path: guard.LossPath) -> nn.Module:
    """The module the steps call: :class:`peftcli.loss.SupervisedLoss` on the chosen path, or for
    ``train.objective`` dpo / orpo a :class:`peftcli.preference.PreferenceLoss` (the model's own
    logits where the guard chose the reference path)."""
    t = recipe.train
    if t.objective == "sft":
        return SupervisedLoss(model, path.loss_sum)
    return preference.loss_for(model, t, own_forward=path.name == "reference")


def _objective_line(recipe: Recipe) -> str:
    """What a preference run optimises, in words, for the banner."""
    t = recipe.train
    if t.objective == "dpo":
        return f"DPO, beta {t.beta}, reference: the base with the method switched off"
    return f"ORPO, lambda {t.orpo_lambda}, no reference model"


def _check_resumed_processes(saved, processes: int, checkpoint: Path) -> None:
    """A step takes ``processes × grad_accum`` micro-batches, so resuming on another number of
    processes would train a different run from there on (smaller or larger steps, the data order
    shifted) under the same recipe. The checkpoint holds one RNG state per process that wrote it.

    Raises:
        UserError: the number of processes differs from the checkpoint's.
    """
    wrote = len(saved.rng)
    if wrote != processes:
        flag = f"--num-processes {wrote}" if wrote > 1 else "one process (no --num-processes)"
        raise UserError(f"--resume: {checkpoint} was written by {wrote} process(es) and this run has {processes}: each "
                        f"step would take {processes} × train.grad_accum micro-batches instead of {wrote} ×; resume with "
                        f"{flag} (in all, over every node)")


def _restore(saved, optimizer, scheduler, rank: int = 0, sharded: bool = False) -> tuple[int, dict, dict]:
    """Load the optimizer (sharded: this process's shards of the saved full state), scheduler and
    this process's RNG state from a checkpoint (:meth:`RunDir.read_checkpoint`; its adapter is
    loaded by :func:`_start_optimizing`); returns its step, data position ({"epoch", "index"})
    and the loop's counters (:meth:`Counters.saved`; empty for checkpoints written before they
    were kept)."""
    if sharded:
        sharding.load_optimizer_state(optimizer, saved.optimizer)
    else:
        optimizer.load_state_dict(saved.optimizer)
    scheduler.load_state_dict(saved.scheduler)
    torch.set_rng_state(saved.rng[rank])  # one state per process: _check_resumed_processes came first
    return saved.step, saved.position, saved.progress


# ---------------------------------------------------------------------------------------------
# 2. the steps


def run_steps(run: Run) -> None:
    """Optimizer steps ``run.start + 1`` .. ``run.steps``: log every ``train.log_every``, evaluate
    every ``train.eval_every``, checkpoint every ``train.save_every`` and at the last step.

    Raises:
        UserError: a non-finite loss (the last checkpoint is kept).
        Interrupted: SIGINT/SIGTERM reached any process; a checkpoint was written first.
    """
    t = run.recipe.train
    progress = _progress(run.console, run.steps, run.start)
    with progress, StopSignals() as stop:
        task = progress.add_task("train", total=run.steps, completed=run.start, loss="-", lr="-", tps="-", eta="-:--:--")
        stepping_since = time.perf_counter()  # the estimate: this session's mean step time, from its first step
        for step in range(run.start + 1, run.steps + 1):
            lr = _optimizer_step(run, step)
            run.trained = step
            logged = _log_train(run, step, lr) if step % t.log_every == 0 or step == run.steps else None
            if ((run.main or run.sharded) and run.prepared.eval_examples and t.eval_every and step % t.eval_every == 0
                    and step != run.steps):  # sharded: every process computes it, the first logs it
                _log_eval(run, step, progress.console)
            stopping = _any_process(run.accelerator, stop.signum is not None)
            # the last step too, so --resume on a finished run has nothing to redo
            if stopping or (t.save_every and (step % t.save_every == 0 or step == run.steps)):
                try:
                    _checkpoint(run, step, (stop.signum or signal.SIGTERM) if stopping else None)
                except WriteFault as fault:
                    if step != run.steps or stopping:
                        raise
                    run.final_checkpoint_fault = fault  # the adapter (smaller) is still written; raised after it
            c = run.counters  # lr, tokens/s and time left from the first step on, loss at each log
            per_step = (time.perf_counter() - stepping_since) / (step - run.start)
            shown = {"lr": f"{lr:.2e}", "eta": clock(per_step * (run.steps - step))}
            if logged is not None:  # the step's logged numbers, drawn with the step itself
                shown.update(loss=f"{logged['loss']:.4f}", tps=f"{logged['tokens_per_s']:.0f}")
            elif c.window_tokens:  # tokens/s of the steps since the last log line
                shown["tps"] = f"{c.window_tokens / max(time.perf_counter() - c.window_t0, 1e-9):.0f}"
            progress.update(task, completed=step, refresh=True, **shown)  # drawn each step (a step is ms or more)


def _optimizer_step(run: Run, step: int) -> float:
    """One optimizer step over this process's share of the step's micro-batches; returns the
    learning rate it used.

    Raises:
        UserError: the step's loss is not finite.
    """
    t, train_set, acc = run.recipe.train, run.prepared.datasets.train, run.accelerator
    world, rank = acc.num_processes, acc.process_index
    drawn = [run.stream.next() for _ in range(world * t.grad_accum)]  # every process draws the same
    micro = [run.collate([train_set[i] for i in idx]) for idx in drawn[rank::world]]
    if run.preference:
        totals = preference.accumulate(run.loss_fn, micro, acc.device, acc.autocast, acc.backward, acc)
        loss = totals.mean_loss(t.objective)
        run.counters.pending_metrics.append(totals.metrics(t.objective))
    else:
        loss, _ = accumulate_gradients(run.loss_fn, micro, acc.device, acc.autocast, acc.backward, acc)
    # real tokens, all processes (a preference pair: its chosen and rejected sequences)
    step_tokens = sum(len(train_set[i]["input_ids"]) + len(train_set[i].get("rejected_input_ids", ())) for idx in drawn for i in idx)
    run.counters.window_tokens += step_tokens
    run.counters.tokens_seen += step_tokens
    if not math.isfinite(loss):
        if run.main:
            run.rundir.plot_loss(run.log.events)
        raise UserError(f"train: loss is {loss} at step {step}; lower train.lr or check the data (last checkpoint kept)")
    # the L2 norm of all trainable gradients before clipping (an infinite bound clips nothing)
    run.counters.grad_norm = float(sharding.full(acc.clip_grad_norm_(run.params, t.max_grad_norm or float("inf"))))
    lr = run.scheduler.get_last_lr()[0]  # the rate this step used (the first group: train.lr scaled)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.counters.pending_losses.append(loss)
    return lr


def _log_train(run: Run, step: int, lr: float) -> dict:
    """The train event: the mean loss of the steps since the last one, this step's lr and
    gradient norm (L2 over all trainable parameters, before clipping), tokens/s; written to the
    log and printed as one line (on a terminal, above the progress bar). Returns the event."""
    c = run.counters
    dt = time.perf_counter() - c.window_t0
    event = {"event": "train", "step": step, "loss": sum(c.pending_losses) / len(c.pending_losses),
             "lr": lr, "grad_norm": c.grad_norm, "tokens_per_s": c.window_tokens / max(dt, 1e-9),
             "epoch": run.stream.epoch, "elapsed_s": c.elapsed()}
    rewards = ""
    if c.pending_metrics:  # a preference run: the rewards, means over the steps since the last line
        event.update({k: sum(m[k] for m in c.pending_metrics) / len(c.pending_metrics)
                      for k in c.pending_metrics[0] if k != "loss"})
        rewards = (f"  rewards chosen {event['rewards/chosen']:.3f} rejected {event['rewards/rejected']:.3f} "
                   f"margin {event['rewards/margins']:.3f} accuracy {event['rewards/accuracy']:.2f}")
    run.log.write(event)
    c.last_logged = event["loss"]
    run.console.print(f"step {step}/{run.steps}  loss {event['loss']:.4f}{rewards}  lr {event['lr']:.2e}  "
                      f"{event['tokens_per_s']:.0f} tok/s")
    c.pending_losses, c.pending_metrics, c.window_tokens, c.window_t0 = [], [], 0, time.perf_counter()
    return event


def _evaluate(run: Run) -> dict:
    """Eval loss/perplexity on the run's eval examples, on its loss path (:func:`peftcli.loss.eval_loss`).
    Eval is never packed: micro-batches of ``micro_batch_size`` examples, or with ``data.packing``
    as many as that many packed rows hold on average (the loss is the same for any grouping)."""
    p, size = run.prepared, run.recipe.train.micro_batch_size
    if run.preference:  # held-out preference loss and accuracy (:func:`peftcli.preference.eval_preference`)
        return preference.eval_preference(run.loss_fn.module if hasattr(run.loss_fn, "module") else run.loss_fn,
                                          p.eval_examples, run.collate, size, run.accelerator.autocast)
    if p.packing:
        size = max(1, round(size * p.packing.examples / len(p.packing.rows)))
    if run.sharded:  # every process, through the root FSDP unit (the loss module), which gathers the weights
        return eval_loss(run.loss_fn, p.eval_examples, run.collate, size, run.accelerator.autocast, _call)
    return eval_loss(p.model, p.eval_examples, run.collate, size, run.accelerator.autocast, run.path.loss_sum)


def _eval_line(ev: dict) -> str:
    """An eval event in words: loss and perplexity, or a preference eval's loss and accuracies."""
    if "eval_accuracy" in ev:
        return (f"eval loss {ev['eval_loss']:.4f}  accuracy {ev['eval_accuracy']:.3f} (chosen reward above rejected)  "
                f"logp accuracy {ev['eval_logp_accuracy']:.3f}  margin {ev['eval_margin']:.3f}")
    return f"eval loss {ev['eval_loss']:.4f}  ppl {ev['eval_ppl']:.2f}"


def _call(loss_module: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """The loss module's (summed loss, supervised tokens) of a batch: the ``loss_sum`` of a sharded eval."""
    return loss_module(batch)


def _log_eval(run: Run, step: int, console) -> None:
    ev = _evaluate(run)
    run.log.write({"event": "eval", "step": step, **ev})
    console.print(f"step {step}: {_eval_line(ev)}")


def _write_adapter(p: Prepared, out_dir: Path) -> Path:
    return artifacts.save_adapter(out_dir, p.model, p.recipe, p.base_path, p.fingerprint)


def _whole(run: Run):
    """A context in which the model's trainable parameters are whole tensors: sharded, each
    process gathers them (:func:`peftcli.sharding.gathered`, a collective: every process enters);
    else nothing to do."""
    return sharding.gathered(run.prepared.model) if run.sharded else nullcontext()


def _checkpoint(run: Run, step: int, signum: int | None) -> None:
    """``checkpoints/step-N`` (the first process writes it, every process's RNG state in it; the
    others wait), older ones pruned to ``train.keep_checkpoints``.

    Raises:
        Interrupted: ``signum`` is set (a signal asked the run to stop), after the checkpoint.
    """
    rng = [torch.get_rng_state()]  # dropout draws from torch's RNG only
    if run.world > 1:
        from accelerate.utils import gather_object

        rng = gather_object(rng)
    saved = run.rundir.checkpoint(step)
    with _whole(run):  # sharded: the adapter and optimizer state gathered (every process), as one process saves them
        optimizer = sharding.full_optimizer_state(run.optimizer) if run.sharded else run.optimizer
        if run.main:
            run.rundir.save_checkpoint(step, partial(_write_adapter, run.prepared), optimizer, run.scheduler, rng,
                                       run.stream.position, run.counters.saved())
    run.accelerator.wait_for_everyone()
    if run.main:
        run.rundir.prune_checkpoints(run.recipe.train.keep_checkpoints)
    if signum is None:
        return
    if run.main:
        run.rundir.plot_loss(run.log.events)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", run.world))  # processes on this node (set by the launcher)
    procs = f" --num-processes {local}" if local > 1 else ""
    if run.world > local:
        procs += f" --nnodes {run.world // local} (on every node, with its --node-rank and --master-addr)"
    raise Interrupted(f"{signal.Signals(signum).name}: stopped after step {step}/{run.steps}; checkpoint {saved}. "
                      f"Resume with: peft train {run.rundir.recipe} --resume{procs}", signum)


# ---------------------------------------------------------------------------------------------
# 3. finish


def finish(run: Run) -> TrainResult:
    """The run's files (first process): ``adapter/`` first (sharded: gathered from every
    process), then the final eval, ``summary.json`` and ``loss.png``; then the trained model in
    eval mode (sharded: each process's shards).

    Raises:
        WriteFault: a write failed (the last step's checkpoint included), after the adapter was
            written if it could be.
    """
    summary = _summary(run)
    with _whole(run):
        if run.main:
            with writing(run.rundir.adapter, "output.dir"):
                summary["adapter_dir"] = str(_write_adapter(run.prepared, run.rundir.adapter))
            run.adapter_saved = True
    if run.main or run.sharded:
        _write_outputs(run, summary)
    run.accelerator.wait_for_everyone()
    if run.final_checkpoint_fault is not None:
        raise run.final_checkpoint_fault  # train() adds that the adapter is saved
    if run.recipe.train.report_to:
        with writing(run.rundir.tensorboard, "output.dir"):
            run.accelerator.end_training()
    p = run.prepared
    if run.noisy is not None:
        run.noisy.detach()  # the returned model embeds without noise in any mode
    p.model.eval()
    return TrainResult(run.rundir.path, summary, p.model, p.tokenizer, p.datasets)


def _summary(run: Run) -> dict:
    """``summary.json``'s fields known once the steps are done (the final eval is added to them).
    With ``data.packing``, ``packing`` holds the packed rows' counts and the rows per step, and
    ``examples_per_step`` is the mean over the packed rows."""
    p, t = run.prepared, run.recipe.train
    s = p.datasets.train_stats
    per_step = t.micro_batch_size * t.grad_accum * run.world
    packed = None
    if p.packing:
        packed = {**p.packing.as_json(), "rows_per_step": per_step}
        per_step = round(per_step * p.packing.examples / len(p.packing.rows), 2)
    return {"method": run.recipe.method.name, "objective": t.objective, "steps": run.steps, "examples_per_step": per_step,
            "processes": run.world, "final_train_loss": run.counters.last_logged,
            "trainable_params": p.trainable, "base_params": p.base_params,
            "trainable_pct_of_base": 100 * p.trainable / p.base_params,
            "train_examples": len(p.datasets.train), "mixing": p.datasets.mixing, "dropped_rows": s.dropped_rows(),
            "train_data": vars(s),
            "mixed_precision": p.mixed, "precision": p.precision.as_json(), "padding_free": run.path.padding_free,
            "packing": packed, "loss_path": run.path.as_json(),
            "device": str(run.accelerator.device), "tokens_seen": run.counters.tokens_seen, "wall_s": run.counters.elapsed(),
            "cuda_peak_memory_gib": _cuda_peak_gib(run.accelerator.device), "distributed": run.recipe.train.distributed,
            **_per_process(run)}


def _per_process(run: Run) -> dict[str, list]:
    """Each process's memory, in process order (a collective with several processes), GiB:
    ``peak_rss_gib`` (the peak so far: ``getrusage`` ``ru_maxrss``, KiB on Linux), ``rss_gib``
    (resident now, after the steps: ``VmRSS`` of ``/proc/self/status``; None where there is
    none) and ``cuda_peak_memory_gib_per_process`` (:func:`_cuda_peak_gib`; None off CUDA)."""
    import resource

    now = None
    if Path("/proc/self/status").is_file():
        now = next((int(line.split()[1]) / 2**20 for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:")), None)
    mine = [(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, now, _cuda_peak_gib(run.accelerator.device))]
    if run.world > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    return {"peak_rss_gib": [m[0] for m in mine], "rss_gib": [m[1] for m in mine],
            "cuda_peak_memory_gib_per_process": [m[2] for m in mine]}


def _cuda_peak_gib(device: torch.device) -> float | None:
    """The CUDA allocator's peak on ``device`` since the process started, GiB
    (``torch.cuda.max_memory_allocated``); None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _write_outputs(run: Run, summary: dict) -> None:
    """After adapter/ (written first by :func:`finish`: a failure after it keeps the trained
    weights): the final eval (unless a finished run resumed has it already; sharded, every
    process computes it), then on the first process summary.json, loss.png."""
    if run.prepared.eval_examples:
        final = [e for e in run.log.events if e.get("event") == "eval" and e.get("step") == run.steps]
        if final:
            ev = {k: v for k, v in final[-1].items() if k not in ("event", "step")}
        else:
            ev = _evaluate(run)
            run.log.write({"event": "eval", "step": run.steps, **ev})
        summary.update(ev)
        run.console.print(f"final {_eval_line(ev)}")
    if not run.main:
        return
    run.rundir.write_summary(summary)
    run.rundir.plot_loss(run.log.events)
    run.console.print(f"wrote {run.rundir.path}/ (adapter/, metrics.jsonl, summary.json, loss.png) in {summary['wall_s']:.1f}s")


# ---------------------------------------------------------------------------------------------
# the parts of a step


def accumulate_gradients(model: nn.Module, micro_batches: list[dict], device, autocast=nullcontext,
                         backward=torch.Tensor.backward, accelerator=None) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step.

    Each micro-batch's summed loss is divided by the supervised-token count of the whole step
    (over all processes), so the accumulated gradient is that of the mean over all the step's
    supervised tokens — independent of how the examples are split into micro-batches, padded
    (CASES C8) or spread over processes.

    Args:
        model: a causal LM, or a (possibly DDP-wrapped) :class:`peftcli.loss.SupervisedLoss`.
        accelerator: with several processes, sums the token counts and losses across them and
            skips gradient sync until the last micro-batch; DDP averages gradients over the N
            processes, so each loss is scaled by N to keep the sum.
    Returns:
        (mean loss per supervised token of the step, supervised token count), over all processes.
    """
    loss_fn = model if isinstance(getattr(model, "module", model), SupervisedLoss) else SupervisedLoss(model)
    world = accelerator.num_processes if accelerator is not None else 1
    n_step = sum(count_supervised(mb) for mb in micro_batches)
    if world > 1:
        n_step = int(accelerator.reduce(torch.tensor(n_step, device=accelerator.device), "sum"))
    total = torch.zeros((), dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(device) for k, v in mb.items()}
        sync = nullcontext() if world == 1 or i == len(micro_batches) - 1 else accelerator.no_sync(loss_fn)
        with sync:
            with autocast():
                loss_sum, _ = loss_fn(mb)
            backward(loss_sum * world / max(n_step, 1))
        total += float(loss_sum.detach())
    if world > 1:
        total = accelerator.reduce(total.to(accelerator.device), "sum").cpu()
    return float(total) / max(n_step, 1), n_step


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's RNGs (the adapter's initialisation and dropout draw from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(recipe: Recipe, n_units: int) -> int:
    """Optimizer steps: ``max_steps``, else ``epochs`` (default 1) passes over the train set of
    ``n_units`` examples (packed rows with ``data.packing``: :attr:`peftcli.prepare.Prepared.train_units`)."""
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    per_epoch = math.ceil(n_units / t.micro_batch_size) / t.grad_accum
    return max(1, math.ceil((t.epochs or 1.0) * per_epoch))


def lr_factor(step: int, schedule: str, warmup: int, steps: int) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based): linear warmup from 0 over
    ``warmup`` steps, then constant, linear decay to 0, or half a cosine to 0 (Loshchilov & Hutter
    2017, SGDR, eq. 5 without restarts) at ``steps`` — the values of transformers'
    ``constant_with_warmup`` / ``linear`` / ``cosine`` schedules."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(groups: list[torch.nn.Parameter] | list[tuple[float, list[torch.nn.Parameter]]],
                   recipe: Recipe) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (Loshchilov & Hutter 2019, Algorithm 2) with the recipe's
    lr and weight decay; moments float32 like the parameters.

    ``groups``: the parameters (one group at ``train.lr``), or (multiple of ``train.lr``,
    parameters) pairs (:func:`lr_groups`): one AdamW parameter group each, at that learning rate,
    all with the recipe's weight decay (LoRA+ changes the rates only). The schedule multiplies
    every group's rate by the same factor (:func:`make_scheduler`).

    torch's fused implementation (one kernel over all tensors) where the parameters' device has
    it (CPU, CUDA): the per-tensor loop costs ~46 ms per step for LoRA's 420 tensors on this
    project's 2-core CPU, fused ~12 ms; the update is the same formula.
    """
    t = recipe.train
    if groups and isinstance(groups[0], torch.Tensor):
        groups = [(1.0, groups)]
    params = [p for _, group in groups for p in group]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW([{"params": group, "lr": t.lr * scale} for scale, group in groups], lr=t.lr,
                             weight_decay=t.weight_decay, fused=fused or None)


def make_scheduler(optimizer, recipe: Recipe, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule (:func:`lr_factor`) as a ``LambdaLR`` (its state_dict is the step count)."""
    t = recipe.train
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t.scheduler, t.warmup_steps, steps))


class MicroBatches:
    """Endless seeded stream of micro-batch example-index lists; ``position`` = (epoch, index) to
    resume. With ``rows`` (packed rows of example indices, :class:`peftcli.packing.Packing`) a
    micro-batch is ``micro_batch_size`` rows (:func:`peftcli.packing.micro_batches`), else
    ``micro_batch_size`` examples (:func:`peftcli.data.batches`); either order is drawn from
    ``seed + epoch`` alone, so a position names the same micro-batches in a resumed run."""

    def __init__(self, examples: list[dict], micro_batch_size: int, seed: int, epoch: int = 0, index: int = 0,
                 rows: list[list[int]] | None = None):
        self.examples, self.mbs, self.seed, self.rows = examples, micro_batch_size, seed, rows
        self.epoch, self.index = epoch, index
        self._order = self._epoch(epoch)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self.rows is not None:
            return packing.micro_batches(self.rows, self.mbs, self.seed, epoch)
        return data.batches(self.examples, self.mbs, self.seed, epoch)

    def next(self) -> list[int]:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch(self.epoch)
        batch = self._order[self.index]
        self.index += 1
        return batch

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


class StopSignals:
    """SIGINT/SIGTERM while training: note the signal and let the current step finish; the loop
    then writes a checkpoint and stops (:class:`peftcli.errors.Interrupted`). A second signal
    stops at once (default behaviour). Only installed in the main thread."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():  # the next signal acts immediately
            signal.signal(sig, handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ---------------------------------------------------------------------------------------------
# helpers


def _any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (a signal may reach only some)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "sum") > 0)


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists and None as strings (tracker hparams)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _check_same_run_everywhere(accelerator, recipe: Recipe, prepared: Prepared) -> None:
    """With several processes (on several nodes, each started by its own command), every process
    must train the same recipe on the same examples: under FSDP each updates its own shard with
    its own settings, under DDP each its own copy, and either way the saved adapter would mix
    them with nothing said. Compared: the recipe (all but ``output``, which only the first
    process writes) and the train examples' count and token count.

    Raises:
        UserError: one line naming the first process that differs from process 0, and how.
    """
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    train_set = prepared.datasets.train
    mine = {k: v for k, v in _flat(recipe.model_dump(mode="json")).items() if not k.startswith("output.")}
    mine["train examples"] = len(train_set)
    mine["train tokens"] = sum(len(e["input_ids"]) for e in train_set)
    everyone: list = [None] * accelerator.num_processes
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone[1:], start=1):
        differ = sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
        if differ:
            k = differ[0]
            raise UserError(f"process {rank} does not train what process 0 trains: {k} is {theirs.get(k)!r} there and "
                            f"{everyone[0].get(k)!r} on process 0 ({len(differ)} difference(s)); every node must run the "
                            "same recipe, --set overrides and data")


def _progress(console, steps: int, start: int):
    """The terminal's step bar: step N/M, loss, lr, tokens/s, time elapsed and the estimated time
    left (this session's mean step time × steps left, shown from the first step; rich's own
    estimate needs two steps). Off when the console is not a terminal (the log lines stand)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
        TimeElapsedColumn(), TextColumn("left {task.fields[eta]}"), console=console, disable=not console.is_terminal,
    )
