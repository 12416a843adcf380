"""The card of :mod:`peftcli.methods.adapter` (torch-free; see :mod:`peftcli.methods.cards`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from peftcli.methods.cards import any_quantization

PEFT_TYPE = "BOTTLENECK"
PAPER = "Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP; pfeiffer: Pfeiffer et al. 2020"
SUMMARY = "residual bottleneck MLPs after attention and/or FFN outputs"
PADDING_FREE = True  # the token sequence is unchanged: padding-free rows work
CANNOT_MERGE = "a bottleneck adapter adds a non-linear block; it cannot be folded into a Linear weight"


class Config(BaseModel):
    """Recipe keys of ``method: {name: adapter}``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["adapter"] = "adapter"
    variant: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and after the feed-forward block; pfeiffer: after the feed-forward block only")
    reduction_factor: int = Field(16, gt=0, description="bottleneck size = hidden_size // reduction_factor")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="activation inside the bottleneck")
    layers: list[int] | None = Field(None, description="only these transformer block indices")


base_quantization = any_quantization
