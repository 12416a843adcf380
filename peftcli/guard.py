"""The fast loss path proves itself against the model's own forward before it is trusted.

The trainer's fast path (:func:`peftcli.loss.supervised_loss_sum`: the decoder body, then our
own blockwise head cross-entropy at the supervised positions only, padding-free rows with
per-example attention, LoRA's hand-written backward) never computes the model's logits. It is
right only if the model's logits are ``lm_head(body(x))`` and nothing else — and families differ:
Gemma 2 soft-caps its final logits, Cohere and Granite scale them, a sliding window or an
attention option the per-example kernel does not know changes attention. No list of such
families can be complete, so the fast path is *checked* instead, on the model at hand:

    one real micro-batch (dropout off, the run's precision)
        fast:       loss and trainable-parameter gradients through the fast path
        reference:  the same batch right-padded through ``model(input_ids, attention_mask)``, its
                    own logits, cross-entropy on the same labels, plain autograd
        agree if   |loss_fast - loss_ref| <= tol_loss · max(1, loss_ref)   (nats per supervised token)
                   ||g_fast - g_ref||_2 <= tol_grad · ||g_ref||_2         (all trainable parameters)

Candidates are tried fastest first — padding-free rows (when the recipe and method allow them),
then padded rows through the fast head, then the reference itself — and the first that agrees
trains; the reference always does, by definition. :data:`TOLERANCES` are per compute dtype.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.data import IGNORE_INDEX
from peftcli.errors import UserError
from peftcli.loss import supervised_loss_sum

# (loss relative to max(1, loss) in nats, gradient relative L2 norm) the fast path may differ by.
# float32: the reduction-order noise of padded vs padding-free attention and of the blockwise head
# is ~1e-7 (loss) and ~1e-6 (gradients) on the embedded model; 16-bit compute rounds every matmul
# to 8 (bf16) or 11 (fp16) mantissa bits.
TOLERANCES = {torch.float32: (2e-5, 1e-3), torch.float64: (1e-9, 1e-7),
              torch.bfloat16: (2e-2, 1e-1), torch.float16: (5e-3, 3e-2)}
GUARD_EXAMPLES = 2  # examples of the first micro-batch the check runs on (its cost: two small steps)

PATHS = {
    "fast": "own head cross-entropy on padding-free rows",
    "fast-padded": "own head cross-entropy on right-padded rows",
    "reference": "the model's own forward and logits on right-padded rows, autograd",
}
FUSED = ", hand-written LoRA backward"  # added to a fast path's description where the method has that kernel


def reference_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy from the model's own forward and logits.

    Args:
        batch: right-padded rows (:func:`peftcli.data.collate`): input_ids, attention_mask and
            labels, each (B, T); labels unshifted (Hugging Face convention), -100 ignored.
    Returns:
        (loss_sum, n) — a float32 scalar (nats) and the number of supervised tokens. Holds the
        full (B, T, vocab) logits: the memory the fast path saves.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    n = int(mask.sum())
    return F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="sum"), n


def set_fused_backward(model: nn.Module, on: bool) -> None:
    """Switch every module with a hand-written training kernel (attribute ``fused_backward``,
    e.g. :class:`peftcli.methods.lora.LoRALinear`) to it (True) or to the plain autograd formula."""
    for module in model.modules():
        if hasattr(module, "fused_backward"):
            module.fused_backward = on


@dataclass
class LossPath:
    """The loss path a run uses, and the evidence for it.

    ``name``: a key of :data:`PATHS`; ``padding_free``: its micro-batches are padding-free rows;
    ``loss_diff`` (nats per supervised token) and ``grad_diff`` (relative L2 norm) are the
    chosen path's measured difference from the reference (0 for the reference itself);
    ``tolerance``: (loss, grad) for the compute dtype; ``tried``: every candidate checked, with
    its differences; ``seconds``: what the check cost; ``fused``: the fast path includes a
    hand-written backward (:func:`set_fused_backward`).
    """

    name: str
    padding_free: bool
    loss_diff: float = 0.0
    grad_diff: float | None = 0.0
    tolerance: tuple[float, float] = (0.0, 0.0)
    tried: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    fused: bool = False

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed loss, supervised tokens) of a micro-batch on this path."""
        if self.name == "reference":
            return reference_loss_sum(model, batch)
        return supervised_loss_sum(model, batch)

    def describe(self) -> str:
        """One line for the console: the path, what it is, and the measured difference."""
        if self.name == "reference":
            failed = "; ".join(f"{t['path']} differed by {format_diff(t)}" for t in self.tried if not t["agrees"])
            return f"loss path: reference ({PATHS['reference']}): {failed or 'chosen'}"
        what = PATHS[self.name] + FUSED * self.fused
        return (f"loss path: {self.name} ({what}); the model's own forward agrees: {format_diff(asdict(self))} "
                f"(tolerance {self.tolerance[0]:.0e}·max(1, loss) nats, {self.tolerance[1]:.0e} relative; checked in {self.seconds:.1f}s)")

    def as_json(self) -> dict:
        d = asdict(self)
        d["tolerance"] = {"loss_rel": self.tolerance[0], "grad_rel": self.tolerance[1]}
        return d


def format_diff(t: dict) -> str:
    """A candidate's measured difference from the reference (an entry of :attr:`LossPath.tried`,
    or a LossPath as a dict), in words: "loss 3.1e-02 nats, gradients 2.0e-01 relative"."""
    if t["loss_diff"] == 0 and not t.get("grad_diff"):
        return "bit for bit (loss and gradients)" if t.get("grad_diff") == 0 else "bit for bit (loss)"
    grad = "" if t.get("grad_diff") is None else f", gradients {t['grad_diff']:.1e} relative"
    return f"loss {t['loss_diff']:.1e} nats{grad}"


def compute_dtype(model: nn.Module, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype, else the base's floating weight dtype
    (a 4-bit base: its compute dtype)."""
    if autocast_dtype is not None:
        return autocast_dtype
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)  # bitsandbytes Linear4bit
        if isinstance(dtype, torch.dtype):
            return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), torch.float32)


def _loss_and_grads(loss_fn, model: nn.Module, batch: dict, params: list[nn.Parameter], autocast) -> tuple[float, int, list | None]:
    """Mean loss per supervised token and the trainable parameters' gradients (None without any)."""
    with autocast():
        s, n = loss_fn(model, batch)
    if not params:
        return float(s.detach()) / max(n, 1), n, None
    if s.requires_grad:  # else no trainable parameter is on the loss's way: every gradient is zero
        (s / max(n, 1)).backward()
    grads = [p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32) for p in params]
    for p in params:
        p.grad = None
    return float(s.detach()) / max(n, 1), n, grads


def _grad_diff(fast: list | None, ref: list | None) -> float | None:
    if fast is None or ref is None:
        return None
    diff = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(fast, ref)))
    norm = math.sqrt(sum(float(b.pow(2).sum()) for b in ref))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _unreachable(model: nn.Module, length: int) -> str:
    """The one-line refusal for a method whose parameters get no gradient through the forward."""
    what = (f"method: no trainable parameter gets a gradient through {type(model).__name__}'s own forward on the "
            "first micro-batch, so training would change nothing")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window < length and getattr(config, "use_sliding_window", True) is not False:
        return (f"{what}: its sliding window ({window} tokens) is shorter than these rows ({length}), so what the "
                f"method puts before the text is out of every supervised token's reach (use rows of at most {window} tokens, "
                "or a method that changes the weights: lora, ia3, adapter)")
    return f"{what}: the method's parts are not on the forward's way, it cannot apply to this model"


def choose_loss_path(model: nn.Module, examples: list[dict], pad_id: int, padding_free: bool, autocast=nullcontext,
                     autocast_dtype: torch.dtype | None = None, gradients: bool = True) -> LossPath:
    """Check the fast loss path on ``examples`` (a real micro-batch, tokenized) against the model's
    own forward, and return the first candidate that agrees (see the module docstring).

    Args:
        model: the base with the method applied; its mode, gradients and torch's RNG state are
            left as they were.
        padding_free: whether padding-free rows may be used (recipe, method and
            :func:`peftcli.loss.prepare_padding_free` allow them).
        autocast, autocast_dtype: the run's autocast context and its dtype (None: off).
        gradients: also compare trainable-parameter gradients (off for scoring only).
    Returns:
        the :class:`LossPath`; its ``loss_sum`` is the loss to train and evaluate with.
    Raises:
        UserError: no trainable parameter gets a gradient through the model's own forward (the
            method hooks something that forward does not use).
    """
    from peftcli.data import collate, collate_padding_free

    t0 = time.perf_counter()
    device = next(p.device for p in model.parameters())
    examples = examples[:GUARD_EXAMPLES]
    padded = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
    params = [p for p in model.parameters() if p.requires_grad] if gradients else []
    tolerance = TOLERANCES.get(compute_dtype(model, autocast_dtype), TOLERANCES[torch.bfloat16])
    was_training, rng = model.training, torch.get_rng_state()
    model.eval()  # dropout off: both paths see the same function
    try:
        with torch.enable_grad() if gradients else torch.no_grad():
            set_fused_backward(model, False)
            ref_loss, ref_n, ref_grads = _loss_and_grads(reference_loss_sum, model, padded, params, autocast)
            if ref_grads is not None and all(not bool(g.any()) for g in ref_grads):
                raise UserError(_unreachable(model, padded["input_ids"].shape[1]))
            set_fused_backward(model, True)
            tried = []
            candidates = ([("fast", True)] if padding_free else []) + [("fast-padded", False)]
            for name, free in candidates:
                batch = {k: v.to(device) for k, v in collate_padding_free(examples, 1, pad_id).items()} if free else padded
                loss, n, grads = _loss_and_grads(LossPath(name, free).loss_sum, model, batch, params, autocast)
                loss_diff = abs(loss - ref_loss) if n == ref_n and math.isfinite(loss) else math.inf
                grad_diff = _grad_diff(grads, ref_grads)
                agrees = loss_diff <= tolerance[0] * max(1.0, abs(ref_loss)) and (grad_diff is None or grad_diff <= tolerance[1])
                tried.append({"path": name, "loss_diff": loss_diff, "grad_diff": grad_diff, "agrees": agrees})
                if agrees:
                    # the hand-written backward is named only where there was a backward to check
                    fused = gradients and any(hasattr(m, "fused_backward") for m in model.modules())
                    return LossPath(name, free, loss_diff, grad_diff, tolerance, tried, time.perf_counter() - t0, fused)
            set_fused_backward(model, False)
            return LossPath("reference", False, 0.0, 0.0 if gradients else None, tolerance, tried, time.perf_counter() - t0)
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
