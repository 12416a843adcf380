"""Attention within each example of a padding-free row, one causal attention call per example.

A padding-free micro-batch (:func:`peftcli.data.collate_padding_free`) is one row of N tokens made
of several examples. transformers keeps attention within each example with a block-diagonal
(N, N) mask, so every layer computes the attention of all N² query/key pairs and masks most of
them away. Here each example gets its own causal ``scaled_dot_product_attention`` call instead: for
k examples of n tokens, k·n²/2 pairs instead of (k·n)² — what FlashAttention's variable-length
kernels do on GPUs (Dao 2023, FlashAttention-2, §3.3), with PyTorch's own kernels on any device.

It is registered with transformers' attention interface as :data:`NAME` and used only when the
training forward passes the example bounds (``example_bounds``, a list of start offsets plus N);
every other call (padded batches, generation with a KV cache) goes to transformers' ``sdpa``
attention and mask unchanged.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

NAME = "peftcli_varlen_sdpa"


def example_bounds(position_ids: torch.Tensor) -> list[int] | None:
    """Start offsets of the examples in a padding-free row, plus its length: [0, n₁, n₁+n₂, ..., N].

    Args:
        position_ids: (1, N) long; each example's positions restart at 0.
    Returns:
        The bounds ([0, N] for a row of one example), or None for a batch of several rows or a row
        that does not start at position 0.
    """
    if position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return None
    return starts + [position_ids.shape[1]]


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     example_bounds: list[int] | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: per-example causal attention when
    ``example_bounds`` is given, else transformers' ``sdpa_attention_forward``.

    Args:
        query: (1, num_heads, N, head_dim); key, value: (1, num_key_value_heads, N, head_dim).
        attention_mask: the block-diagonal mask transformers built (ignored when bounds are given).
        example_bounds: see :func:`example_bounds`.
    Returns:
        (attn_output (1, N, num_heads, head_dim), None) — the layout ``sdpa_attention_forward`` returns.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if example_bounds is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    dtype, upcast = query.dtype, query.device.type == "cpu" and query.dtype == torch.bfloat16
    if upcast:
        # PyTorch's CPU flash-attention backward is ~2x slower in bfloat16 than in float32
        # (measured: 4.8 vs 2.6 ms for one 150-token example, 9 heads of 64); the casts are cheap.
        # Autocast would cast back to bfloat16, so it is off for these calls.
        query, key, value = query.float(), key.float(), value.float()
    gqa = query.shape[1] != key.shape[1]
    with torch.autocast("cpu", enabled=False) if upcast else nullcontext():
        outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                               dropout_p=dropout if module.training else 0.0, scale=scaling, enable_gqa=gqa)
                for s, e in zip(example_bounds[:-1], example_bounds[1:])]
    return torch.cat(outs, dim=2).to(dtype).transpose(1, 2).contiguous(), None


def use_varlen_attention(model: nn.Module) -> bool:
    """Switch a transformers model that uses ``sdpa`` attention to :data:`NAME` (registered here
    with the ``sdpa`` mask function). Returns whether it was switched (False for other attention
    implementations, which are left alone)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError):  # a model class that cannot switch: keep its sdpa and block mask
        return False
    return True
