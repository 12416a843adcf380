"""Peak-memory estimate for a recipe, by one dry step (``peft validate``).

A formula over layer shapes misses what the allocator and the kernels actually keep, so the
estimate is measured instead: with the model and method already loaded as ``peft train`` would,
run forward + backward on the recipe's *largest* micro-batch (the ``micro_batch_size`` longest
examples, or packed rows with ``data.packing``) under the run's autocast, allocate the optimizer state, and read the process's peak
memory — the peak resident set on CPU (``getrusage``), the allocator's peak on CUDA. No weight
is changed. Steps with shorter examples use less; the in-run evaluation (no gradients) less still.
"""

from __future__ import annotations

import resource
from contextlib import nullcontext

import torch
from torch import nn

from peftcli import packing, preference
from peftcli.loss import make_collate, supervised_loss_sum
from peftcli.precision import AUTOCAST_DTYPES
from peftcli.prepare import enable_gradient_checkpointing, store_linear_weights


def largest_micro_batch(examples: list[dict], micro_batch_size: int, padding_free: bool, pad_id: int,
                        multiple_of: int = 1) -> dict:
    """The micro-batch of the ``micro_batch_size`` longest examples, collated as training would
    (one padding-free row, or right-padded rows; length rounded up to ``multiple_of``)."""
    longest = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)[:micro_batch_size]
    return make_collate(padding_free, pad_id, multiple_of)(longest)


def peak_bytes() -> int:
    """This process's peak memory so far, bytes: CUDA allocator peak, else peak RSS (Linux: KiB units)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dry_step_peak(model: nn.Module, batch: dict[str, torch.Tensor], mixed_precision: str, loss_sum=None) -> int:
    """Forward + backward on ``batch`` and AdamW state allocation, without changing any weight.

    Args:
        model: the base with the method applied (trainable parameters require grad).
        batch: a collated micro-batch (see :func:`largest_micro_batch`).
        mixed_precision: "no" | "bf16" | "fp16" (resolved, as in the run).
        loss_sum: the run's loss path (:meth:`peftcli.guard.LossPath.loss_sum`; default the fast one).
    Returns:
        the process's peak memory afterwards, bytes (:func:`peak_bytes`).
    """
    loss_sum = loss_sum or supervised_loss_sum
    device = next(p.device for p in model.parameters())
    dtype = AUTOCAST_DTYPES.get(mixed_precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.train()
    with autocast:
        loss, n = loss_sum(model, {k: v.to(device) for k, v in batch.items()})
    (loss / max(n, 1)).backward()
    # AdamW keeps two float32 moments per trainable parameter
    moments = [torch.zeros_like(p, dtype=torch.float32) for p in params for _ in range(2)]
    peak = peak_bytes()
    del moments
    for p in params:
        p.grad = None
    model.train(was_training)
    return peak


def estimate(prepared, path) -> tuple[int, int]:
    """``peft validate``'s estimate for a prepared run (:func:`peftcli.prepare.load`) on its loss
    path (:class:`peftcli.guard.LossPath`): gradient checkpointing as the recipe sets it, then
    :func:`dry_step_peak` on :func:`largest_micro_batch`. Returns (peak bytes, tokens in that
    micro-batch). A preference run (``train.objective`` dpo / orpo) steps on its longest pairs, with
    its loss (:class:`peftcli.preference.PreferenceLoss`: DPO's reference forward included)."""
    r, train, pad_id = prepared.recipe, prepared.datasets.train, prepared.tokenizer.pad_token_id
    loss_sum = path.loss_sum
    if r.train.objective != "sft":
        pair_len = lambda e: max(len(e["input_ids"]), len(e["rejected_input_ids"]))  # noqa: E731
        longest = sorted(train, key=pair_len, reverse=True)[:r.train.micro_batch_size]
        batch = preference.collate_pairs(longest, pad_id, r.data.pad_to_multiple_of)
        loss_fn = preference.loss_for(prepared.model, r.train, own_forward=path.name == "reference")
        loss_sum = lambda model, b: (loss_fn(b, len(longest), preference.chosen_tokens(b))[0], 1)  # noqa: E731
    elif prepared.packing:
        examples = packing.largest_micro_batch(prepared.packing.rows, train, r.train.micro_batch_size)
        batch = make_collate(path.padding_free, pad_id, r.data.pad_to_multiple_of)(examples)
    else:
        batch = largest_micro_batch(train, r.train.micro_batch_size, path.padding_free, pad_id, r.data.pad_to_multiple_of)
    if r.train.gradient_checkpointing:
        enable_gradient_checkpointing(prepared.model)
    store_linear_weights(prepared)  # as the run stores them
    return dry_step_peak(prepared.model, batch, prepared.mixed, loss_sum), batch["input_ids"].numel()
