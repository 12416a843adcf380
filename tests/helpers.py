"""Plain helpers shared by the test files: recipes, logits, "as if trained" weights, a saved
adapter, data and recipe files. Model and tokenizer builders live in ``tiny.py``; fixtures in
``conftest.py``. Import as ``from helpers import ...`` (conftest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import yaml
from torch import nn

from peftcli import artifacts, methods, models, precision
from peftcli.data import IGNORE_INDEX
from peftcli.recipe import Recipe, validate


def method_recipe(name: str, base_dir=None, quantization: str = "none", dtype: str = "float32",
                  **keys) -> Recipe:
    """A validated recipe for method ``name`` (with ``keys``) on the base at ``base_dir`` (the
    path is not read; "unused" when None), loaded with ``quantization`` in ``dtype`` (float32
    unless given, so numbers do not depend on the machine's ``auto``); the data path is a
    placeholder that is never read."""
    model = {"name_or_path": str(base_dir or "unused"), "quantization": quantization, "dtype": dtype}
    return validate({"model": model, "method": {"name": name, **keys},
                     "data": {"train": {"path": "unused.jsonl"}}})


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's own forward on ``ids`` (B, T) (with attention ``mask`` (B, T) when given):
    float32 logits (B, T', V), T' = T plus any virtual tokens the model puts first; no grad."""
    return model(input_ids=ids, attention_mask=mask).logits.float()


def perturb(model: nn.Module, names: Iterable[str] | None = None, seed: int = 1, scale: float = 0.1,
            shift: float = 0.0) -> None:
    """Redraw weights as if trained (the inits are often zeros or ones, which hide a method's
    effect): each selected parameter becomes ``shift + scale * N(0, 1)``, drawn in
    ``named_parameters`` order from one generator seeded ``seed``. Selected: the parameters whose
    name contains one of ``names`` (names work for ours and HF peft's); every trainable one when
    ``names`` is None. In place, no grad."""
    parts = None if names is None else tuple(names)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad if parts is None else any(part in name for part in parts):
                p.copy_(shift + scale * torch.randn(p.shape, generator=g))


def nudge(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every trainable parameter off its start: ``p += scale * N(0, 1)`` (cast to p's
    dtype), drawn in ``parameters`` order from one generator seeded ``seed``. In place, no grad."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


def saved_adapter(recipe: Recipe, out_dir, as_trained: Callable[[nn.Module], None] | None = None,
                  seed: int | None = None) -> nn.Module:
    """The recipe's base loaded as the recipe says (path, quantization, dtype), fingerprinted,
    the recipe's method applied (after ``torch.manual_seed(seed)`` when given: the method's
    random init), ``as_trained(model)`` run on it (e.g. a :func:`perturb`), and the adapter
    saved to ``out_dir``. Returns the adapted model in eval mode. ``model.dtype: auto`` loads the
    base as a run on this machine would (:func:`peftcli.precision.choose`)."""
    m = recipe.model
    dtype = precision.choose(m.dtype, recipe.train.mixed_precision).dtype
    model, _, base_path = models.load_base(m.name_or_path, m.quantization, dtype)
    fp = models.fingerprint(model)
    if seed is not None:
        torch.manual_seed(seed)
    methods.get(recipe.method.name).apply(model, recipe.method)
    if as_trained is not None:
        as_trained(model)
    artifacts.save_adapter(out_dir, model, recipe, base_path, fp)
    return model.eval()


def random_example(length: int, prompt_len: int, seed: int) -> dict:
    """A tokenized example: ``length`` random ids in [5, 300) (seeded), the first ``prompt_len``
    labelled -100 (the prompt), the rest labelled with their own ids (the answer)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (length,), generator=g).tolist()
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt_len + ids[prompt_len:]}


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` as JSON lines (UTF-8, one object a line) to ``path``; returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, recipe: dict) -> Path:
    """Write the ``recipe`` dict as YAML to ``path``; returns ``path``."""
    path.write_text(yaml.safe_dump(recipe))
    return path


def peft_in_process(args: list, capsys) -> tuple[int, str]:
    """``peft ARGS`` run in this process, through the console script's entry (``cli.run``):
    (exit code, stderr). ``capsys`` is pytest's fixture; what was captured before is dropped."""
    import sys

    from peftcli import cli

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["peft", *map(str, args)]
    try:
        cli.run()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, capsys.readouterr().err
