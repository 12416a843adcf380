"""Folding an adapter into its base: ``peft merge RUN -o OUT`` writes a plain transformers dir.

For LoRA the merged weight is W + scale·B·A, summed in float32 and rounded once to the output
dtype (Hu et al. 2021, §4.1: "no additional inference latency"). A 4-bit or 8-bit base is
dequantised first, so a QLoRA run merges into dequant(W_nf4) + scale·B·A — the weights the
adapter was trained against (Dettmers et al. 2023, §3) — and the output is never re-quantised.
Layers keep the base's layout: a GPT-2 ``Conv1D`` (quantised by transformers into a (out, in)
bitsandbytes Linear) is written back as a Conv1D holding (in, out).
A tied output head that received an update gets its own storage and the config is untied, so
the input embedding stays bit-identical. The merged dir's tokenizer carries the chat template the
run trained with, and its ``generation_config`` stops at every stop id (EOS and the template's
end-of-turn token, :func:`peftcli.tokens.special_tokens`), so a plain ``generate`` stops where
``peft generate`` does (CASES C17).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from peftcli import data, methods, models, tokens
from peftcli.artifacts import find_adapter_dir, load_adapted, method_name, read_adapter_config
from peftcli.errors import UserError
from peftcli.rundir import atomic_dir

logger = logging.getLogger(__name__)


def merge_adapter(path: str | Path, out_dir: str | Path, dtype: str | None = None,
                  log: Callable[[str], None] | None = None) -> Path:
    """Merge the adapter at ``path`` (run dir or adapter dir) into its base and write a
    transformers model dir (safetensors weights, config, tokenizer, generation config) to
    ``out_dir``, atomically (temporary sibling dir, then rename).

    Args:
        path: a run dir or an adapter dir.
        out_dir: where the merged model goes; an existing transformers model dir there is
            replaced, anything else is refused.
        dtype: ``float32 | bfloat16 | float16``; default the base's recorded dtype (for a 4-bit
            base that is its compute dtype, float32 unless the recipe set another).
        log: where the one-line summary goes (default: this module's logger at INFO).

    Returns ``out_dir``, which ``AutoModelForCausalLM.from_pretrained`` loads.

    Raises:
        UserError: the method cannot merge (its module's ``CANNOT_MERGE`` says why,
        checked before the base is loaded), an unknown dtype, ``out_dir`` is the
        base or adapter dir or a non-empty dir that is not a model dir, or any error of
        :func:`peftcli.artifacts.load_adapted`.
    """
    log = log or logger.info
    if dtype is not None and dtype not in models.DTYPES:
        raise UserError(f"--dtype {dtype}: choose from {', '.join(models.DTYPES)}")
    out_dir = Path(out_dir)
    adapter_dir = find_adapter_dir(path)
    cfg = read_adapter_config(adapter_dir)
    name = method_name(cfg)
    method = methods.get(name)
    if method.CANNOT_MERGE is not None:  # before loading the base
        raise UserError(f"method {name} cannot be merged: {method.CANNOT_MERGE}; use the adapter as is "
                        "(peft eval / peft generate)")
    _check_out_dir(out_dir, adapter_dir, cfg.get("base_model_name_or_path") or "")  # before the slow load
    loaded = load_adapted(path)
    model, tok, base = loaded.model, loaded.tokenizer, loaded.model_config

    quantized = base.quantization != "none"
    out_name = dtype or base.dtype
    out_dtype = models.DTYPES[out_name]
    if not quantized and out_dtype != next(model.parameters()).dtype:
        model.float()  # exact; the merge then rounds once, to out_dtype, when the weights are copied

    method.merge(model)
    dequantize_linears(model, torch.float32)
    clean = plain_model(model, out_dtype)
    data.use_recipe_chat(tok, loaded.recipe)
    clean.generation_config = stopping_generation_config(clean, tok)

    with atomic_dir(out_dir) as tmp:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        clean.generation_config.save_pretrained(tmp)

    chosen = f"dtype {out_name}" + (" (the base's recorded dtype)" if dtype is None else "")
    note = f"; the {base.quantization} base was dequantised, not re-quantised" if quantized else ""
    log(f"merged {loaded.adapter_dir} into {out_dir}: {chosen}{note}")
    return out_dir


def stopping_generation_config(model: nn.Module, tokenizer):
    """A copy of ``model``'s generation config (or one made from its config) whose
    ``eos_token_id`` lists every stop id of :func:`peftcli.tokens.special_tokens` and whose
    ``pad_token_id`` is the tokenizer's when it had none."""
    from transformers import GenerationConfig

    base = model.generation_config
    config = copy.deepcopy(base) if base is not None else GenerationConfig.from_model_config(model.config)
    config.eos_token_id = list(tokens.special_tokens(tokenizer, base).stop_ids) or None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def _check_out_dir(out_dir: Path, adapter_dir: Path, base_path: str) -> None:
    """Refuse to write over (or into) the base, the adapter, or a dir that is not a model dir."""
    target = out_dir.resolve()
    adapter = Path(adapter_dir).resolve()
    if target == adapter or target in adapter.parents or adapter in target.parents:
        raise UserError(f"-o {out_dir}: overlaps the adapter being merged ({adapter_dir}); merge into a new dir")
    base = Path(base_path).expanduser()
    if base_path and base.exists() and (base.resolve() == target or base.resolve() in target.parents):
        raise UserError(f"-o {out_dir}: is inside the base model dir; merge into a new dir")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"-o {out_dir}: exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise UserError(f"-o {out_dir}: exists, is not empty and is not a model dir; choose a new dir")


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes 4/8-bit Linear left in ``model`` by a plain ``nn.Linear``
    holding ``models.dequantized_weight`` (the values the quantised layer computes with) in
    ``dtype`` — a ``Conv1D`` holding its transpose where transformers quantised a Conv1D (GPT-2),
    so the model's own layout comes back. Returns how many were replaced."""
    names = [n for n, m in model.named_modules() if models.is_quantized_linear(m)]
    for name in names:
        q = model.get_submodule(name)
        model.set_submodule(name, models.plain_linear(models.dequantized_weight(q), q.bias, q, dtype))
    return len(names)


def plain_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A fresh ``from_config`` copy of a merged model, in ``dtype``, without quantisation, with
    the merged weights loaded (strict: every key must fit). The output head is tied to the input
    embedding only if they still share storage."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    if not tied:
        _untie(config)
    clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    clean.load_state_dict(state, strict=True)
    if tied:
        clean.tie_weights()
    if model.generation_config is not None:
        clean.generation_config = model.generation_config
    return clean.eval()


def _untie(config) -> None:
    """Record that the output head has its own weights, so a reload does not re-tie it."""
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        text.tie_word_embeddings = False
