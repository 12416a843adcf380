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
attention and mask unchanged. What each example may attend to is read from the mask
transformers built for the row, so a layer's sliding window (Mistral, Qwen2, Gemma2/3 local
layers) or chunking is kept; a row whose mask does not split into its examples, and a call with
an attention option not computed here (a logit softcap, attention sinks), get transformers'
``sdpa`` on the whole row instead.
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


# Keyword arguments transformers passes to an attention function that are not attention options:
# positions and cache bookkeeping, and the variable-length bounds flash-attention kernels read
# (the mask already says what they say).
NOT_OPTIONS = frozenset({"position_ids", "use_cache", "cache_position", "past_key_values", "cache", "layer_idx",
                         "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal"})
# Options transformers builds into the mask (for sdpa it reads them from there, and so do we).
IN_THE_MASK = frozenset({"sliding_window"})


def options_not_computed(module: nn.Module, kwargs: dict) -> list[str]:
    """The attention options of a call that per-example attention does not compute: every keyword
    argument in use (not None or False) other than :data:`NOT_OPTIONS` and :data:`IN_THE_MASK`
    (e.g. Gemma2's ``softcap``, gpt-oss's ``s_aux`` sinks, ``output_attentions``, a
    ``position_bias``), and ``is_causal`` when the call or the module says False."""
    used = [k for k, v in kwargs.items() if k not in NOT_OPTIONS | IN_THE_MASK and v is not None and v is not False]
    causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if causal is None else causal):
        used.append("is_causal")
    return used


def example_masks(attention_mask: torch.Tensor | None, bounds: list[int]) -> list[torch.Tensor | None] | None:
    """What each example's attention call needs, read from the mask transformers built for the row.

    Args:
        attention_mask: None (plain causal attention) or the boolean (1, 1, N, N) mask (True: attend)
            of transformers' ``sdpa`` mask function: causal, block-diagonal over the examples, and
            banded where the layer has a sliding window (or chunked, or whatever the model asks).
        bounds: the examples' bounds, see :func:`example_bounds`.
    Returns:
        per example [s, e), None where its (e-s, e-s) block of the mask is plain causal attention,
        else that block; or None when the row cannot be split: the mask lets a query attend to
        another example, leaves a query nothing to attend to, or is not one boolean (N, N) mask.
        Cached on the mask tensor: every layer of a forward gets the same one.
    """
    if attention_mask is None:
        return [None] * (len(bounds) - 1)
    cached = getattr(attention_mask, "_peftcli_examples", None)
    if cached is not None and cached[0] == bounds:
        return cached[1]
    plan = None
    if attention_mask.dtype == torch.bool and attention_mask.dim() == 4 and attention_mask.shape[:2] == (1, 1):
        plan = _split(attention_mask[0, 0], bounds)
    attention_mask._peftcli_examples = (list(bounds), plan)
    return plan


def _split(mask: torch.Tensor, bounds: list[int]) -> list[torch.Tensor | None] | None:
    plan = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        block = mask[s:e, s:e]  # (n, n)
        if mask[s:e, :s].any() or mask[s:e, e:].any() or not block.any(-1).all():
            return None
        causal = torch.ones(e - s, e - s, dtype=torch.bool, device=mask.device).tril_()
        plan.append(None if torch.equal(block, causal) else block)
    return plan


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     example_bounds: list[int] | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: per-example attention when ``example_bounds``
    is given and the row splits (see :func:`example_masks`), else transformers'
    ``sdpa_attention_forward`` on the whole row with its mask — exactly what the model computed
    before :func:`use_varlen_attention`. Each example's call is causal (``is_causal``), or takes
    its block of the mask where that is not plain causal (a sliding window shorter than the
    example). A call with an option this does not compute (:func:`options_not_computed`) also
    goes to ``sdpa_attention_forward``, which computes it or refuses it as transformers does:
    nothing is dropped silently.

    Args:
        query: (1, num_heads, N, head_dim); key, value: (1, num_key_value_heads, N, head_dim).
        attention_mask: the mask transformers built (boolean (1, 1, N, N), or None).
        example_bounds: see :func:`example_bounds`.
    Returns:
        (attn_output (1, N, num_heads, head_dim), None) — the layout ``sdpa_attention_forward`` returns.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = None
    if example_bounds is not None and query.shape[2] == key.shape[2] and not options_not_computed(module, kwargs):
        plan = example_masks(attention_mask, example_bounds)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    dtype = query.dtype
    upcast = query.device.type == "cpu" and (query.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu"))
    if upcast:
        # PyTorch's CPU flash-attention backward is 2-4x slower in bfloat16 than in float32
        # (measured: 4.8 vs 2.6 ms for one 150-token example, 9 heads of 64; 291 vs 71 ms a step of
        # workload A); the casts are cheap. CPU autocast runs scaled_dot_product_attention in
        # bfloat16 even on float32 inputs (q and k come out of the rotary embedding in float32: its
        # cos/sin follow the float32 residual stream), so it is off for these calls.
        query, key, value = query.float(), key.float(), value.float()
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    # split, not slices: the backward of a split is one concatenation of the examples' gradients,
    # where each slice's would be a zero tensor of the whole row with the slice added into it
    lengths = [e - s for s, e in zip(example_bounds[:-1], example_bounds[1:])]
    with torch.autocast("cpu", enabled=False) if upcast else nullcontext():
        outs = [F.scaled_dot_product_attention(q, k, v, attn_mask=block, is_causal=block is None, dropout_p=p,
                                               scale=scaling, enable_gqa=gqa).transpose(1, 2)
                for q, k, v, block in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), plan)]
    # concatenated along the tokens of the (1, N, heads, head_dim) layout: contiguous as it is made
    return torch.cat(outs, dim=1).to(dtype), None


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
