"""The card of :mod:`peftcli.methods.lora` (torch-free; see :mod:`peftcli.methods.cards`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peftcli.methods.cards import any_quantization

PEFT_TYPE = "LORA"
PAPER = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models"
SUMMARY = "low-rank update B·A beside frozen Linear weights (options: DoRA, gaussian or PiSSA init)"
CANNOT_MERGE = None  # merges: W + scale·B·A
PADDING_FREE = True  # the token sequence is unchanged: padding-free rows work
FOUR_BIT = ("nf4", "fp4")  # recorded quantisations of a qlora base


class Config(BaseModel):
    """Recipe keys of ``method: {name: lora}``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["lora"] = "lora"
    r: int = Field(16, gt=0, description="rank of the update")
    alpha: float = Field(32.0, gt=0, description="scale numerator: the update is scaled by alpha/r (alpha/√r with rslora)")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="another r for some targets, e.g. {q_proj: 8}: a key is a regex that selects the modules and "
        "target parameters whose path ends with a match of it (from the path's start or after a dot); the first "
        "matching key wins, the others get r (HF peft's rank_pattern)",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="another alpha for some targets, e.g. {q_proj: 16}, keys as in rank_pattern",
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the input of the LoRA branch")
    target_modules: str | list[str] | None = Field(
        None,
        description="module names (suffix match), a regex (full match of the module path), "
        "or all-linear (every Linear but the output head, and the fused expert weights of MoE blocks); null: "
        "this model's attention query and value projections (a fused query/key/value Linear where the family "
        "fuses them), as in the LoRA paper, written out as names in the run's recipe.yaml and adapter files",
    )
    target_parameters: list[str] = Field(
        default_factory=list,
        description="nn.Parameter weights to adapt, e.g. mlp.experts.gate_up_proj (suffix match of the parameter "
        "path): one low-rank update per expert of a 3-D fused weight, or of a 2-D weight such as a router; no dropout there",
    )
    layers: list[int] | None = Field(None, description="only these transformer block indices")
    rslora: bool = Field(False, description="rank-stabilised scale alpha/√r")
    dora: bool = Field(False, description="DoRA: a trainable magnitude per output row times the direction of W + scale·B·A")
    lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+ (Hayou et al. 2024): B's learning rate = lr_ratio × train.lr (A, and any "
        "other trainable part, at train.lr; a DoRA magnitude with B, as in HF peft's create_loraplus_optimizer); "
        "the paper recommends about 16; null: one learning rate for all",
    )
    init: Literal["zeros", "gaussian", "pissa"] = Field(
        "zeros", description="zeros: Kaiming-uniform A, zero B; gaussian: A ~ N(0, 1/r²), zero B; "
        "pissa: A, B from the top-r singular vectors of W, the base keeps the residual (full-precision base only)",
    )

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, patterns: dict) -> dict:
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"{key!r} is not a regex ({e})") from None
            if not value > 0:  # NaN too
                raise ValueError(f"{key!r}: {value} must be > 0")
        return patterns

    @model_validator(mode="after")
    def _parameter_options(self):
        if self.target_parameters and (self.dora or self.init == "pissa"):
            raise ValueError(f"target_parameters cannot be combined with {'dora' if self.dora else 'init pissa'} "
                             "(they need a Linear weight); drop one of them")
        return self


base_quantization = any_quantization
