"""LoRA: low-rank adaptation of Linear layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    x ↦ W x + (alpha / r) · B A x          (§4.1; rsLoRA: alpha / √r, Kalajievo 2023, §3)

W (out × in) stays frozen; A (r × in) is Kaiming-uniform, B (out × r) starts at zero so the
adapted model starts equal to the base (§4.1). Each target ``nn.Linear`` (or bitsandbytes 4/8-bit
Linear, which subclass it) is replaced in its parent by a :class:`LoRALinear` that holds it as
``base_layer`` — the module names therefore match Hugging Face peft's, and so do the saved keys
(``base_model.model.<module>.lora_A.weight``).
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from peftcli.errors import UserError

PEFT_TYPE = "LORA"
PAPER = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models"
SUMMARY = "low-rank update B·A beside frozen Linear weights"
CAN_MERGE = True
KEY_PREFIX = "base_model.model."


class Config(BaseModel):
    """Recipe keys of ``method: {name: lora}``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["lora"] = "lora"
    r: int = Field(16, gt=0, description="rank of the update")
    alpha: float = Field(32.0, gt=0, description="scale numerator: the update is scaled by alpha/r (alpha/√r with rslora)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the input of the LoRA branch")
    target_modules: str | list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module names (suffix match), a regex (full match of the module path), "
        "or all-linear (every Linear but the output head)",
    )
    layers: list[int] | None = Field(None, description="only these transformer block indices")
    rslora: bool = Field(False, description="rank-stabilised scale alpha/√r")


# ---------------------------------------------------------------------------------------------
# the layer


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (Hu et al. 2021, §4.1).

    ``forward``: (..., in_features) -> (..., out_features) =
    ``base_layer(x) + scaling · lora_B(lora_A(dropout(x)))``.

    Args:
        base_layer: the frozen ``nn.Linear`` (or bitsandbytes ``Linear4bit``/``Linear8bitLt``).
        r: rank (> 0).
        alpha: scale numerator.
        dropout: dropout probability on the LoRA branch input (default 0).
        rslora: use alpha/√r instead of alpha/r (Kalajievo 2023, §3).

    The LoRA weights are float32 whatever the base dtype (QLoRA keeps adapters in 16/32-bit,
    Dettmers et al. 2023, §3); their output is cast to the base output's dtype.

    Raises:
        ValueError: r < 1.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        init_lora_A(self.lora_A.weight)
        init_lora_B(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (out_features, in_features), for code that reads ``.weight``."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, float32, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return result + (self.scaling * update).to(result.dtype)


def init_lora_A(weight: torch.Tensor) -> None:
    """Kaiming-uniform with a=√5, as nn.Linear's default (Hu et al. 2021, §4.1: "random Gaussian"
    in the paper; the reference implementation uses this uniform)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def init_lora_B(weight: torch.Tensor) -> None:
    """Zeros, so B·A = 0 and training starts from the base model (Hu et al. 2021, §4.1)."""
    nn.init.zeros_(weight)


# ---------------------------------------------------------------------------------------------
# finding targets

_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def is_linear(module: nn.Module) -> bool:
    """True for nn.Linear and its bitsandbytes subclasses (Linear4bit, Linear8bitLt)."""
    return isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)


def find_targets(model: nn.Module, target_modules: str | list[str], layers: list[int] | None = None) -> list[str]:
    """Names of the modules ``target_modules`` selects, with Hugging Face peft's matching rules:
    a list matches a module whose name equals an entry or ends with ``"." + entry``; a string is
    a regex that must match the whole module path; ``"all-linear"`` is every Linear except the
    output head. ``layers`` keeps only modules inside those block indices.

    Raises:
        UserError: nothing matched (with the Linear names that exist), or a match is not a Linear.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if target_modules == "all-linear":
            hit = is_linear(module) and module is not head
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit and layers is not None:
            m = _LAYER_INDEX.search("." + name + ".")
            hit = m is not None and int(m.group(1)) in layers
        if hit:
            if not is_linear(module):
                raise UserError(f"method.target_modules: {name} is a {type(module).__name__}, LoRA wraps Linear layers only")
            names.append(name)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise UserError(f"method.target_modules: {target_modules!r} matched no module (Linear names here: {', '.join(linear)})")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---------------------------------------------------------------------------------------------
# the method surface


def apply(model: nn.Module, cfg: Config) -> list[str]:
    """Freeze every base parameter and wrap each target Linear in a :class:`LoRALinear`.

    Returns the wrapped module names. Raises UserError when ``target_modules`` matches nothing.
    """
    targets = find_targets(model, cfg.target_modules, cfg.layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        base = model.get_submodule(name)
        # keep the mode the base layer was in: LoRA dropout is off on a model in eval mode
        _set_submodule(model, name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora).train(base.training))
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear for every wrapped layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights in HF peft key naming:
    ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        out[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    return out


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA weights (HF peft naming; ``.default`` adapter names accepted) into the
    wrapped model.

    Raises:
        UserError: a wrapped layer has no saved weights, a saved key matches no layer, or a
        shape differs (an adapter for another model or rank).
    """
    want = {}
    for name, layer in lora_layers(model).items():
        want[f"{name}.lora_A.weight"] = layer.lora_A.weight
        want[f"{name}.lora_B.weight"] = layer.lora_B.weight
    got = {k.removeprefix(KEY_PREFIX).replace(".default.", "."): v for k, v in sd.items()}
    unknown = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    if unknown or missing:
        raise UserError(f"adapter weights do not fit this model: {'unexpected ' + unknown[0] if unknown else 'missing ' + missing[0]}")
    with torch.no_grad():
        for k, param in want.items():
            if got[k].shape != param.shape:
                raise UserError(f"adapter weight {k} has shape {tuple(got[k].shape)}, the model needs {tuple(param.shape)}")
            param.copy_(got[k].to(param.dtype))


def adapter_config(cfg: Config) -> dict:
    """The HF peft ``LoraConfig`` fields for ``adapter_config.json`` (without the base model)."""
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "layers_to_transform": cfg.layers,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "inference_mode": True,
    }


def config_from_adapter(d: dict) -> Config:
    """Our config from an HF peft ``adapter_config.json`` dict (e.g. an adapter HF peft trained).

    Raises:
        UserError: options we do not implement (DoRA, bias training, modules_to_save).
    """
    if d.get("use_dora"):
        raise UserError("adapter_config.json: use_dora is not supported yet")
    if d.get("bias", "none") != "none" or d.get("modules_to_save"):
        raise UserError("adapter_config.json: bias / modules_to_save are not supported yet")
    targets = d.get("target_modules") or ["q_proj", "v_proj"]
    return Config(
        r=d["r"], alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
        target_modules=targets if isinstance(targets, str) else list(targets),
        layers=d.get("layers_to_transform"), rslora=bool(d.get("use_rslora", False)),
    )


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put a plain ``nn.Linear`` back.

    The sum W + scaling·B·A is computed in float32 and rounded once to the output dtype; a
    4/8-bit base is dequantised first (the weights the adapter was trained against, Dettmers
    et al. 2023, §3), so the merged Linear is full precision (float32 for a quantised base,
    else the base dtype). A weight shared with another module (tied embeddings) is never
    written in place: the merged Linear gets its own storage. Returns ``model``.
    """
    from peftcli.models import dequantized_weight

    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        w = dequantized_weight(base)  # (out, in) float32
        dtype = torch.float32 if _is_quantized(base) else base.weight.dtype
        merged = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            merged.weight.copy_((w + layer.delta_weight().to(w.device)).to(dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias.float().to(dtype))
        merged.weight.requires_grad_(False)
        _set_submodule(model, name, merged)
    return model


def _is_quantized(linear: nn.Module) -> bool:
    return type(linear) is not nn.Linear and type(linear).__module__.startswith("bitsandbytes")
