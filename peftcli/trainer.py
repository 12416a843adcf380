"""The training loop, read top to bottom: setup, loop, checkpoint, artifacts.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch_size`` examples. The loss of
a step is the mean cross-entropy over **all supervised tokens of the step** (each micro-batch
contributes its token sum divided by the step's token count), so micro-batch 2 × accumulation 1
and micro-batch 1 × accumulation 2 give the same gradients. Accelerate provides the device,
mixed-precision autocast and (under ``accelerate launch``) data parallelism.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftcli import artifacts, data, guard, methods, models, varlen
from peftcli.data import IGNORE_INDEX
from peftcli.errors import Interrupted, UserError
from peftcli.recipe import Recipe, dump

# ---------------------------------------------------------------------------------------------
# loss


def supervised_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the supervised positions of a batch.

    Runs the transformer body once, then the output head only at positions whose next token is
    supervised (labels != -100): never a full (B, T, vocab) logits tensor.

    Args:
        batch: input_ids, labels and either attention_mask (padded rows, :func:`peftcli.data.collate`)
            or position_ids (padding-free rows, :func:`peftcli.data.collate_padding_free`), each
            (B, T); labels[i] is the target of token i (unshifted, Hugging Face convention).
    Returns:
        (loss_sum, n) — a scalar float32 tensor (nats) and the number of supervised tokens.
    """
    body = models.decoder_body(model)
    # use_cache=False: no KV cache to build, and transformers detects padding-free rows (restarting
    # position_ids, no attention_mask) only when there is no cache
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                  position_ids=batch.get("position_ids"), use_cache=False,
                  **_per_example_attention(model, batch)).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    n = int(mask.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][mask]  # (n, H)
    return head_cross_entropy(model.get_output_embeddings(), h, targets[mask]), n


LOSS_CHUNK = 256  # supervised positions per block of logits: 256 x vocab 49,152 float32 = 48 MiB


def head_cross_entropy(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the output head's logits at the given positions, never holding more
    than :data:`LOSS_CHUNK` positions' logits.

    Args:
        head: the output Linear (vocab, hidden), frozen, no bias, for the chunked path; any other
            head gets the plain formula.
        h: (n, hidden) hidden states; targets: (n,) token ids.
    Returns:
        a float32 scalar (nats). With gradients on, the gradient of h is computed block by block
        in this same pass (:class:`ChunkedHeadCrossEntropy`), so the (n, vocab) logits and their
        gradient never exist at once.
    """
    frozen = isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad
    if not frozen:
        return F.cross_entropy(head(h).float(), targets, reduction="sum")
    if torch.is_grad_enabled() and h.requires_grad:
        return ChunkedHeadCrossEntropy.apply(h, head.weight, targets)
    return sum(F.cross_entropy(F.linear(hc, head.weight).float(), tc, reduction="sum")
               for hc, tc in zip(h.split(LOSS_CHUNK), targets.split(LOSS_CHUNK)))


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(W h_i, t_i) with its gradient in h computed in the forward pass, block by block.

    For a frozen head W (vocab, hidden) the loss's only gradient is dL/dh_i = (softmax(W h_i) -
    onehot(t_i)) W — the same product backward would form from the full logits. Computing it per
    block of :data:`LOSS_CHUNK` positions while the block's logits are at hand keeps at most one
    block of (positions, vocab) float32 logits alive, instead of the logits, their log-softmax and
    their gradient for all n positions (the fused linear cross-entropy of Hsu et al. 2024, Liger
    Kernel). The matmuls run under the caller's autocast like ``F.linear`` would.

    forward(h (n, hidden), weight (vocab, hidden), targets (n,)) -> float32 scalar; backward
    returns dL/dh scaled by the incoming gradient, in h's dtype.
    """

    @staticmethod
    def forward(ctx, h, weight, targets):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        for start in range(0, h.shape[0], LOSS_CHUNK):
            hc, tc = h[start:start + LOSS_CHUNK], targets[start:start + LOSS_CHUNK]
            logits = F.linear(hc, weight)  # (chunk, vocab), bf16 under autocast
            logp = torch.log_softmax(logits.float(), dim=-1)
            total += -logp.gather(1, tc[:, None]).sum()
            grad = logp.exp_()  # softmax
            grad[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
            grad_h[start:start + LOSS_CHUNK] = (grad.to(logits.dtype) @ weight.to(logits.dtype)).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None


def _per_example_attention(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    """``{"example_bounds": [...]}`` for a padding-free row when the model uses
    :mod:`peftcli.varlen` attention (see :func:`prepare_padding_free`), else {}."""
    if batch.get("attention_mask") is not None or batch.get("position_ids") is None:
        return {}
    if getattr(model.config, "_attn_implementation", None) != varlen.NAME:
        return {}
    bounds = varlen.example_bounds(batch["position_ids"])
    return {"example_bounds": bounds} if bounds else {}


def count_supervised(batch: dict[str, torch.Tensor]) -> int:
    """Supervised next-token targets in a batch: labels[:, 1:] != -100."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class SupervisedLoss(nn.Module):
    """The training forward as a module: ``forward(batch) -> (loss_sum, n)`` of ``loss_sum``
    (:func:`supervised_loss_sum`, or the path :func:`peftcli.guard.choose_loss_path` chose).
    Accelerate wraps *this* for data parallelism, so DDP sees the call that uses the trainable
    parameters."""

    def __init__(self, model: nn.Module, loss_sum=supervised_loss_sum):
        super().__init__()
        self.model, self.loss_sum = model, loss_sum

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self.loss_sum(self.model, batch)


def accumulate_gradients(model: nn.Module, micro_batches: list[dict], device, autocast=nullcontext,
                         backward=torch.Tensor.backward, accelerator=None) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step.

    Each micro-batch's summed loss is divided by the supervised-token count of the whole step
    (over all processes), so the accumulated gradient is that of the mean over all the step's
    supervised tokens — independent of how the examples are split into micro-batches, padded
    (CASES C8) or spread over processes.

    Args:
        model: a causal LM, or a (possibly DDP-wrapped) :class:`SupervisedLoss`.
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


@torch.no_grad()
def keeps_examples_apart(model: nn.Module) -> bool:
    """Whether this model keeps attention within each example of a padding-free row.

    transformers builds the block-diagonal mask from restarting ``position_ids`` in its shared
    mask code; a model class that does not use it would attend across examples. Checked on
    two 3-token sequences: the second one's hidden states, packed after the first, must equal
    those of the sequence alone (to 1e-3, which any cross-example attention far exceeds)."""
    body = models.decoder_body(model)
    was_training = model.training
    model.eval()
    device = _device(model)
    first, second = torch.tensor([[5, 6, 7]], device=device), torch.tensor([[8, 9, 10]], device=device)
    row = {"input_ids": torch.cat([first, second], 1), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)}
    packed = body(**row, use_cache=False, **_per_example_attention(model, row)).last_hidden_state[:, 3:]
    alone = {"input_ids": second, "position_ids": torch.tensor([[0, 1, 2]], device=device)}
    alone = body(**alone, use_cache=False, **_per_example_attention(model, alone)).last_hidden_state
    model.train(was_training)
    return bool(torch.allclose(packed.float(), alone.float(), atol=1e-3, rtol=1e-3))


def prepare_padding_free(model: nn.Module) -> bool:
    """Ready a model for padding-free rows; returns whether it can take them.

    A model on transformers' ``sdpa`` attention is switched to per-example attention
    (:mod:`peftcli.varlen`: one causal attention call per example instead of a block-diagonal mask
    over the row); then :func:`keeps_examples_apart` checks that the model really does."""
    varlen.use_varlen_attention(model)
    return keeps_examples_apart(model)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_loss_path(model: nn.Module, recipe: Recipe, method, examples: list[dict], pad_id: int, mixed: str,
                     autocast=None, console=None) -> guard.LossPath:
    """The loss path this run trains and evaluates on, proven on its first micro-batch
    (:func:`peftcli.guard.choose_loss_path`): padding-free rows where the recipe
    (``data.padding_free``), the method and the model allow them, else right-padded rows.

    Args:
        examples: the tokenized train examples; mixed: the resolved mixed precision.
        autocast: the run's autocast context factory (default: torch.autocast for ``mixed`` on
            the model's device, or none).
    """
    dtype = AUTOCAST_DTYPES.get(mixed)
    if autocast is None:
        device = _device(model).type
        autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else nullcontext
    padding_free = recipe.data.padding_free and method.PADDING_FREE
    if padding_free and not prepare_padding_free(model):
        if console is not None:
            console.print("note: this model class attends across examples in a padding-free row; using padded rows")
        padding_free = False
    t = recipe.train
    first = [examples[i] for i in data.batches(examples, t.micro_batch_size, t.seed, 0)[0]]
    return guard.choose_loss_path(model, first, pad_id, padding_free, autocast, dtype)


def make_collate(padding_free: bool, pad_id: int, multiple_of: int = 1):
    """The micro-batch builder: :func:`peftcli.data.collate_padding_free` or right-padded rows
    (:func:`peftcli.data.collate`), lengths rounded up to ``multiple_of``."""
    if padding_free:
        return lambda examples: data.collate_padding_free(examples, multiple_of, pad_id)
    return lambda examples: data.collate(examples, pad_id, multiple_of)


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[dict], collate, micro_batch_size: int, autocast,
              loss_sum=supervised_loss_sum) -> dict:
    """Mean loss per supervised token (nats) and perplexity over tokenized examples.

    ``collate`` builds a micro-batch from a list of examples (see :func:`make_collate`);
    ``loss_sum`` is the loss path (:meth:`peftcli.guard.LossPath.loss_sum`)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), micro_batch_size):
        batch = collate(examples[i:i + micro_batch_size])
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        with autocast():
            s, k = loss_sum(model, batch)
        total, n = total + float(s), n + k
    model.train(was_training)
    loss = total / max(n, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": n}


def _device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# setup helpers


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count 2 values per byte."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 and hasattr(p, "quant_state") else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def enable_gradient_checkpointing(model: nn.Module, reentrant: bool = False) -> None:
    """Recompute block activations in the backward pass (transformers' activation checkpointing).

    With a frozen base, no input of a checkpointed block requires grad, and reentrant
    checkpointing would then drop the adapter's gradients silently (CASES C6); making the input
    embeddings' output require grad keeps them, for either flavour and whether the method was
    applied before or after this call. (Recent transformers do this themselves for the reentrant
    flavour; doing it here too keeps the guarantee independent of the version.)
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 matmuls (AVX512-BF16 / AMX), where autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` -> bf16 where the device has fast bfloat16 (CUDA with bf16, or such a CPU), else no."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "no"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(recipe: Recipe, n_examples: int) -> int:
    """Optimizer steps: ``max_steps``, else ``epochs`` (default 1) passes over the train set."""
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    per_epoch = math.ceil(n_examples / t.micro_batch_size) / t.grad_accum
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


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.AdamW:
    """AdamW over the trainable ``params`` (Loshchilov & Hutter 2019, Algorithm 2) with the recipe's
    lr and weight decay; moments float32 like the parameters.

    torch's fused implementation (one kernel over all tensors) where the parameters' device has
    it (CPU, CUDA): the per-tensor loop costs ~46 ms per step for LoRA's 420 tensors on this
    project's 2-core CPU, fused ~12 ms; the update is the same formula.
    """
    t = recipe.train
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


def make_scheduler(optimizer, recipe: Recipe, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule (:func:`lr_factor`) as a ``LambdaLR`` (its state_dict is the step count)."""
    t = recipe.train
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t.scheduler, t.warmup_steps, steps))


class MicroBatches:
    """Endless seeded stream of micro-batch index lists; ``position`` = (epoch, index) to resume."""

    def __init__(self, examples: list[dict], micro_batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        self.examples, self.mbs, self.seed = examples, micro_batch_size, seed
        self.epoch, self.index = epoch, index
        self._order = data.batches(examples, micro_batch_size, seed, epoch)

    def next(self) -> list[int]:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = data.batches(self.examples, self.mbs, self.seed, self.epoch)
        batch = self._order[self.index]
        self.index += 1
        return batch

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


# ---------------------------------------------------------------------------------------------
# run-dir writing


class RunLog:
    """Appends one JSON object per event to ``metrics.jsonl``.

    ``upto_step``: keep the file's events up to that step (a resumed run drops what the
    interrupted run logged after its checkpoint); None starts an empty file. ``enabled=False``
    (processes other than the first) writes nothing.
    """

    def __init__(self, path: Path, upto_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.accelerator = None  # set to an Accelerator with trackers to mirror train/eval events
        self.events = [] if upto_step is None or not path.exists() else [
            e for e in read_events(path) if e.get("step", 0) <= upto_step]
        if enabled:
            path.write_text("".join(json.dumps(e) + "\n" for e in self.events), encoding="utf-8")

    def write(self, event: dict) -> None:
        self.events.append(event)
        if not self.enabled:  # a process other than the first keeps events in memory only
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        if self.accelerator is not None and event.get("event") in ("train", "eval"):
            kind = event["event"]
            values = {f"{kind}/{k}": v for k, v in event.items() if k not in ("event", "step") and isinstance(v, (int, float))}
            self.accelerator.log(values, step=event["step"])


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON through a temporary file + fsync + rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_loss(events: list[dict], path: Path) -> None:
    """``loss.png``: train and eval loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train"]
    evals = [(e["step"], e["eval_loss"]) for e in events if e.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per supervised token (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_checkpoint(run_dir: Path, step: int, model, recipe, base_path, fp, optimizer, scheduler, stream: MicroBatches,
                    accelerator=None, progress: dict | None = None) -> Path:
    """``checkpoints/step-N/``: adapter, optimizer, scheduler, RNG state (of every process),
    data position and ``progress`` (the loop's counters: losses not logged yet, tokens seen,
    elapsed seconds) — written by the first process through :func:`peftcli.artifacts.atomic_dir`,
    so a checkpoint on disk is never partial; the others wait for it."""
    final = run_dir / "checkpoints" / f"step-{step}"
    rng = [torch.get_rng_state()]  # dropout draws from torch's RNG only
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rng = gather_object(rng)
    if accelerator is None or accelerator.is_main_process:
        with artifacts.atomic_dir(final) as tmp:
            artifacts.save_adapter(tmp / "adapter", model, recipe, base_path, fp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"torch": rng}, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "data": stream.position, "progress": progress or {}}))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


def checkpoints(run_dir: Path, complete: bool = True) -> list[Path]:
    """The complete ``checkpoints/step-N`` dirs, oldest first; with ``complete=False`` also the
    partial ones (a temporary ``.step-N.tmp-*`` or ``.step-N.old-*`` left by a kill) — only
    names peft writes, never other files a user keeps in ``checkpoints/``."""
    found = []
    for p in (run_dir / "checkpoints").glob("*step-*"):
        name = p.name.removeprefix("step-")
        if name.isdigit() and (p / "state.json").is_file():
            found.append((int(name), p))
        elif not complete and (name.isdigit() or re.fullmatch(r"\.step-\d+\.(tmp|old)-.+", p.name)):
            found.append((-1, p))
    return [p for _, p in sorted(found)]


RUN_FILES = ("recipe.yaml", "metrics.jsonl", "summary.json", "loss.png", "adapter", "checkpoints", "tensorboard")


def refuse_links(run_dir: Path) -> None:
    """peft writes only inside the run dir: a symbolic link in place of one of its files or dirs
    (which would send the write elsewhere) is refused. The run dir itself may be a link.

    Raises:
        UserError: names the link.
    """
    for name in RUN_FILES:
        if (run_dir / name).is_symlink():
            raise UserError(f"output.dir: {run_dir / name} is a symbolic link; peft writes only inside the run dir, "
                            "not through links (remove it)")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest complete ``checkpoints/step-N`` dir, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoints (None keeps all). The newest is written
    (atomically) before any older one is removed, so a complete checkpoint always exists."""
    if keep:
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


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
# the recipe


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    model: nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    datasets: object = field(repr=False)


def train(recipe: Recipe, resume: bool = False, console=None) -> TrainResult:
    """Train ``recipe`` and write the run dir (recipe.yaml, adapter/, metrics.jsonl, summary.json,
    loss.png, checkpoints/). Returns the run dir, summary and the trained model.

    Under a launcher that starts N processes (``peft train --num-processes N``, torchrun,
    ``accelerate launch``) each optimizer step takes N × ``grad_accum`` micro-batches from the
    same seeded stream, process i the i-th of every N: the same examples per step, and the
    same gradient, as one process with N × ``grad_accum``. Only the first process writes files.

    Raises:
        UserError: bad model/data (from loading), a non-finite loss.
        Interrupted: SIGINT/SIGTERM; a checkpoint was written first.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from rich.console import Console

    t = recipe.train
    run_dir = Path(recipe.output.dir)
    mixed = resolve_mixed_precision(t.mixed_precision)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed, log_with=t.report_to or None,
                              project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")))
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    console = console or Console(stderr=True)
    if not main:
        console = Console(stderr=True, quiet=True)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:  # killed before its first checkpoint: there is nothing to keep
        console.print(f"note: {run_dir} has no checkpoint yet (train.save_every writes them); starting from step 0")
        resume = False
    if main:
        refuse_links(run_dir)
    if main and not resume and ((run_dir / "metrics.jsonl").exists() or checkpoints(run_dir, complete=False)):
        # a fresh run replaces an earlier one in the same dir, so --resume never mixes two runs
        console.print(f"note: {run_dir} held an earlier run; its metrics and checkpoints are replaced")
        for old in checkpoints(run_dir, complete=False):
            shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            (run_dir / "checkpoints").rmdir()  # only when nothing else is in it
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)  # recipe.yaml is written once data, model and method are known good
    seed_everything(t.seed)

    # 1. data first (the tokenizer is enough), so a bad file is reported before the model loads
    m = recipe.model
    base_path = models.resolve(m.name_or_path)
    tok = models.load_tokenizer(base_path, m.trust_remote_code)
    ds = data.build(recipe.data, tok, t.seed)
    s = ds.train_stats
    eval_examples = ds.eval[: t.eval_max_samples] if t.eval_max_samples else ds.eval

    # 2. model + method
    model = models.load_model(base_path, m.quantization, m.dtype, m.double_quant, m.trust_remote_code)
    tok = models.fit_tokenizer(tok, model)
    fp = models.fingerprint(model)
    if checkpoint is not None:
        recorded = artifacts.read_adapter_config(checkpoint / "adapter").get("peftcli", {}).get("base_fingerprint")
        if recorded and recorded != fp:
            raise UserError(f"--resume: {checkpoint} was trained on a different base model "
                            f"(fingerprint {recorded}, this base has {fp})")
    method = methods.get(recipe.method.name)
    targets = method.apply(model, recipe.method)
    if main:  # after apply, which wrote the model's default target_modules into recipe.method: the explicit list
        (run_dir / "recipe.yaml").write_text(dump(recipe), encoding="utf-8")
    trainable, total = parameter_counts(model)
    base_params = total - trainable  # the frozen base; the method's parameters are the trainable ones
    console.print(f"[bold]{recipe.method.name}[/] on {', '.join(targets[:2])}{', ...' if len(targets) > 2 else ''} "
                  f"({len(targets)} module{'s' * (len(targets) != 1)}): trainable parameters {trainable:,} = "
                  f"{100 * trainable / base_params:.3f}% of the base's {base_params:,} ({methods.kinds_line(model)})")
    console.print(f"data: {s.kept} train examples ({s.dropped_empty_answer} empty answers and "
                  f"{s.dropped_truncated} over-long prompts dropped), eval on {len(eval_examples)} examples")
    if world > 1:
        console.print(f"processes: {world} ({accelerator.distributed_type}); {world * t.grad_accum} micro-batches per step")
    if m.quantization == "none":
        model.to(accelerator.device)  # the check runs where training does (4/8-bit weights are placed at load)
    path = choose_loss_path(model, recipe, method, ds.train, tok.pad_token_id, mixed, accelerator.autocast, console)
    console.print(path.describe())
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    log = RunLog(run_dir / "metrics.jsonl", upto_step=_checkpoint_step(checkpoint), enabled=main)
    if checkpoint is None:
        log.write({"event": "data", "train": vars(ds.train_stats), "eval": vars(ds.eval_stats) if ds.eval_stats else None})

    # 3. optimizer, schedule, accelerator (which wraps the loss module for data parallelism)
    if t.report_to:
        accelerator.init_trackers("peftcli", config=_flat(recipe.model_dump(mode="json")))
        log.accelerator = accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, recipe)
    steps = total_steps(recipe, len(ds.train))
    scheduler = make_scheduler(optimizer, recipe, steps)
    loss_fn, optimizer = accelerator.prepare(SupervisedLoss(model, path.loss_sum), optimizer)
    start, position, done = 0, {"epoch": 0, "index": 0}, {}
    if checkpoint is not None:
        start, position, done = _restore(checkpoint, model, method, optimizer, scheduler, rank)
        console.print(f"resumed from {checkpoint} (step {start})" + (" — the run was complete" if start >= steps else ""))
    stream = MicroBatches(ds.train, t.micro_batch_size, t.seed, **position)

    # 4. loop
    model.train()
    device = accelerator.device
    padding_free = path.padding_free
    collate = make_collate(padding_free, tok.pad_token_id, recipe.data.pad_to_multiple_of)
    console.print(f"micro-batches: {'padding-free rows (no padding computed)' if padding_free else 'right-padded rows'}")
    t0 = time.perf_counter() - done.get("elapsed_s", 0.0)  # elapsed time and counters carry over a resume
    window_tokens, window_t0, last_logged, tokens_seen = 0, time.perf_counter(), done.get("last_logged"), done.get("tokens_seen", 0)
    step_losses: list[float] = list(done.get("pending_losses", []))
    progress = _progress(console, steps, start)
    with progress, StopSignals() as stop:
        task = progress.add_task("train", total=steps, completed=start, loss=float("nan"), lr=0.0, tps=0.0)
        for step in range(start + 1, steps + 1):
            drawn = [stream.next() for _ in range(world * t.grad_accum)]  # every process draws the same
            micro = [collate([ds.train[i] for i in idx]) for idx in drawn[rank::world]]
            loss, _ = accumulate_gradients(loss_fn, micro, device, accelerator.autocast, accelerator.backward, accelerator)
            step_tokens = sum(len(ds.train[i]["input_ids"]) for idx in drawn for i in idx)  # real tokens, all processes
            window_tokens += step_tokens
            tokens_seen += step_tokens
            if not math.isfinite(loss):
                if main:
                    plot_loss(log.events, run_dir / "loss.png")
                raise UserError(f"train: loss is {loss} at step {step}; lower train.lr or check the data (last checkpoint kept)")
            if t.max_grad_norm:
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss)

            if step % t.log_every == 0 or step == steps:
                dt = time.perf_counter() - window_t0
                event = {"event": "train", "step": step, "loss": sum(step_losses) / len(step_losses),
                         "lr": lr, "tokens_per_s": window_tokens / max(dt, 1e-9),
                         "epoch": stream.epoch, "elapsed_s": time.perf_counter() - t0}
                log.write(event)
                last_logged = event["loss"]
                progress.update(task, loss=event["loss"], lr=event["lr"], tps=event["tokens_per_s"])
                if not progress.live.is_started:
                    console.print(f"step {step}/{steps}  loss {event['loss']:.4f}  lr {event['lr']:.2e}  {event['tokens_per_s']:.0f} tok/s")
                step_losses, window_tokens, window_t0 = [], 0, time.perf_counter()
            if main and eval_examples and t.eval_every and step % t.eval_every == 0 and step != steps:
                ev = eval_loss(model, eval_examples, collate, t.micro_batch_size, accelerator.autocast, path.loss_sum)
                log.write({"event": "eval", "step": step, **ev})
                progress.console.print(f"step {step}: eval loss {ev['eval_loss']:.4f}  ppl {ev['eval_ppl']:.2f}")
            stopping = _any_process(accelerator, stop.signum is not None)
            if stopping or (t.save_every and (step % t.save_every == 0 or step == steps)):
                # the last step too, so --resume on a finished run has nothing to redo
                counters = {"pending_losses": step_losses, "last_logged": last_logged, "tokens_seen": tokens_seen,
                            "elapsed_s": time.perf_counter() - t0}
                saved = save_checkpoint(run_dir, step, model, recipe, base_path, fp, optimizer, scheduler, stream,
                                        accelerator, counters)
                if main:
                    prune_checkpoints(run_dir, t.keep_checkpoints)
                if stopping:
                    if main:
                        plot_loss(log.events, run_dir / "loss.png")
                    name = signal.Signals(stop.signum or signal.SIGTERM).name
                    procs = f" --num-processes {world}" if world > 1 else ""
                    raise Interrupted(f"{name}: stopped after step {step}/{steps}; checkpoint {saved}. "
                                      f"Resume with: peft train {run_dir / 'recipe.yaml'} --resume{procs}", stop.signum or signal.SIGTERM)
            progress.update(task, completed=step)

    # 5. final eval + artifacts (first process)
    summary = {"method": recipe.method.name, "steps": steps, "examples_per_step": t.micro_batch_size * t.grad_accum * world,
               "processes": world, "final_train_loss": last_logged,
               "trainable_params": trainable, "base_params": base_params,
               "trainable_pct_of_base": 100 * trainable / base_params,
               "train_examples": len(ds.train), "dropped_rows": s.dropped_empty_answer + s.dropped_truncated,
               "mixed_precision": mixed, "padding_free": padding_free, "loss_path": path.as_json(), "device": str(device),
               "tokens_seen": tokens_seen, "wall_s": time.perf_counter() - t0}
    if main:
        if eval_examples:
            final = [e for e in log.events if e.get("event") == "eval" and e.get("step") == steps]  # a finished run resumed
            if final:
                ev = {k: v for k, v in final[-1].items() if k not in ("event", "step")}
            else:
                ev = eval_loss(model, eval_examples, collate, t.micro_batch_size, accelerator.autocast, path.loss_sum)
                log.write({"event": "eval", "step": steps, **ev})
            summary.update(ev)
            console.print(f"final eval loss {ev['eval_loss']:.4f}  ppl {ev['eval_ppl']:.2f}")
        summary["adapter_dir"] = str(artifacts.save_adapter(run_dir / "adapter", model, recipe, base_path, fp))
        write_json_atomic(run_dir / "summary.json", summary)
        plot_loss(log.events, run_dir / "loss.png")
        console.print(f"wrote {run_dir}/ (adapter/, metrics.jsonl, summary.json, loss.png) in {summary['wall_s']:.1f}s")
    accelerator.wait_for_everyone()
    if t.report_to:
        accelerator.end_training()
    model.eval()
    return TrainResult(run_dir, summary, model, tok, ds)


def _any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (a signal may reach only some)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "sum") > 0)


def _restore(checkpoint: Path, model, method, optimizer, scheduler, rank: int = 0) -> tuple[int, dict, dict]:
    """Load adapter, optimizer, scheduler and this process's RNG state from a checkpoint;
    returns its step, data position ({"epoch", "index"}) and the loop's counters
    (:func:`save_checkpoint`'s ``progress``; empty for checkpoints written before it existed)."""
    from safetensors.torch import load_file

    method.load_state_dict(model, load_file(checkpoint / "adapter" / "adapter_model.safetensors"))
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    rng = torch.load(checkpoint / "rng.pt", weights_only=True)["torch"]
    states = rng if isinstance(rng, list) else [rng]
    torch.set_rng_state(states[rank] if rank < len(states) else states[0])
    state = json.loads((checkpoint / "state.json").read_text())
    return int(state["step"]), state["data"], state.get("progress", {})


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists and None as strings (tracker hparams)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _checkpoint_step(checkpoint: Path | None) -> int | None:
    return None if checkpoint is None else int(checkpoint.name.removeprefix("step-"))


def read_events(path: Path) -> list[dict]:
    """The events of a ``metrics.jsonl``. A torn last line (the process was killed while
    appending it) is skipped; a bad line elsewhere is an error."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    events = []
    for i, line in enumerate(lines):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}:{i + 1}: not a JSON line") from None
    return events


def _progress(console, steps: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not console.is_terminal,
    )
