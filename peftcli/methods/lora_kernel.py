"""The LoRA branch kernel: scaling · B A dropout(x) for training, with a hand-written backward
that stores only x, A, B and the (..., r) product A x' (Hu et al. 2021, §4.1, for the update;
the memory layout is ours).

Dropout is drawn as the *positions it zeroes* (:func:`drop_index`: a Bernoulli process sampled by
its geometric gaps), from a per-call seed, so the backward pass draws the same positions again
instead of storing a mask. :class:`peftcli.methods.lora.LoRALinear` calls :func:`lora_branch`
whenever gradients are on; ``peftcli.guard`` checks it against plain autograd before a run
trusts it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def drop_index(n: int, p: float, seed: int, device: torch.device, chunk: int | None = None) -> torch.Tensor:
    """The flat positions in [0, n) that dropout zeroes, each one independently with probability p:
    a sorted int64 tensor of about p·n positions, the same for the same seed (the backward pass of
    :class:`LoRABranch` draws it again instead of storing it).

    Sampled as a Bernoulli process by its gaps: the distance from one dropped position to the
    next is Geometric(p), drawn by inverting its CDF, G = 1 + ⌊log U / log(1 - p)⌋ with U uniform
    on (0, 1] (Knuth, TAOCP vol. 2, §3.4.1, the geometric distribution). That takes about p·n
    uniform draws instead of n, and keeps p exact. Needs 0 < p < 1. ``chunk``: gaps drawn per
    round (default: enough to pass n but for ~1e-15 of draws; more rounds follow if not).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    per_log_keep = 1 / math.log1p(-p)
    chunk = chunk or int(n * p + 8 * math.sqrt(n * p) + 32)  # mean + 8 sigma
    pieces, last = [], -1.0
    while True:
        u = torch.empty(chunk, dtype=torch.float64, device=device).uniform_(generator=gen)  # [0, 1)
        gaps = torch.log(torch.rsub(u, 1.0)).mul_(per_log_keep).floor_().add_(1)  # Geometric(p) on 1, 2, ...
        positions = gaps.cumsum_(0).add_(last)  # integers, exact in float64 below 2**53
        inside = int(torch.searchsorted(positions, float(n)))  # how many are < n
        pieces.append(positions[:inside])
        if inside < chunk:
            return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(torch.int64)
        last = float(positions[-1])


def keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The dropout keep mask that :class:`LoRABranch` applies for ``seed``: bool of ``shape``,
    False at :func:`drop_index`'s positions (each element False with probability p)."""
    keep = torch.ones(math.prod(shape), dtype=torch.bool, device=device)
    if p > 0:
        keep[drop_index(keep.numel(), p, seed, device)] = False
    return keep.view(shape)


def _dropped(x: torch.Tensor, p: float, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(x', dropped, scale) for inverted dropout: x' = a contiguous copy of x in ``dtype`` with the
    flat positions ``dropped`` (:func:`drop_index`) zeroed, so dropout(x) = x' · scale with
    scale = 1/(1-p); the scale is left to the caller, which folds it into the (r, in) A instead of
    multiplying the (..., in) input. (x in ``dtype``, None, 1.0) when p == 0."""
    if p == 0:
        return x.to(dtype), None, 1.0
    xd = x.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    dropped = drop_index(xd.numel(), p, seed, x.device)
    xd.view(-1)[dropped] = 0
    return xd, dropped, 1 / (1 - p)


class LoRABranch(torch.autograd.Function):
    """The LoRA update of one layer in training: scaling · B A dropout(x) (Hu et al. 2021, §4.1),
    with a hand-written backward that stores only x, A, B and the (..., r) product A x'.

    The autograd graph of the plain formula would keep, per layer, the dropout mask and the dropped
    input x' (..., in) in the compute dtype; here the mask is drawn again from its seed in the
    backward pass, and x is saved as is — the q/k/v (and gate/up) layers get the same x, so it is
    stored once for all of them. Math in ``dtype`` (bf16 under autocast, else A's float32), as
    autocast would do for the two matmuls; the gradients of A and B are returned in float32.

    forward(x (..., in), weight_A (r, in), weight_B (out, r), scaling, p, seed, dtype) -> (..., out)
    in ``dtype``.
    """

    @staticmethod
    def forward(ctx, x, weight_A, weight_B, scaling: float, p: float, seed: int, dtype: torch.dtype):
        xd, _, scale = _dropped(x, p, seed, dtype)
        u = F.linear(xd, (weight_A * scale).to(dtype))  # (..., r)
        ctx.save_for_backward(x, weight_A, weight_B, u)
        ctx.scaling, ctx.p, ctx.seed, ctx.dtype = scaling, p, seed, dtype
        return F.linear(u, (weight_B * scaling).to(dtype))  # the scalings act on the small A and B

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_A, weight_B, u = ctx.saved_tensors
        g = grad_out.to(ctx.dtype)  # (..., out)
        gu = g @ (weight_B * ctx.scaling).to(ctx.dtype)  # (..., r)
        grad_B = (g.reshape(-1, g.shape[-1]).T @ u.reshape(-1, u.shape[-1])).to(weight_B.dtype) * ctx.scaling  # (out, r)
        xd, dropped, scale = _dropped(x, ctx.p, ctx.seed, ctx.dtype)
        grad_A = (gu.reshape(-1, gu.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])).to(weight_A.dtype) * scale  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gu @ (weight_A * scale).to(ctx.dtype)  # (..., in), contiguous; d(dropout)/dx = the same mask and scale
            if dropped is not None:
                grad_x.view(-1)[dropped] = 0
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_A, grad_B, None, None, None, None


def lora_branch(x: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """scaling · B A dropout(x) through :class:`LoRABranch`, in the autocast dtype when autocast is
    on for x's device (else A's dtype); the dropout seed comes from the global generator, so runs
    are reproducible under ``train.seed`` and activation checkpointing re-draws the same mask."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight_A.dtype
    seed = int(torch.randint(0, 2**62, (), device="cpu")) if p > 0 else 0
    return LoRABranch.apply(x, weight_A, weight_B, scaling, p, seed, dtype)
