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

from peftcli.methods import common, lora
from peftcli.methods.cards.qlora import CANNOT_MERGE, PADDING_FREE, PAPER, PEFT_TYPE, SUMMARY, Config, base_quantization  # noqa: F401  (its card)
from peftcli.methods.lora import adapter_config, apply, file_fields, load_state_dict, lr_groups, merge, state_dict  # noqa: F401


def config_from_adapter(d: dict) -> Config:
    """Our config from an HF peft LoRA ``adapter_config.json`` dict."""
    return Config(**lora.config_from_adapter(d).model_dump(exclude={"name"}))


def reads_adapter(cfg: dict) -> bool:
    """Whether ``qlora`` loads this ``adapter_config.json`` dict: a ``LORA`` file whose recorded
    base is 4-bit (:func:`peftcli.methods.lora.recorded_4bit`)."""
    return common.peft_type(cfg) == PEFT_TYPE and lora.recorded_4bit(cfg)
