"""QLoRA: LoRA on a base loaded in 4-bit NormalFloat (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314).

The base is quantised to NF4 with double quantisation when it is loaded (``peftcli.models``,
through bitsandbytes; the recipe resolves ``model.quantization`` to ``nf4``), and the LoRA update
of :mod:`peftcli.methods.lora` wraps the bitsandbytes ``Linear4bit`` layers unchanged: the
adapters stay float32 (§3, "LoRA adapters in 16-bit", here 32 on CPU). Merging dequantises W
first, so the merged weight is dequant(W_nf4) + (alpha/r)·B·A — what the adapter was trained
against. DoRA (``dora: true``) works the same way, its norm taken over the dequantised W;
``init: pissa`` is refused (its residual W − s·B·A needs a full-precision base).
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from peftcli.methods import common, lora
from peftcli.methods.lora import adapter_config, apply, file_fields, load_state_dict, merge, state_dict  # noqa: F401

PEFT_TYPE = lora.PEFT_TYPE
PAPER = "Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs"
SUMMARY = "LoRA on a 4-bit NF4 base (double quant), adapters in float32"
CANNOT_MERGE = lora.CANNOT_MERGE  # merges as LoRA, into the dequantised W
PADDING_FREE = True  # the token sequence is unchanged: padding-free rows work


class Config(lora.Config):
    """Recipe keys of ``method: {name: qlora}``: the LoRA keys; the base is loaded in NF4."""

    name: Literal["qlora"] = "qlora"

    @field_validator("init")
    @classmethod
    def _no_pissa(cls, init: str) -> str:
        if init == "pissa":
            raise ValueError("pissa needs a full-precision base (it replaces W by the residual W - scale·B·A); "
                             "use method lora with init pissa, or init zeros/gaussian with qlora")
        return init


def config_from_adapter(d: dict) -> Config:
    """Our config from an HF peft LoRA ``adapter_config.json`` dict."""
    return Config(**lora.config_from_adapter(d).model_dump(exclude={"name"}))


def base_quantization(quantization: str) -> str:
    """The base QLoRA trains on: 4-bit (``nf4`` or ``fp4``, as the recipe says); ``none``
    resolves to ``nf4`` (Dettmers et al. 2023, §3).

    Raises:
        ValueError: another quantisation (8-bit).
    """
    if quantization in lora.FOUR_BIT:
        return quantization
    if quantization != "none":
        raise ValueError(f"method qlora needs model.quantization nf4 or fp4, not {quantization}")
    return "nf4"


def reads_adapter(cfg: dict) -> bool:
    """Whether ``qlora`` loads this ``adapter_config.json`` dict: a ``LORA`` file whose recorded
    base is 4-bit (:func:`peftcli.methods.lora.recorded_4bit`)."""
    return common.peft_type(cfg) == PEFT_TYPE and lora.recorded_4bit(cfg)
