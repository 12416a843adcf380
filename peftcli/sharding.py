"""``train.distributed: fsdp``: the model's parameters sharded across the processes with torch's
FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, PyTorch FSDP, §3 — FSDP2 keeps
each parameter as a DTensor sharded on dim 0), one unit per decoder block plus the root.

Each process holds 1/N of every parameter, frozen base and trainable method parts alike (FSDP2
shards per parameter, so a block whose base weights are frozen and whose LoRA matrices train is
one unit). A unit's full parameters exist only while it runs: all-gathered before its forward
and again before its backward, its gradients reduce-scattered (averaged over the processes, as
DDP averages them) after it. The root unit is the loss module (:class:`peftcli.loss.SupervisedLoss`):
the embedding, final norm and output head are gathered when it is called, so the blockwise head
cross-entropy (which reads the head weight directly) sees the full weight.

accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2)`` is not used: accelerate 1.15 sets
its distributed type to FSDP only for GPU-like devices, and on the CPU (gloo) it silently wraps
the model in DDP instead; calling ``fully_shard`` here is one path on CPU and GPU alike, tested on
the CPU. Checkpoints and adapters hold the full (gathered) tensors (:func:`gathered`,
:func:`full_optimizer_state`), so they are the files a single process writes and resumes from.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from peftcli import models
from peftcli.errors import UserError


def check(distributed: str, quantization: str, processes: int, objective: str = "sft",
          neftune_alpha: float | None = None) -> None:
    """Refuse what ``train.distributed: fsdp`` cannot shard, or has not been tested with, before
    the model is loaded.

    An 8-bit base (``model.quantization: int8``) is refused: bitsandbytes' ``Linear8bitLt`` reads
    its weight's int8 rows and scales (``CB``, ``SCB``) from the parameter object, which FSDP2
    replaces by a plain sharded parameter (measured: ``'Parameter' object has no attribute 'CB'``
    at the first forward). A 4-bit base (nf4, fp4, so ``qlora``) shards: its packed bytes are
    stored as bfloat16 (``quant_storage``) and each ``Linear4bit`` keeps the quantisation state,
    which bitsandbytes puts back on the gathered weight at every forward.

    Preference objectives (``train.objective`` dpo / orpo: DPO's reference pass switches the
    method off inside the sharded blocks) and NEFTune's hooks are not tested sharded yet: refused
    rather than trusted.

    Raises:
        UserError: one line naming the combination and what to use instead.
    """
    if distributed != "fsdp" or processes <= 1:
        return
    if objective != "sft":
        raise UserError(f"train.distributed: fsdp with train.objective {objective} is not tested yet; use "
                        "train.distributed: ddp for preference tuning on several processes")
    if neftune_alpha:
        raise UserError("train.distributed: fsdp with train.neftune_alpha is not tested yet; use train.distributed: ddp, "
                        "or remove train.neftune_alpha")
    if quantization == "int8":
        raise UserError("train.distributed: fsdp with model.quantization int8: bitsandbytes' 8-bit Linear reads its "
                        "int8 rows and scales from the weight object, which FSDP2 replaces by a plain sharded one; use "
                        "model.quantization nf4 (method qlora) or none with fsdp, or train.distributed: ddp")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a causal LM, the units FSDP shards one at a time: the modules of
    the classes transformers lists in ``model._no_split_modules`` (e.g. ``LlamaDecoderLayer``),
    else the entries of the longest ``nn.ModuleList`` in the decoder body.

    Raises:
        UserError: neither is found.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in models.decoder_body(model).modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in models.decoder_body(model).modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError(f"train.distributed: fsdp: {type(model).__name__} has no list of decoder blocks to shard; "
                        "use train.distributed: ddp")
    return list(max(lists, key=len))


def shard(root: nn.Module, model: nn.Module) -> None:
    """``fully_shard`` every decoder block of ``model`` (:func:`decoder_blocks`), then ``root``
    (the module the loop calls, holding ``model``), in place: the parameters become DTensors
    sharded on dim 0 over all processes (the default process group's world), and the unsharded
    copies are freed (nothing else holds them). Run after the loss path is checked (on the whole
    model) and before the optimizer is built (it must hold the sharded parameters)."""
    from torch.distributed.fsdp import fully_shard

    for block in decoder_blocks(model):
        fully_shard(block)
    fully_shard(root)
    give_back_freed_memory()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_FROM = 1 << 20  # bytes: allocations from this size on are mmapped, and unmapped when freed


def give_back_freed_memory() -> None:
    """Make this process's large allocations go back to the OS when freed (glibc ``mallopt``:
    ``M_MMAP_THRESHOLD`` = :data:`MMAP_FROM`; no effect off glibc).

    FSDP allocates and frees every unit's gathered weights at each forward and backward, partly
    in gloo's threads; glibc keeps freed blocks below its dynamic mmap threshold (which grows up
    to 32 MiB) in per-thread heaps, so the resident memory of a sharded run grew above an
    unsharded one's. Measured on the embedded SmolLM2-135M, 2 processes, LoRA, 4 steps of one
    128-token row: RSS after the steps 2.0-2.5 GiB per process sharded, 1.3 GiB unsharded, and
    1.0 GiB sharded with this threshold.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_FROM)
    except (OSError, AttributeError):  # not glibc (musl): its allocator does not keep them
        pass


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather: every process must call it, in the same
    order), a plain tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


@contextmanager
def gathered(model: nn.Module):
    """Inside, every trainable parameter of a sharded ``model`` is its full tensor (a plain
    ``nn.Parameter``), so the method's ``state_dict`` reads the whole adapter; the sharded
    parameters are put back on exit. A collective: every process enters it, in the same order.
    Read only: what is written into the full tensors inside is not copied back."""
    swapped = [(module, name, p) for module in model.modules() for name, p in module._parameters.items()
               if p is not None and p.requires_grad and is_sharded(p)]
    try:
        for module, name, p in swapped:
            module._parameters[name] = nn.Parameter(p.full_tensor().detach(), requires_grad=True)
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


class FullState:
    """An optimizer's state with its sharded tensors gathered (:func:`full_optimizer_state`):
    ``state_dict()`` is what the optimizer of a single process would return."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> FullState:
    """The optimizer's ``state_dict`` with every DTensor (AdamW's moments of a sharded parameter)
    gathered whole: the checkpoint a single process writes, so it resumes under either engine
    (on the number of processes that wrote it: the trainer checks). A collective (every process, same order: the state's own order)."""
    sd = optimizer.state_dict()
    state = {i: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return FullState({**sd, "state": state})


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a full optimizer ``state_dict`` (:func:`full_optimizer_state`, or one process's) into
    the optimizer of sharded parameters: each state tensor shaped like its parameter becomes this
    process's shard of it (the parameter's mesh and placements; every process holds the whole
    tensor read from the checkpoint, so no communication)."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, s in saved["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                    if is_sharded(p) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
                    for k, v in s.items()}
    optimizer.load_state_dict({**saved, "state": state})
