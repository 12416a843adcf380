"""Adapter dir read/write, in the format Hugging Face peft reads and writes.

An adapter dir holds two files (see ``docs/formats.md``):

- ``adapter_config.json``: the method's HF peft config fields (``peft_type``, ``r``,
  ``lora_alpha``, ...), ``base_model_name_or_path`` (the dir ``from_pretrained`` loads), and our
  own ``"peftcli"`` block: the version, the method and model recipe sections as resolved, and a
  fingerprint of the base weights (HF peft ignores keys it does not know);
- ``adapter_model.safetensors``: the trainable weights in HF peft key naming
  (``base_model.model.<module>.lora_A.weight``).

A run dir (``peft train``'s output) holds ``recipe.yaml`` and ``adapter/`` beside the metrics;
every reader here accepts either. Writes are atomic: a reader never sees half an adapter.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import nn

import peftcli
from peftcli import methods, models
from peftcli.atomic import atomic_dir
from peftcli.errors import UserError
from peftcli.precision import Precision, default_device
from peftcli.precision import choose as choose_precision
from peftcli.recipe import MethodConfig, ModelConfig, Recipe, read_yaml, validate
from peftcli.rundir import RunDir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


# ---------------------------------------------------------------------------------------------
# writing


def adapter_config(recipe: Recipe, base_path: str, base_fingerprint: str) -> dict:
    """The ``adapter_config.json`` dict: the method's HF peft fields, ``base_model_name_or_path``
    and the ``"peftcli"`` block (version, resolved method and model sections, base fingerprint)."""
    cfg = methods.get(recipe.method.name).adapter_config(recipe.method)
    local = Path(base_path).expanduser()
    # a local dir is recorded absolute, so the adapter loads from any working directory
    cfg["base_model_name_or_path"] = str(local.resolve()) if local.is_dir() else str(base_path)
    cfg["peftcli"] = {
        "version": peftcli.__version__,
        "method": recipe.method.model_dump(mode="json"),
        "model": recipe.model.model_dump(mode="json"),
        "base_fingerprint": base_fingerprint,
    }
    return cfg


def save_adapter(out_dir: str | Path, model: nn.Module, recipe: Recipe, base_path: str, base_fingerprint: str) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` to ``out_dir``, atomically
    (temporary sibling dir, fsync, rename; an existing ``out_dir`` is replaced only once the new
    one is complete, and is left intact if writing fails).

    Args:
        out_dir: the adapter dir (e.g. ``RUN/adapter``); parents are created.
        model: the model ``methods.get(recipe.method.name).apply`` wrapped.
        recipe: the resolved recipe (its ``method`` and ``model`` sections are recorded).
        base_path: the resolved base dir/hub id, as ``models.load_base`` returned it; HF peft's
            ``PeftModel.from_pretrained`` loads the base from here.
        base_fingerprint: ``models.fingerprint`` of the base before the method was applied.

    Returns the adapter dir. Raises UserError when ``out_dir`` exists and is a file.
    """
    from safetensors.torch import save

    method = methods.get(recipe.method.name)
    weights = method.state_dict(model)
    cfg = adapter_config(recipe, base_path, base_fingerprint)
    cfg.update(method.file_fields(model))  # what was wrapped, named explicitly (the peftcli block keeps the recipe's form)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        # serialised here and written by Python, so a failed write is an OSError with its errno
        (tmp / WEIGHTS_NAME).write_bytes(save(weights, metadata={"format": "pt"}))
    return out_dir


# ---------------------------------------------------------------------------------------------
# reading


def find_adapter_dir(path: str | Path) -> Path:
    """The adapter dir for a run dir (``RUN/adapter``) or an adapter dir itself.

    Raises:
        UserError: the path does not exist, or neither it nor ``PATH/adapter`` holds an
        ``adapter_config.json``.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run dir or adapter dir")
    if (path / CONFIG_NAME).is_file():
        return path
    adapter = RunDir(path).adapter
    if (adapter / CONFIG_NAME).is_file():
        return adapter
    raise UserError(f"{path}: not a run dir or adapter dir (no {CONFIG_NAME} in it or in {adapter})")


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The parsed ``adapter_config.json`` of ``adapter_dir``.

    Raises:
        UserError: the file is missing, is not JSON, or is not an object with a ``peft_type``.
    """
    file = Path(adapter_dir) / CONFIG_NAME
    if not file.is_file():
        raise UserError(f"{adapter_dir}: no {CONFIG_NAME}")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: malformed JSON ({e})") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise UserError(f"{file}: not an adapter config (no peft_type)")
    return cfg


def read_adapter_weights(adapter_dir: str | Path) -> dict:
    """The tensors of ``adapter_model.safetensors`` on CPU. Pickled ``adapter_model.bin`` files
    are never loaded (unpickling runs arbitrary code).

    Raises:
        UserError: no safetensors file (saying so when only a ``.bin`` is there), or a corrupt one.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    file = adapter_dir / WEIGHTS_NAME
    if not file.is_file():
        if (adapter_dir / PICKLE_NAME).is_file():
            raise UserError(f"{adapter_dir}: only {PICKLE_NAME} (a pickle, not loaded for safety); "
                            f"re-save it as {WEIGHTS_NAME}")
        raise UserError(f"{adapter_dir}: no {WEIGHTS_NAME}")
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: cannot read ({e})") from None


def method_name(cfg: dict) -> str:
    """Our method name for an adapter config: the recorded ``peftcli.method.name``, else the
    registered method whose ``reads_adapter`` claims it (by the HF ``peft_type``; for ``LORA``
    the recorded base decides between ``lora`` and ``qlora``).

    Raises:
        UserError: a ``peft_type`` no registered method reads.
    """
    recorded = _recorded(cfg).get("method") or {}
    if recorded.get("name") in methods.METHODS:
        return recorded["name"]
    names = [name for name, m in methods.METHODS.items() if m.reads_adapter(cfg)]
    if not names:
        peft_type = str(cfg.get("peft_type", "")).upper()
        known = sorted({m.PEFT_TYPE for m in methods.METHODS.values()})
        raise UserError(f"{CONFIG_NAME}: peft_type {peft_type or None!r} is not supported (supported: {', '.join(known)})")
    return names[0]


def _recorded(cfg: dict) -> dict:
    """The ``"peftcli"`` block of an adapter config (``{}`` for one Hugging Face peft wrote)."""
    block = cfg.get("peftcli")
    return block if isinstance(block, dict) else {}


def recorded_fingerprint(cfg: dict) -> str | None:
    """The base fingerprint an adapter config records (``peftcli.base_fingerprint``); None for
    an adapter Hugging Face peft wrote, which records none."""
    return _recorded(cfg).get("base_fingerprint") or None


def check_base(recorded: str | None, model: nn.Module, what: str) -> str:
    """Refuse a base other than the one an adapter (or checkpoint) was trained on.

    Args:
        recorded: the fingerprint the adapter records (:func:`recorded_fingerprint`); None
            (nothing recorded) checks nothing.
        model: the loaded base, before the method is applied (:func:`peftcli.models.fingerprint`).
        what: how the error names the adapter, e.g. ``"adapter RUN/adapter"`` or
            ``"--resume: RUN/checkpoints/step-4"``.

    Returns the base's fingerprint (16 hex digits).

    Raises:
        UserError: ``"{what} was trained on a different base model (fingerprint R, this base has F)"``.
    """
    actual = models.fingerprint(model)
    if recorded and recorded != actual:
        raise UserError(f"{what} was trained on a different base model (fingerprint {recorded}, this base has {actual})")
    return actual


def _model_config(cfg: dict, overrides: dict | None) -> ModelConfig:
    """How to load the base: the recorded ``peftcli.model`` section, else the HF fields
    (``base_model_name_or_path``, float32, no quantisation); then ``overrides``."""
    recorded = _recorded(cfg).get("model")
    base = cfg.get("base_model_name_or_path")
    if recorded:
        fields = dict(recorded)
        # an alias resolves on every machine; any other path is the resolved one HF peft reads
        if fields.get("name_or_path") not in models.ALIASES and base:
            fields["name_or_path"] = base
    else:
        if not base:
            raise UserError(f"{CONFIG_NAME}: no base_model_name_or_path, cannot tell which base to load")
        fields = {"name_or_path": base, "dtype": "float32"}
    fields["trust_remote_code"] = False  # an adapter from elsewhere never switches on remote code
    fields.update(overrides or {})
    try:
        return ModelConfig.model_validate(fields)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "model"
        raise UserError(f"model.{key}: {err['msg']}") from None


def _method_config(method, cfg: dict):
    """The method's Config: the recorded ``peftcli.method`` section, else from the HF fields."""
    recorded = _recorded(cfg).get("method")
    if recorded:
        try:
            return method.Config.model_validate(recorded)
        except ValidationError as e:
            err = e.errors()[0]
            raise UserError(f"{CONFIG_NAME}: peftcli.method.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return method.config_from_adapter(cfg)


def _run_dir(adapter_dir: Path) -> Path | None:
    """The run dir that holds ``adapter_dir`` as ``RUN/adapter`` or
    ``RUN/checkpoints/step-N/adapter`` and has a ``recipe.yaml``; else None (a bare adapter dir)."""
    run = RunDir.owning(adapter_dir)
    return run.path if run is not None and run.recipe.is_file() else None


def _run_recipe(run_dir: Path | None) -> Recipe | None:
    """The run dir's ``recipe.yaml``, validated; None without a run dir.

    Raises:
        UserError: the file is malformed YAML or not a valid recipe (one line naming the file).
    """
    if run_dir is None:
        return None
    file = RunDir(run_dir).recipe
    raw = read_yaml(file)  # a UserError that names the file
    try:
        return validate(raw)
    except UserError as e:
        raise UserError(f"{file}: {e}") from None


@dataclass
class AdapterFiles:
    """What an adapter dir (and the run dir around it) holds, read and validated, before any
    model is loaded (:func:`read_adapter`)."""

    adapter_dir: Path
    """The dir holding ``adapter_config.json`` and ``adapter_model.safetensors``."""
    run_dir: Path | None
    """The run dir around ``adapter_dir`` (``RUN/adapter`` or ``RUN/checkpoints/step-N/adapter``,
    with a ``recipe.yaml``); None for a bare adapter dir."""
    method: str
    """The registry name of the method (``peftcli.methods.METHODS``), e.g. ``"lora"``."""
    method_config: MethodConfig
    """The method's validated ``Config`` (the recorded section, else read from HF fields)."""
    model_config: ModelConfig
    """How to load the base: the recorded ``model`` section (or HF's fields), with overrides."""
    recipe: Recipe | None
    """The run's ``recipe.yaml`` validated; None for a bare adapter dir (e.g. HF peft's)."""
    config: dict
    """The ``adapter_config.json`` as read (HF peft fields and the ``"peftcli"`` block)."""
    weights: dict = field(repr=False)
    """The tensors of ``adapter_model.safetensors``, on the CPU, in HF peft key naming."""


def read_adapter(path: str | Path, model_overrides: dict | None = None) -> AdapterFiles:
    """Read an adapter dir (and its run's ``recipe.yaml``) without loading any model, so a bad
    file is reported before the slow load.

    Args:
        path: a run dir or an adapter dir.
        model_overrides: ``ModelConfig`` keys to change, e.g. ``{"dtype": "bfloat16"}``.
    Raises:
        UserError: no adapter here, an unsupported ``peft_type``, a malformed or invalid
        ``recipe.yaml`` in the run dir, unreadable weights.
    """
    adapter_dir = find_adapter_dir(path)
    cfg = read_adapter_config(adapter_dir)
    name = method_name(cfg)
    run_dir = _run_dir(adapter_dir)
    return AdapterFiles(adapter_dir=adapter_dir, run_dir=run_dir, method=name,
                        method_config=_method_config(methods.get(name), cfg), model_config=_model_config(cfg, model_overrides),
                        recipe=_run_recipe(run_dir), config=cfg, weights=read_adapter_weights(adapter_dir))


@dataclass
class LoadedAdapter(AdapterFiles):
    """An adapter applied to the base it was trained on, in eval mode, with what was read to
    build it (:func:`load_adapted`)."""

    model: nn.Module = field(default=None, repr=False)
    """The base with the method applied and the adapter weights loaded, in eval mode."""
    tokenizer: Any = field(default=None, repr=False)
    """The base's tokenizer (pad id fitted to the model, :func:`peftcli.models.fit_tokenizer`);
    the run's chat template is not applied yet (:func:`peftcli.data.use_recipe_chat`)."""
    base_path: str = ""
    """The resolved base dir or hub id the weights were loaded from."""
    precision: Precision | None = None
    """The dtype the base was loaded in, and why (:func:`load_precision`)."""


def load_precision(model_config: ModelConfig, recipe: Recipe | None) -> Precision:
    """The precision an adapter's base is loaded in here, for eval and generation (which do not
    autocast): ``model_config.dtype`` with ``auto`` resolved by :func:`peftcli.precision.choose`
    as the run's ``train.mixed_precision`` (``auto`` for a bare adapter dir) resolves on the device
    the model computes on (a plain base stays on the CPU; bitsandbytes puts a 4/8-bit base on
    the GPU where there is one). With ``auto`` the result is float32 in the end: a 4-bit base that
    trained computing in bf16 is scored in float32, as a full-precision one.

    Raises:
        UserError: a bad ``PEFTCLI_CPU_BF16``.
    """
    device = default_device() if model_config.quantization != "none" else "cpu"
    if model_config.dtype != "auto":  # as set; the autocast setting plays no part here
        return choose_precision(model_config.dtype, "no", device, model_config.quantization)
    mixed = recipe.train.mixed_precision if recipe is not None else "auto"
    chosen = choose_precision("auto", mixed, device, model_config.quantization)
    if chosen.dtype != "float32":  # a 4-bit base that trained computing in bf16: scored in float32, as a full one
        chosen = dataclasses.replace(chosen, dtype="float32", reason=f"{chosen.reason}; eval computes in float32")
    return chosen


def load_adapted(source: str | Path | AdapterFiles, model_overrides: dict | None = None,
                 check_fingerprint: bool = True) -> LoadedAdapter:
    """Load the base an adapter was trained on and apply the adapter, in eval mode.

    The base is loaded as recorded in ``peftcli.model`` (alias, quantisation, dtype, double
    quant; ``auto`` resolved here by :func:`load_precision`) for our adapters; an adapter Hugging
    Face peft wrote (no ``peftcli`` block) loads its ``base_model_name_or_path`` in float32
    without quantisation. Weights are read from
    ``adapter_model.safetensors`` only.

    Args:
        source: a run dir or an adapter dir, or what :func:`read_adapter` read from one.
        model_overrides: ``ModelConfig`` keys to change (with a path ``source`` only).
        check_fingerprint: compare the recorded base fingerprint with the loaded base's
            (:func:`check_base`).

    Returns a :class:`LoadedAdapter`.

    Raises:
        UserError: what :func:`read_adapter` raises, a base that cannot be loaded, weights that
        do not fit, or a base whose fingerprint differs from the recorded one.
    """
    files = source if isinstance(source, AdapterFiles) else read_adapter(source, model_overrides)
    chosen = load_precision(files.model_config, files.recipe)
    model, tok, base_path = models.load_base(**{**files.model_config.model_dump(), "dtype": chosen.dtype})
    if check_fingerprint:
        check_base(recorded_fingerprint(files.config), model, f"adapter {files.adapter_dir}")
    method = methods.get(files.method)
    method.apply(model, files.method_config, tokenizer=tok)
    method.load_state_dict(model, files.weights)
    model.eval()
    return LoadedAdapter(**vars(files), model=model, tokenizer=tok, base_path=base_path, precision=chosen)
