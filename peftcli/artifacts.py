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

import json
from pathlib import Path

import yaml
from pydantic import ValidationError
from torch import nn

import peftcli
from peftcli import methods, models
from peftcli.errors import UserError
from peftcli.recipe import ModelConfig, Recipe
from peftcli.rundir import RunDir, atomic_dir

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


def _hf_fan_in_fan_out(cfg: dict, model: nn.Module) -> dict:
    """HF peft's LoRA and IA3 record ``fan_in_fan_out: true`` once they wrap a transformers
    ``Conv1D`` (GPT-2: the base weight is stored (in, out)); write the same for the layers the
    method wrapped. A Conv1D that transformers quantised is a bitsandbytes Linear of (out, in),
    for which HF peft keeps ``false``, and so do we. The saved weights' shapes do not change."""
    if "fan_in_fan_out" in cfg:
        cfg["fan_in_fan_out"] = any(models.is_conv1d(getattr(m, "base_layer", None)) for m in model.modules())
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
    from safetensors.torch import save_file

    method = methods.get(recipe.method.name)
    weights = method.state_dict(model)
    cfg = adapter_config(recipe, base_path, base_fingerprint)
    if hasattr(method, "file_fields"):  # what was wrapped, named explicitly (the peftcli block keeps the recipe's form)
        cfg.update(method.file_fields(model))
    cfg = _hf_fan_in_fan_out(cfg, model)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
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
    """Our method name for an adapter config: the recorded ``peftcli.method.name``, else from the
    HF ``peft_type`` (``LORA`` -> ``lora``, or ``qlora`` when the recorded base is 4-bit).

    Raises:
        UserError: a ``peft_type`` no registered method reads.
    """
    recorded = (cfg.get("peftcli") or {}).get("method") or {}
    if recorded.get("name") in methods.METHODS:
        return recorded["name"]
    peft_type = str(cfg.get("peft_type", "")).upper()
    names = [name for name, m in methods.METHODS.items() if m.PEFT_TYPE == peft_type]
    if not names:
        known = sorted({m.PEFT_TYPE for m in methods.METHODS.values()})
        raise UserError(f"{CONFIG_NAME}: peft_type {peft_type or None!r} is not supported (supported: {', '.join(known)})")
    quantization = ((cfg.get("peftcli") or {}).get("model") or {}).get("quantization", "none")
    if "qlora" in names and quantization in ("nf4", "fp4"):
        return "qlora"
    return names[0]


def _model_config(cfg: dict, overrides: dict | None) -> ModelConfig:
    """How to load the base: the recorded ``peftcli.model`` section, else the HF fields
    (``base_model_name_or_path``, float32, no quantisation); then ``overrides``."""
    recorded = (cfg.get("peftcli") or {}).get("model")
    base = cfg.get("base_model_name_or_path")
    if recorded:
        fields = dict(recorded)
        # an alias resolves on every machine; any other path is the resolved one HF peft reads
        if fields.get("name_or_path") not in models.ALIASES and base:
            fields["name_or_path"] = base
    else:
        if not base:
            raise UserError(f"{CONFIG_NAME}: no base_model_name_or_path, cannot tell which base to load")
        fields = {"name_or_path": base}
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
    recorded = (cfg.get("peftcli") or {}).get("method")
    if recorded:
        try:
            return method.Config.model_validate(recorded)
        except ValidationError as e:
            err = e.errors()[0]
            raise UserError(f"{CONFIG_NAME}: peftcli.method.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return method.config_from_adapter(cfg)


def _run_recipe(adapter_dir: Path) -> dict | None:
    """The run dir's ``recipe.yaml`` as a dict when ``adapter_dir`` is ``RUN/adapter`` or
    ``RUN/checkpoints/step-N/adapter``; else None."""
    run = RunDir.owning(adapter_dir)
    file = run.recipe if run is not None else None
    if file is None or not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_adapted(path: str | Path, model_overrides: dict | None = None, check_fingerprint: bool = True):
    """Load the base an adapter was trained on and apply the adapter, in eval mode.

    The base is loaded as recorded in ``peftcli.model`` (alias, quantisation, dtype, double
    quant) for our adapters; an adapter Hugging Face peft wrote (no ``peftcli`` block) loads its
    ``base_model_name_or_path`` in float32 without quantisation. Weights are read from
    ``adapter_model.safetensors`` only.

    Args:
        path: a run dir or an adapter dir.
        model_overrides: ``ModelConfig`` keys to change, e.g. ``{"dtype": "bfloat16"}``.
        check_fingerprint: compare the recorded base fingerprint with the loaded base's.

    Returns:
        ``(model, tokenizer, info)``; info has ``adapter_dir`` (Path), ``method`` (name),
        ``base_path`` (resolved), ``model`` (the ModelConfig dict used), ``recipe`` (the run
        dir's recipe.yaml dict, else None) and ``config`` (the adapter_config.json dict).

    Raises:
        UserError: no adapter here, an unsupported ``peft_type``, a base that cannot be loaded,
        weights that do not fit, or a base whose fingerprint differs from the recorded one.
    """
    adapter_dir = find_adapter_dir(path)
    cfg = read_adapter_config(adapter_dir)
    name = method_name(cfg)
    method = methods.get(name)
    method_cfg = _method_config(method, cfg)
    model_cfg = _model_config(cfg, model_overrides)
    weights = read_adapter_weights(adapter_dir)

    model, tok, base_path = models.load_base(model_cfg.name_or_path, model_cfg.quantization, model_cfg.dtype,
                                             model_cfg.double_quant, model_cfg.trust_remote_code)
    recorded = (cfg.get("peftcli") or {}).get("base_fingerprint")
    if check_fingerprint and recorded:
        actual = models.fingerprint(model)
        if actual != recorded:
            raise UserError(f"adapter {adapter_dir} was trained on a different base model "
                            f"(fingerprint {recorded}, this base has {actual})")
    method.apply(model, method_cfg)
    method.load_state_dict(model, weights)
    model.eval()
    info = {
        "adapter_dir": adapter_dir,
        "method": name,
        "base_path": base_path,
        "model": model_cfg.model_dump(mode="json"),
        "recipe": _run_recipe(adapter_dir),
        "config": cfg,
    }
    return model, tok, info
