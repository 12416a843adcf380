"""Recipe schema, loading, `--set a.b=c` overrides and the resolved dump.

A recipe is plain data: it is validated once here (pydantic, unknown keys are errors) and the
resolved :class:`Recipe` is passed down to every other module. Method-specific keys live beside
``method.name`` and are validated by that method's own config class (see ``peftcli.methods``).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from peftcli.errors import UserError
from peftcli.methods import CARDS, METHOD_CONFIGS
from peftcli.tokens import CHAT_TEMPLATES

# accelerate's trackers (accelerate.utils.LoggerType, less "all"), named here so the schema loads
# without importing accelerate (a test keeps the two equal)
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The frozen base model."""

    name_or_path: str = Field("smollm2-135m", description="alias of the embedded default (smollm2-135m), a local HF dir, or a hub id")
    quantization: Literal["none", "nf4", "fp4", "int8"] = Field("none", description="load the frozen base through bitsandbytes")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the frozen base weights (and 4-bit compute dtype); auto: float32 for a "
                            "full-precision base; a 4-bit base computes in bfloat16 where the run autocasts to bf16 "
                            "(a CPU with bf16 units, a GPU with bf16), else float32")
    double_quant: bool = Field(True, description="4-bit only: quantise the quantisation constants too (Dettmers et al. 2023, §3)")
    trust_remote_code: bool = Field(False, description="allow model code from the model dir; off unless set")


class DataSource(_Strict):
    """One data source: a file, a ``save_to_disk`` dir or a cached hub dataset (see peftcli.sources)."""

    path: str = Field(description="a .jsonl, .json, .csv, .parquet, .txt or .arrow file, a datasets save_to_disk dir, "
                                  "or a hub dataset id already in the local datasets cache (nothing is downloaded)")
    format: Literal["alpaca", "completion", "chat", "sharegpt", "text", "tokenized", "preference"] = Field(
        "alpaca", description="row layout, see Data formats (preference: prompt, chosen, rejected; train.objective dpo or orpo)")
    columns: dict[str, str] = Field(default_factory=dict, description="the format's field names mapped to the file's, "
                                    "e.g. {instruction: question, output: answer}; unmapped fields keep their names")
    weight: float = Field(1.0, gt=0, description="train only: how many times each of this source's examples is used per "
                          "epoch (2: twice; 0.5: a half drawn once with train.seed); mixes several train sources")
    split: str | None = Field(None, description="the split of a save_to_disk DatasetDict or a hub dataset (default train)")


# one source, or a list of them (the tag keeps error locations free of pydantic's union member names)
Sources = Annotated[
    Union[Annotated[DataSource, Tag("source")], Annotated[list[DataSource], Field(min_length=1), Tag("sources")]],
    Discriminator(lambda v: "sources" if isinstance(v, list) else "source"),
]
_SOURCE_TAGS = ("source", "sources")


class DataConfig(_Strict):
    train: Sources = Field(description="training data: one source, or a list of sources mixed by their weight")
    eval: Sources | None = Field(None, description="held-out data (loss, perplexity, exact match): one source or a list, "
                                 "scored together")
    eval_split: float | None = Field(None, gt=0, lt=1, description="hold out this fraction of train when no eval file is given")
    max_seq_len: int = Field(512, gt=1, description="tokens per example: longer rows are cut (and counted); text is split "
                             "into windows of this many tokens")
    text_overlap: int = Field(0, ge=0, description="text only: tokens each window repeats from the one before, as context "
                              "(not learned twice); must be less than max_seq_len")
    train_on_prompt: bool = Field(False, description="also supervise prompt tokens")
    padding_free: bool = Field(True, description="concatenate each micro-batch's examples into one row, attention kept within "
                               "each example (same loss and gradients as padded rows, no padding computed); methods that add "
                               "virtual tokens (prompt_tuning, p_tuning, prefix_tuning) always use padded rows")
    pad_to_multiple_of: int = Field(64, gt=0, description="round each micro-batch's length up to a multiple of this (the extra "
                                    "positions are padding, never supervised) so shapes repeat and compiled kernels are reused; "
                                    "1 turns it off")
    packing: bool = Field(False, description="pack several examples into each row of up to max_seq_len tokens (first-fit "
                          "decreasing), attention kept within each example; train.micro_batch_size then counts rows. Same "
                          "loss as unpacked training on the same examples; needs padding_free; eval stays unpacked")
    max_samples: int | None = Field(None, gt=0, description="use only the first N rows of each train source")
    chat_template: str | None = Field(
        None, description=f"chat rows' template: null = the tokenizer's own, a name ({', '.join(CHAT_TEMPLATES)}) or a "
                          "Jinja string; recorded in the run, so eval, generate and merge use the same one")
    system_prompt: str | None = Field(
        None, description="chat and sharegpt only: a system message put first in every conversation that has none (and in "
                          "peft generate)")

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v):
        if v is not None and v not in CHAT_TEMPLATES and "{{" not in v and "{%" not in v:
            raise ValueError(f"unknown template name {v!r}: choose from {', '.join(CHAT_TEMPLATES)} or give a Jinja string")
        return v

    @field_validator("eval")
    @classmethod
    def _eval_sources(cls, v):
        sources = v if isinstance(v, list) else [v] if v is not None else []
        if any(s.weight != 1 for s in sources):
            raise ValueError("weight mixes train sources; eval sources are all scored together, remove their weight")
        if len({s.format for s in sources}) > 1:
            raise ValueError("eval sources must share one format (eval is scored and generated in one format)")
        return v

    @model_validator(mode="after")
    def _one_eval(self):
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("give data.eval or data.eval_split, not both")
        if self.packing and not self.padding_free:
            raise ValueError("packing: packed rows are padding-free rows; set padding_free: true or packing: false")
        if self.system_prompt is not None and not {"chat", "sharegpt"} & {s.format for s in self.train_sources + self.eval_sources}:
            raise ValueError("system_prompt needs chat rows: set data.train.format to chat or sharegpt, or remove data.system_prompt")
        if self.text_overlap >= self.max_seq_len:
            raise ValueError(f"text_overlap {self.text_overlap} must be less than max_seq_len {self.max_seq_len}")
        if self.eval_split is not None and len({s.format for s in self.train_sources}) > 1:
            raise ValueError("eval_split: the train sources have different formats; give data.eval instead")
        return self

    @property
    def train_sources(self) -> list[DataSource]:
        """``train`` as a list (one source: a list of one)."""
        return self.train if isinstance(self.train, list) else [self.train]

    @property
    def eval_sources(self) -> list[DataSource]:
        """``eval`` as a list (none: empty)."""
        return [] if self.eval is None else self.eval if isinstance(self.eval, list) else [self.eval]

    @property
    def train_format(self) -> str:
        """The format prompts are built in outside training (``peft generate``, ``peft chat``): the
        first train source's."""
        return self.train_sources[0].format



class TrainConfig(_Strict):
    objective: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="sft: next-token cross-entropy on the answers; dpo (Rafailov et al. 2023) or orpo (Hong et al. "
                           "2024): preference tuning on format: preference rows (micro_batch_size then counts pairs)")
    beta: float = Field(0.1, gt=0, description="dpo only: the strength of the KL penalty towards the reference (the base "
                        "with the method off); the rewards are beta·(log π − log π_ref)")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo only: the weight of the odds-ratio term beside the chosen "
                               "answers' NLL (TRL's ORPOConfig.beta)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    epochs: float | None = Field(None, gt=0, description="passes over the train rows (default 1 when max_steps is unset)")
    micro_batch_size: int = Field(4, gt=0, description="examples per forward pass (packed rows with data.packing)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(2.0e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm; null for none")
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw"] = "adamw"
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = Field(
        "auto", description="auto: bf16 autocast where the device computes bf16 natively (a CPU with AVX512-BF16 or AMX, "
                            "a GPU with bf16), fp16 on a GPU without bf16, else none")
    gradient_checkpointing: bool = False
    neftune_alpha: float | None = Field(
        None, gt=0, description="NEFTune (Jain et al. 2023): uniform noise of at most alpha/√(L·d) on the input "
        "embeddings while training (L: each example's own length, d: the hidden size; never in eval or generation), "
        "the paper uses 5 to 15; null: off")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes (peft train --num-processes N): ddp keeps the whole model in each "
                           "process and averages gradients; fsdp (FSDP2) shards every parameter (frozen base and "
                           "trainable) across the processes per decoder block, for a model too large for one; ignored "
                           "with one process")
    eval_every: int = Field(50, ge=0, description="steps between evals; 0 for only at the end")
    save_every: int = Field(100, ge=0, description="steps between checkpoints; 0 for none")
    keep_checkpoints: int | None = Field(None, gt=0, description="keep only the last K checkpoints; null keeps all")
    log_every: int = Field(10, gt=0)
    report_to: list[Literal[TRACKERS]] = Field(
        default_factory=list, description="also log train/eval metrics (loss, lr, grad_norm, tokens/s, eval loss) to these "
                                          "accelerate trackers; tensorboard (and aim) write to <output.dir>/tensorboard, wandb "
                                          "to <output.dir>/wandb, the others where their own settings say (e.g. "
                                          "MLFLOW_TRACKING_URI); each needs its package installed")
    eval_max_samples: int | None = Field(None, gt=0, description="eval rows used during training")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false


class OutputConfig(_Strict):
    dir: str = "runs/run"


MethodConfig = Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]


class Recipe(_Strict):
    """A whole recipe, every default filled."""

    model: ModelConfig = ModelConfig()
    method: MethodConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _objective_data(self):
        # preference rows and a preference objective go together (checked before any model loads)
        formats = {s.format for s in self.data.train_sources + self.data.eval_sources}
        objective = self.train.objective
        if objective == "sft" and "preference" in formats:
            raise ValueError("train.objective: format preference rows (prompt, chosen, rejected) need train.objective "
                             "dpo or orpo; set it, or use a supervised format")
        if objective != "sft" and formats != {"preference"}:
            other = ", ".join(sorted(formats - {"preference"}))
            raise ValueError(f"train.objective: {objective} trains on format preference rows (prompt, chosen, rejected), "
                             f"but the data has format {other}; set data.train.format (and data.eval.format) to "
                             "preference, or train.objective: sft")
        if objective != "sft" and self.data.packing:
            raise ValueError(f"data.packing: {objective} scores whole (prompt, chosen, rejected) pairs, which are not "
                             "packed; set data.packing: false")
        if objective != "sft" and self.train.neftune_alpha:
            raise ValueError(f"train.neftune_alpha: NEFTune noises the sft forward; with {objective} it would also noise "
                             "the pairs' scoring (and DPO's reference pass); remove it, or train.objective: sft")
        if objective != "sft" and self.data.train_on_prompt:
            raise ValueError(f"data.train_on_prompt: {objective} compares the chosen and rejected responses to the same "
                             "prompt, so the prompt is never supervised; set data.train_on_prompt: false")
        return self

    @model_validator(mode="after")
    def _method_base(self):
        # a method may train on a base loaded its own way (qlora: 4-bit): resolve model.quantization for it
        quantization = CARDS[self.method.name].base_quantization(self.model.quantization)
        if quantization != self.model.quantization:
            self.model.quantization = quantization
        return self


# ---------------------------------------------------------------------------------------------
# loading


def _format_error(err: ValidationError) -> str:
    """One line naming the first bad key, e.g. ``method.lorra_alpha: unknown key``."""
    e = err.errors()[0]
    loc = _key_parts(e["loc"])
    # the discriminated union puts the method name into the location: method.lora.r -> method.r
    method = loc.pop(1) if len(loc) >= 2 and loc[0] == "method" and loc[1] in METHOD_CONFIGS else None
    key = ".".join(loc) or "recipe"
    kind = e["type"]
    if not loc and kind == "value_error":  # a whole-recipe check names its own key first
        return e["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return f"{key}: unknown key{_did_you_mean(loc, method)}"
    if kind == "missing":
        return f"{key}: missing required key"
    if kind == "union_tag_invalid":
        return f"{key}.name: unknown method {e['input'].get('name')!r} (choose from {', '.join(METHOD_CONFIGS)})"
    if kind == "union_tag_not_found":
        return f"{key}.name: missing required key (choose from {', '.join(METHOD_CONFIGS)})"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{key}: {msg} (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else f"{key}: {msg}"


def _key_parts(loc: tuple) -> list[str]:
    """A pydantic error location as recipe key parts: the union member tags of data.train /
    data.eval dropped, a list index joined to its key (``data.train[1].weight``)."""
    parts: list[str] = []
    for i, p in enumerate(loc):
        if p in _SOURCE_TAGS and i >= 2 and loc[i - 1] in ("train", "eval") and loc[0] == "data":
            continue
        if isinstance(p, int) and parts:
            parts[-1] += f"[{p}]"
        else:
            parts.append(str(p))
    return parts


# other tools' names for our keys (axolotl, HF peft / Trainer, torchtune, TRL), named in the hint
OTHER_TOOLS = {
    "lora_alpha": "method.alpha", "lora_r": "method.r", "lora_dropout": "method.dropout",
    "lora_target_modules": "method.target_modules", "sequence_len": "data.max_seq_len",
    "max_seq_length": "data.max_seq_len", "learning_rate": "train.lr", "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs", "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "train.micro_batch_size", "output_dir": "output.dir",
    "base_model": "model.name_or_path", "load_in_4bit": "model.quantization: nf4",
    "loraplus_lr_ratio": "method.lr_ratio", "neftune_noise_alpha": "train.neftune_alpha",
}


def _section_keys(loc: list[str], method: str | None) -> list[str]:
    """The keys accepted beside the unknown key at ``loc`` (a method section: that method's
    Config's keys)."""
    if len(loc) == 1:
        return list(Recipe.model_fields)
    if loc[0] == "method":
        return list(METHOD_CONFIGS[method].model_fields) if method else []
    node = Recipe.model_fields[loc[0]].annotation if loc[0] in Recipe.model_fields else None
    for part in loc[1:-1]:  # a nested section, e.g. data.train.<key>
        field = getattr(node, "model_fields", {}).get(part.split("[")[0])
        annotation = getattr(field, "annotation", None)
        node = next((a for a in getattr(annotation, "__args__", ()) if hasattr(a, "model_fields")), annotation)
    return list(getattr(node, "model_fields", {}))


def _did_you_mean(loc: list[str], method: str | None) -> str:
    """`` (did you mean method.alpha?)`` for a near-miss key, or for another tool's name of one
    of ours (:data:`OTHER_TOOLS`); "" when nothing is close."""
    bad = loc[-1]
    if bad in OTHER_TOOLS:
        return f" (did you mean {OTHER_TOOLS[bad]}? {bad} is another tool's name for it)"
    keys = _section_keys(loc, method)
    close = difflib.get_close_matches(bad, keys, n=1, cutoff=0.7) or [k for k in keys if bad.endswith("_" + k)][:1]
    return f" (did you mean {'.'.join(loc[:-1] + close)}?)" if close else ""  # lorra_alpha -> alpha too


_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}


_KEY_PART = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


def parse_override(item: str) -> tuple[list[str | int], object]:
    """``"train.max_steps=3"`` -> (["train", "max_steps"], 3); ``"data.train[1].weight=2"`` ->
    (["data", "train", 1, "weight"], 2): a list item by its index, as errors name it. The value is
    read as YAML, so numbers, booleans, null and ``[a, b]`` lists get their types.

    Raises:
        UserError: no ``=``, an empty key, or a key part that is not a name (with indices).
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=3")
    path: list[str | int] = []
    for part in key.strip().split("."):
        m = _KEY_PART.fullmatch(part)
        if m is None:
            raise UserError(f"--set {item}: cannot read the key part {part!r} (names, and [N] for a list item)")
        path += [m.group(1), *(int(i) for i in re.findall(r"\d+", m.group(2)))]
    if raw.strip().lower() in _YAML11_BOOLS:
        return path, raw.strip()  # --set train.mixed_precision=no is the string "no"
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``a.b=c`` (``a.b[1].c=d``: an item of the list ``a.b``) into the nested dict
    ``data`` (in place, and returned).

    Raises:
        UserError: a step through something that is not a section, or an index past a list's end.
    """
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for depth, (step, following) in enumerate(zip(path, path[1:])):
            where = _key_text(path[: depth + 1])
            if isinstance(step, int):
                if not isinstance(node, list) or step >= len(node):
                    have = f"has {len(node)} item{'s' * (len(node) != 1)}" if isinstance(node, list) else "is not a list"
                    raise UserError(f"--set {item}: {_key_text(path[:depth])} {have}")
                child = node[step]
            else:
                if not isinstance(node, dict):
                    raise UserError(f"--set {item}: {_key_text(path[:depth])} is not a section")
                child = node.get(step)
                if child is None:
                    child = node[step] = [] if isinstance(following, int) else {}
            if not isinstance(child, (dict, list)) or isinstance(child, list) != isinstance(following, int):
                raise UserError(f"--set {item}: {where} is not a {'list' if isinstance(following, int) else 'section'}")
            node = child
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise UserError(f"--set {item}: {_key_text(path[:-1])} has {len(node)} items")
        node[last] = value
    return data


def _key_text(path: list[str | int]) -> str:
    """["data", "train", 1, "weight"] -> "data.train[1].weight"."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (plain YAML keeps the last,
    silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise UserError(f"{self.name}:{key_node.start_mark.line + 1}: duplicate key {key!r} "
                                f"(first at line {seen[key] + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    """Read a recipe file into a dict.

    Raises:
        UserError: missing file, or malformed YAML (names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: malformed YAML: {e.problem or e.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: malformed YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model, method, data, train, output)")
    return data


def validate(data: dict) -> Recipe:
    """Validate a recipe dict.

    Raises:
        UserError: one line naming the first bad key.
    """
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_error(e)) from None


def load_recipe(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> Recipe:
    """Load, override and validate a recipe file.

    Raises:
        UserError: missing file, malformed YAML, unknown key or bad value.
    """
    data = apply_overrides(read_yaml(path), list(overrides))
    if output_dir:
        data.setdefault("output", {})
        data["output"]["dir"] = output_dir
    return validate(data)


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default filled)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
