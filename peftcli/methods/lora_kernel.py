"""The LoRA branch kernel: scaling · B A dropout(x) for training, with a hand-written backward
that stores only x, A, B, the (..., r) product A x' and the dropped positions (Hu et al. 2021,
§4.1, for the update; the memory layout is ours).

Dropout is drawn as the *positions it zeroes* (:func:`drop_index`: a Bernoulli process sampled by
its geometric gaps), from a per-call seed (activation checkpointing's recompute draws the same
ones); the backward pass reuses the positions, about p of x's elements, instead of a full mask.
:class:`peftcli.methods.lora.LoRALinear` calls :func:`lora_branch` whenever gradients are on;
``peftcli.guard`` checks it against plain autograd before a run trusts it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def drop_index(n: int, p: float, seed: int, device: torch.device, chunk: int | None = None) -> torch.Tensor:
    """The flat positions in [0, n) that dropout zeroes, each one independently with probability p:
    a sorted int64 tensor of about p·n positions, the same for the same seed.

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
    dropped = drop_index(x.numel(), p, seed, x.device)
    return _zeroed(x.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True), dropped), dropped, 1 / (1 - p)


def _zeroed(t: torch.Tensor, dropped: torch.Tensor | None) -> torch.Tensor:
    """``t`` (contiguous) with its flat positions ``dropped`` set to 0, in place (``index_fill_``:
    ~40x faster than the equivalent ``t.view(-1)[dropped] = 0``, an ``index_put_``)."""
    if dropped is not None:
        t.view(-1).index_fill_(0, dropped, 0)
    return t


def _packed(dropped: torch.Tensor | None) -> torch.Tensor | None:
    """The sorted positions ``dropped`` as kept for the backward pass: their gaps in int16 (2 bytes
    per dropped position, a twentieth of x's bf16 bytes at p = 0.05), or int64 as they are where
    a gap exceeds int16 (rare for p > 1e-3). :func:`_unpacked` reverses it exactly."""
    if dropped is None or dropped.numel() == 0:
        return dropped
    gaps = torch.diff(dropped, prepend=dropped.new_full((1,), -1))
    return gaps.to(torch.int16) if int(gaps.max()) <= torch.iinfo(torch.int16).max else dropped


def _unpacked(saved: torch.Tensor | None) -> torch.Tensor | None:
    if saved is None or saved.dtype == torch.int64:
        return saved
    return saved.cumsum(0, dtype=torch.int64).sub_(1)


class LoRABranch(torch.autograd.Function):
    """The LoRA update of one layer in training: scaling · B A dropout(x) (Hu et al. 2021, §4.1),
    with a hand-written backward that stores only x, A, B, the (..., r) product A x' and the
    dropped positions.

    The autograd graph of the plain formula would keep, per layer, the dropout mask and the dropped
    input x' (..., in) in the compute dtype; here only the dropped positions are kept (:func:`_packed`:
    int16 gaps, about p of x's elements), x' is rebuilt from them in the backward pass, and x is saved as is — the
    q/k/v (and gate/up) layers get the same x, so it is stored once for all of them. Math in
    ``dtype`` (bf16 under autocast, else A's float32), as autocast would do for the two matmuls;
    the gradients of A and B are returned in float32.

    forward(x (..., in), weight_A (r, in), weight_B (out, r), scaling, p, seed, dtype) -> (..., out)
    in ``dtype``.
    """

    @staticmethod
    def forward(ctx, x, weight_A, weight_B, scaling: float, p: float, seed: int, dtype: torch.dtype):
        xd, dropped, scale = _dropped(x, p, seed, dtype)
        u = F.linear(xd, (weight_A * scale).to(dtype))  # (..., r)
        ctx.save_for_backward(x, weight_A, weight_B, u, _packed(dropped))
        ctx.scaling, ctx.scale, ctx.dtype = scaling, scale, dtype
        return F.linear(u, (weight_B * scaling).to(dtype))  # the scalings act on the small A and B

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_A, weight_B, u, dropped = ctx.saved_tensors
        dropped = _unpacked(dropped)
        scale = ctx.scale
        g = grad_out.to(ctx.dtype)  # (..., out)
        gu = g @ (weight_B * ctx.scaling).to(ctx.dtype)  # (..., r)
        grad_B = (g.reshape(-1, g.shape[-1]).T @ u.reshape(-1, u.shape[-1])).to(weight_B.dtype) * ctx.scaling  # (out, r)
        xd = _zeroed(x.to(dtype=ctx.dtype, memory_format=torch.contiguous_format, copy=dropped is not None), dropped)
        grad_A = (gu.reshape(-1, gu.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])).to(weight_A.dtype) * scale  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # (..., in), contiguous; d(dropout)/dx = the same mask and scale
            grad_x = _zeroed(gu @ (weight_A * scale).to(ctx.dtype), dropped).to(x.dtype)
        return grad_x, grad_A, grad_B, None, None, None, None


def lora_branch(x: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """scaling · B A dropout(x) through :class:`LoRABranch`, in the autocast dtype when autocast is
    on for x's device (else A's dtype); the dropout seed comes from the global generator, so runs
    are reproducible under ``train.seed`` and activation checkpointing re-draws the same mask."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight_A.dtype
    seed = int(torch.randint(0, 2**62, (), device="cpu")) if p > 0 else 0
    return LoRABranch.apply(x, weight_A, weight_B, scaling, p, seed, dtype)
