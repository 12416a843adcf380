"""The card of :mod:`peftcli.methods.ia3` (torch-free; see :mod:`peftcli.methods.cards`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from peftcli.methods.cards import any_quantization

PEFT_TYPE = "IA3"
PAPER = "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
SUMMARY = "learned rescaling vectors on keys, values and the FFN activation"
CANNOT_MERGE = None  # merges: each vector scales its W
PADDING_FREE = True  # the token sequence is unchanged: padding-free rows work


class Config(BaseModel):
    """Recipe keys of ``method: {name: ia3}``. Null (the default) means the paper's layers of
    this model (:func:`default_targets`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["ia3"] = "ia3"
    target_modules: str | list[str] | None = Field(
        None,
        description="Linear modules to rescale: names (suffix match), a regex (full match of the "
        "module path), or all-linear; null: this model's attention keys and values (a fused query/key/value "
        "Linear where the family fuses them) and feed-forward output projections, as in the IA3 paper, "
        "written out as names in the run's recipe.yaml and adapter files",
    )
    feedforward_modules: str | list[str] | None = Field(
        None,
        description="targets whose input (not output) is rescaled: names (the module path ends "
        "with the name) or a regex (full match); a list must be a subset of target_modules; "
        "null: the feed-forward output projections among the targets",
    )

    @model_validator(mode="after")
    def _feedforward_within_targets(self):
        # HF peft's rule (IA3Config.__post_init__), checked when both are lists
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules {self.target_modules}")
        return self


base_quantization = any_quantization
