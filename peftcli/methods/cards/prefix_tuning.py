"""The card of :mod:`peftcli.methods.prefix_tuning` (torch-free; see :mod:`peftcli.methods.cards`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from peftcli.methods.cards import any_quantization

PEFT_TYPE = "PREFIX_TUNING"
PAPER = "Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation"
SUMMARY = "trainable key/value prefixes for every attention layer (optional MLP reparameterisation)"
PADDING_FREE = False  # virtual tokens are added per row: padded rows only
CANNOT_MERGE = ("a prefix adds virtual key/value positions to every attention layer; "
                        "it is not a change of any weight")


class Config(BaseModel):
    """Recipe keys of ``method: {name: prefix_tuning}``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="prefix length n: virtual key/value positions per layer")
    projection: bool = Field(False, description="reparameterise the prefix through an MLP while training (§4.3); "
                             "folded into the plain prefix when saved")
    encoder_hidden_size: int | None = Field(None, gt=0, description="hidden width of the projection MLP "
                                            "(default: kv_heads · head_dim, as HF peft)")


base_quantization = any_quantization
