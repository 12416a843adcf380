"""The card of :mod:`peftcli.methods.prompt_tuning` (torch-free; see :mod:`peftcli.methods.cards`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from peftcli.methods.cards import any_quantization

PEFT_TYPE = "PROMPT_TUNING"
PAPER = "Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning"
SUMMARY = "n trainable virtual token embeddings prepended to the input (init random, vocab or text)"
PADDING_FREE = False  # virtual tokens are added per row: padded rows only
CANNOT_MERGE = "its virtual tokens are extra inputs prepended to every sequence, not a change of any base weight"


class Config(BaseModel):
    """Recipe keys of ``method: {name: prompt_tuning}``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="number of virtual tokens n prepended to every input")
    init: Literal["random", "vocab", "text"] = Field(
        "random", description="random: uniform in [-0.5, 0.5]; vocab: embeddings of n random vocabulary tokens; "
        "text: embeddings of init_text, repeated or cut to n tokens",
    )
    init_text: str | None = Field(None, description="the text whose token embeddings start the prompt (init: text)")

    @model_validator(mode="after")
    def _text_with_text_init(self):
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"init_text is only used with init: text (init is {self.init})")
        return self


base_quantization = any_quantization
