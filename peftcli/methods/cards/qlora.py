"""The card of :mod:`peftcli.methods.qlora` (torch-free; see :mod:`peftcli.methods.cards`)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from peftcli.methods.cards import lora

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
