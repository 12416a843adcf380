"""The card of :mod:`peftcli.methods.p_tuning` (torch-free; see :mod:`peftcli.methods.cards`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from peftcli.methods.cards import any_quantization

PEFT_TYPE = "P_TUNING"
PAPER = "Liu et al. 2021, GPT Understands, Too"
SUMMARY = "virtual token embeddings produced by a trainable MLP or LSTM prompt encoder"
PADDING_FREE = False  # virtual tokens are added per row: padded rows only
CANNOT_MERGE = "its virtual tokens are extra inputs prepended to every sequence, not a change of any base weight"


class Config(BaseModel):
    """Recipe keys of ``method: {name: p_tuning}``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="number of virtual tokens n prepended to every input")
    encoder: Literal["mlp", "lstm"] = Field(
        "mlp", description="mlp: 3 Linears with ReLU; lstm: 2-layer bidirectional LSTM then a 2-Linear MLP")
    encoder_hidden_size: int | None = Field(None, gt=0, description="hidden width of the encoder (default: the model's hidden size)")


base_quantization = any_quantization
