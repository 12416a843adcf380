"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
§2.1, https://arxiv.org/abs/1902.00751; FFN-only placement: Pfeiffer et al. 2020, "AdapterFusion",
§3, https://arxiv.org/abs/2005.00247).

    y ↦ y + W_up · act(W_down · y + b_down) + b_up
    W_down: (m, d), b_down: (m,), W_up: (d, m), b_up: (d,);   d = hidden size, m = d // reduction_factor

A small bottleneck MLP with a residual, applied to the output of a sub-layer before it is added
back to the block's residual stream (Houlsby §2.1, Fig. 2). ``variant: houlsby`` places one
after the attention block's output projection and one after the feed-forward block's output
projection in every transformer block; ``variant: pfeiffer`` only after the feed-forward output
(Pfeiffer et al. 2020, §3). ``W_up`` and ``b_up`` start at zero, so every adapter starts as the
identity and the adapted model starts equal to the base (Houlsby §2.1, "near-identity
initialization"); ``W_down`` is Kaiming-uniform (nn.Linear's default, as LoRA's A), ``b_down`` zero.

Blocks are found by structure, not class names: the decoder blocks are the entries of the
largest ``nn.ModuleList`` whose entries have an attention child (name containing ``attn`` /
``attention``) and a feed-forward child (``mlp`` / ``feed_forward`` / ``ffn``; or the block
itself, as in OPT), each holding an output linear layer (``nn.Linear``, or GPT-2's ``Conv1D``)
with a known name (``o_proj``, ``out_proj``, ``dense``, ``c_proj``, ... / ``down_proj``, ``fc2``,
``w2``, ``c_proj``, ...). The output Linear is wrapped in place by a
:class:`BottleneckAdapter`, so module paths stay stable and saved keys read
``base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight``. A mixture-of-experts
feed-forward block (fused 3-D expert weights, or an ``experts`` child: Mixtral, Qwen3-MoE) has
no single output Linear: the whole block is wrapped, so the adapter acts on the routed sum of
the experts (``...layers.0.mlp.adapter_down.weight``).

HF peft has no such method: files use ``peft_type: BOTTLENECK`` (see ``docs/formats.md``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import common
from peftcli.methods.cards.adapter import CANNOT_MERGE, PADDING_FREE, PAPER, PEFT_TYPE, SUMMARY, Config, base_quantization  # noqa: F401  (its card)
from peftcli.methods.common import KEY_PREFIX
from peftcli.models import is_linear, linear_features

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
ATTENTION_NAMES = ("attn", "attention")
MLP_NAMES = ("mlp", "feed_forward", "feedforward", "ffn")
ATTENTION_OUT = ("o_proj", "out_proj", "dense", "c_proj", "wo", "proj")
MLP_OUT = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "wo", "fc_out", "proj_out")


# ---------------------------------------------------------------------------------------------
# the layer


class BottleneckAdapter(nn.Module):
    """A frozen output Linear followed by a residual bottleneck MLP (Houlsby et al. 2019, §2.1).

    ``forward``: (..., in_features) -> (..., out_features) =
    ``y + adapter_up(act(adapter_down(y)))`` with ``y = base_layer(x)``.

    Args:
        base_layer: the frozen output projection (``nn.Linear``, a bitsandbytes subclass, or a
            transformers ``Conv1D``); its ``out_features`` is the hidden size d. Or any module
            whose output is (..., d) (a mixture-of-experts block), with ``hidden_size`` given.
        reduction_factor: bottleneck size m = d // reduction_factor.
        non_linearity: ``relu`` | ``gelu`` | ``silu`` | ``tanh`` (default relu).
        hidden_size: d, for a base that is not a Linear.

    ``adapter_down`` (m × d, bias m) and ``adapter_up`` (d × m, bias d) are float32 whatever the
    base dtype; the bottleneck runs in float32 and is cast to ``y``'s dtype before the sum.

    Raises:
        UserError: reduction_factor larger than d (an empty bottleneck), or an unknown non-linearity.
    """

    def __init__(self, base_layer: nn.Linear, reduction_factor: int, non_linearity: str = "relu",
                 hidden_size: int | None = None):
        super().__init__()
        in_features, hidden = linear_features(base_layer) if hidden_size is None else (hidden_size, hidden_size)
        bottleneck = hidden // reduction_factor
        if bottleneck < 1:
            raise UserError(f"method.reduction_factor: {reduction_factor} exceeds the hidden size {hidden} (empty bottleneck)")
        if non_linearity not in ACTIVATIONS:
            raise UserError(f"method.non_linearity: {non_linearity!r} (choose from {', '.join(ACTIVATIONS)})")
        self.base_layer = base_layer
        self.in_features, self.out_features, self.bottleneck = in_features, hidden, bottleneck
        device = next(base_layer.parameters()).device
        self.adapter_down = nn.Linear(hidden, bottleneck, device=device, dtype=torch.float32)
        self.act = ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck, hidden, device=device, dtype=torch.float32)
        init_down(self.adapter_down)
        init_up(self.adapter_up)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as the base stores it, (out_features, in_features) ((in, out) for a
        Conv1D), for code that reads ``.weight``."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., d)
        h = self.act(self.adapter_down(y.to(self.adapter_down.weight.dtype)))  # (..., m)
        return y + self.adapter_up(h).to(y.dtype)


def init_down(linear: nn.Linear) -> None:
    """Kaiming-uniform weight (a=√5, nn.Linear's default), zero bias: the bottleneck sees a
    non-degenerate projection from the first step."""
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    nn.init.zeros_(linear.bias)


def init_up(linear: nn.Linear) -> None:
    """Zeros, so the adapter starts as the identity (Houlsby et al. 2019, §2.1)."""
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


# ---------------------------------------------------------------------------------------------
# finding the blocks by structure


def _named_like(name: str, words: tuple[str, ...]) -> bool:
    name = name.lower()
    return any(w in name for w in words) and "norm" not in name


def _output_linear(sub: nn.Module, out_names: tuple[str, ...]) -> str | None:
    """The path (inside ``sub``) of its output Linear: the one whose last name is the first of
    ``out_names`` present, or None."""
    linears = {n: m for n, m in sub.named_modules() if n and is_linear(m)}
    for want in out_names:
        hits = [n for n in linears if n.rsplit(".", 1)[-1] == want]
        if len(hits) == 1:
            return hits[0]
    return None


def is_moe(module: nn.Module) -> bool:
    """True for a mixture-of-experts block: it holds fused 3-D expert weights or an ``experts`` child."""
    return any(p.ndim == 3 for p in module.parameters()) or any(n.rsplit(".", 1)[-1] == "experts" for n, _ in module.named_modules())


def _block_parts(block: nn.Module) -> tuple[str, str] | None:
    """(attention output Linear, feed-forward output) paths inside ``block``, or None; the
    feed-forward output of a mixture-of-experts block is the block itself."""
    attn = mlp = None
    for child_name, child in block.named_children():
        if attn is None and _named_like(child_name, ATTENTION_NAMES):
            out = _output_linear(child, ATTENTION_OUT)
            attn = f"{child_name}.{out}" if out else None
        elif mlp is None and _named_like(child_name, MLP_NAMES) and is_moe(child):
            mlp = child_name
        elif mlp is None and _named_like(child_name, MLP_NAMES):
            out = _output_linear(child, MLP_OUT)
            mlp = f"{child_name}.{out}" if out else None
    if mlp is None:  # feed-forward Linears held by the block itself (OPT: fc1, fc2)
        mlp = next((n for n in MLP_OUT if is_linear(getattr(block, n, None))), None)
    return (attn, mlp) if attn and mlp else None


def find_blocks(model: nn.Module) -> tuple[str, list[tuple[str, str]]]:
    """The transformer blocks: the path of the largest ``nn.ModuleList`` whose every entry has
    an attention and a feed-forward child with recognisable output Linears, and for each block
    the (attention output, feed-forward output) paths relative to the block.

    Raises:
        UserError: no such ModuleList (an architecture this method cannot handle), naming what
        it looked for.
    """
    best: tuple[str, list[tuple[str, str]]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        parts = [_block_parts(block) for block in module]
        if all(parts) and (best is None or len(parts) > len(best[1])):
            best = (name, parts)
    if best is None:
        raise UserError(
            f"method adapter: cannot find the transformer blocks of this {type(model).__name__}: expected an nn.ModuleList "
            f"of blocks, each with an attention child ({'/'.join(ATTENTION_NAMES)}) ending in a Linear "
            f"({'/'.join(ATTENTION_OUT)}) and a feed-forward child ({'/'.join(MLP_NAMES)}) ending in a Linear "
            f"({'/'.join(MLP_OUT)})")
    return best


def find_targets(model: nn.Module, cfg: Config) -> list[str]:
    """Paths of the output Linears to wrap: per selected block, the attention output (houlsby
    only) and the feed-forward output.

    Raises:
        UserError: no recognisable blocks, or a ``layers`` index out of range.
    """
    blocks_path, parts = find_blocks(model)
    indices = range(len(parts)) if cfg.layers is None else cfg.layers
    bad = [i for i in indices if not 0 <= i < len(parts)]
    if bad:
        raise UserError(f"method.layers: {bad[0]} is out of range (the model has blocks 0..{len(parts) - 1})")
    targets = []
    for i in sorted(set(indices)):
        attn, mlp = parts[i]
        prefix = f"{blocks_path}.{i}." if blocks_path else f"{i}."
        targets += ([prefix + attn] if cfg.variant == "houlsby" else []) + [prefix + mlp]
    return targets


# ---------------------------------------------------------------------------------------------
# the method surface


def apply(model: nn.Module, cfg: Config, tokenizer=None) -> list[str]:
    """Freeze every base parameter and wrap each selected output Linear in a
    :class:`BottleneckAdapter`: 2 per block for houlsby, 1 for pfeiffer. ``tokenizer`` is not used.

    Returns the wrapped module names. Raises UserError for an architecture without recognisable
    blocks, a ``layers`` index out of range, or a reduction factor above the hidden size.
    """
    targets = find_targets(model, cfg)
    common.freeze_base(model)
    for name in targets:
        base = model.get_submodule(name)
        hidden = None if isinstance(base, nn.Linear) else model.get_input_embeddings().embedding_dim  # an MoE block
        common.replace(model, name, BottleneckAdapter(base, cfg.reduction_factor, cfg.non_linearity, hidden))
    return targets


def adapter_layers(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """name -> BottleneckAdapter for every wrapped layer of ``model``."""
    return common.layers_of(model, BottleneckAdapter)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<module>.adapter_{down,up}.{weight,bias}`` -> parameter, for every adapter."""
    return {f"{name}.{part}.{p}": getattr(getattr(layer, part), p)
            for name, layer in adapter_layers(model).items()
            for part in ("adapter_down", "adapter_up") for p in ("weight", "bias")}


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights, HF-peft-style naming: ``base_model.model.<module>.adapter_down.weight``
    (m, d), ``.adapter_down.bias`` (m,), ``.adapter_up.weight`` (d, m), ``.adapter_up.bias`` (d,)."""
    return {KEY_PREFIX + k: v.detach().cpu().contiguous() for k, v in _params(model).items()}


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights into the wrapped model.

    Raises:
        UserError: a wrapped layer has no saved weights, a saved key matches no layer, or a shape
        differs (an adapter for another model or reduction factor).
    """
    want = _params(model)
    got = {k.removeprefix(KEY_PREFIX): v for k, v in sd.items()}
    common.check_keys(got, want)
    common.copy_weights(want, got)


def adapter_config(cfg: Config) -> dict:
    """Our ``BOTTLENECK`` fields for ``adapter_config.json`` (without the base model); enough to
    rebuild the adapter without the ``peftcli`` block."""
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "variant": cfg.variant,
        "reduction_factor": cfg.reduction_factor,
        "non_linearity": cfg.non_linearity,
        "layers_to_transform": cfg.layers,
        "adapter_bias": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def config_from_adapter(d: dict) -> Config:
    """Our config from a ``BOTTLENECK`` ``adapter_config.json`` dict.

    Raises:
        UserError: a missing or invalid field.
    """
    try:
        return Config(variant=d["variant"], reduction_factor=d["reduction_factor"],
                      non_linearity=d.get("non_linearity", "relu"), layers=d.get("layers_to_transform"))
    except KeyError as e:
        raise UserError(f"adapter_config.json: BOTTLENECK config has no {e.args[0]!r}") from None
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        err = e.errors()[0]
        raise UserError(f"adapter_config.json: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


file_fields = common.no_file_fields
reads_adapter = common.reads_peft_type(PEFT_TYPE)
lr_groups = common.one_lr_group


def merge(model: nn.Module) -> nn.Module:
    """Not possible (:data:`CANNOT_MERGE`).

    Raises:
        UserError: always, with :data:`CANNOT_MERGE`.
    """
    raise common.refuse_merge("adapter", CANNOT_MERGE)
