"""The zoo: every decoder family (tests/zoo.py FAMILIES) × every method variant (VARIANTS).

Each cell trains 2 steps in-process (``peftcli.trainer.train``, the 4 SORT_ROWS as one
micro-batch), then checks, each against an independent reference:

- ``train`` / ``finite``: the run finishes; its logged losses and eval loss are finite;
- ``reload``: the saved adapter reloads (``load_adapted``) to the trained model's logits;
- ``changed``: the adapted model's logits differ from the base's (the method trained something);
- ``own_loss``: the trained loss is the model's own loss. Reference: the model's own forward on
  the same rows, right-padded, its own logits, cross-entropy on the same labels. Where the method
  starts as the identity, the first logged loss must equal the *base* model's; for every method
  the final eval loss must equal the adapted model's;
- ``generate``: greedy output of a left-padded batch is the same with the KV cache on and off;
- ``merge``: where the method can merge, the merged dir's logits equal the adapted model's (1e-5);
- ``hf_loads_ours`` / ``ours_loads_hf``: where HF peft has the method, HF peft's
  ``PeftModel.from_pretrained`` on our adapter gives our logits, and ``load_adapted`` on an adapter
  HF peft made (its trainable weights moved off their start) gives HF peft's (1e-4, float32).

A failing check does not stop the others: the assertion lists every failed check of the cell, and
with ``ZOO_RESULTS=FILE`` each cell appends its outcome to FILE (``python tests/zoo.py matrix``).
Per family (``test_zoo_family``): the base model runs in transformers itself (forward; greedy
output with cache on = off) — a failure there is transformers', not ours — and ``all-linear``
selects the modules HF peft's ``all-linear`` selects. A few cells run through the command line
(``peft train --smoke``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import nudge
from tiny import SORT_ROWS, tiny_run_recipe
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from zoo import LORA, REFUSED, VARIANTS, Cell, families, save_family

from peftcli.errors import UserError

PEFT = str(Path(sys.executable).with_name("peft"))
ATOL = {"reload": 1e-6, "merge": 1e-5, "hf": 1e-4}  # max |logit difference|, float32
LOSS_TOL = 1e-5  # nats, times max(1, loss)
CHANGED = 1e-3  # the least max |logit change| 2 training steps must make, times the base logits' std
NEW_TOKENS = 6
SHORT_PROMPT = "the quick brown fox"  # beside an alpaca prompt: a left-padded generate batch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a tiny model a second thread only adds synchronisation (measured: a
    (240, 64) x (64, 128) matmul takes 0.2 ms on one thread, 5.6 ms on two with the cores shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """``family_dir(name)``: the tiny model + tokenizer dir of a family, saved once per session."""
    root, saved = tmp_path_factory.mktemp("zoo"), {}

    def get(family: str) -> Path:
        if family not in saved:
            saved[family] = save_family(root / family, family)
        return saved[family]

    return get


@pytest.fixture(scope="session")
def record():
    """Append a cell's outcome to $ZOO_RESULTS (one JSON line) when it is set."""
    path = os.environ.get("ZOO_RESULTS")

    def write(cell: Cell) -> None:
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(dataclasses.asdict(cell)) + "\n")

    return write


def one_line(e: BaseException) -> str:
    """``Type: first line`` of an exception (with the next line when the first ends in a colon)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [""]
    first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return f"{type(e).__name__}: {first}"[:240]


class NotOurs(Exception):
    """A check that cannot run for a reason outside peftcli (HF peft refuses its own config)."""


class Checks:
    """``with checks("name"):`` runs one check; an exception or failed assert is recorded in the
    cell as that check's one-line reason (a :class:`NotOurs` as a note), and the cell goes on."""

    def __init__(self, cell: Cell):
        self.cell = cell

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.cell.ran.append(name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except NotOurs as e:
            self.cell.notes[name] = str(e)
        except Exception as e:  # noqa: BLE001 - every failure becomes the check's line
            self.cell.failed[name] = one_line(e)


# ---------------------------------------------------------------------------------------------
# references: the model's own forward


def padded_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding) of tokenized examples."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def text_batch(tok) -> dict[str, torch.Tensor]:
    """Rows of different lengths, right-padded, for comparing logits (no training data needed)."""
    texts = [f"{r['instruction']} {r['input']} = {r['output']}" for r in SORT_ROWS] + [SHORT_PROMPT]
    enc = tok(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}


@torch.no_grad()
def own_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own forward on a padded batch: float32 logits (B, T, vocab) of the T input
    positions (virtual-token positions, where a forward returns them first, are cut)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return logits[:, -batch["input_ids"].shape[1]:]


def own_loss(model: nn.Module, batch: dict) -> float:
    """Mean next-token cross-entropy of the model's own logits over the supervised labels."""
    logits = own_logits(model, batch)[:, :-1]
    targets = batch["labels"][:, 1:]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100))


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, atol: float, what: str) -> None:
    """Max |difference| over real (unpadded) positions within ``atol``."""
    diff = float((actual - expected).abs()[mask.bool()].max())
    assert diff <= atol, f"{what}: max logit difference {diff:.2e} > {atol:.0e}"


def assert_loss_equal(ours: float, reference: float, what: str) -> None:
    assert math.isfinite(ours) and abs(ours - reference) <= LOSS_TOL * max(1.0, abs(reference)), \
        f"{what} {ours:.6f} vs the model's own {reference:.6f} (difference {abs(ours - reference):.2e})"


_BASES: dict[Path, nn.Module] = {}


def base_model(model_dir: Path, quantized: bool = False) -> nn.Module:
    """A fresh copy of the family's base model as transformers loads it (NF4 through bitsandbytes
    when quantized; the float32 one is loaded once and deep-copied, ~10x faster than a load)."""
    from peftcli import models

    if quantized:
        return models.load_model(str(model_dir), "nf4")
    if model_dir not in _BASES:
        _BASES[model_dir] = models.load_model(str(model_dir))
    return copy.deepcopy(_BASES[model_dir])


def hf_made_adapter(model_dir: Path, variant, out: Path, batch: dict) -> torch.Tensor:
    """HF peft's own adapter for ``variant`` on the base, moved off its start and saved to
    ``out``; returns HF peft's logits on ``batch``. Raises NotOurs where HF peft refuses its own
    config or cannot run it (no reference to compare with)."""
    import peft

    cls, keys = variant.hf
    base = base_model(model_dir, variant.quantized)
    try:
        hf = peft.get_peft_model(base, getattr(peft, cls)(task_type="CAUSAL_LM", **keys))
        nudge(hf, scale=0.2)  # every trainable tensor off its start (zero B, unit IA3 vectors, ...)
        logits = own_logits(hf.eval(), batch)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        raise NotOurs(f"HF peft cannot build or run {cls} on this model: {one_line(e)}") from None
    hf.save_pretrained(out)
    return logits


# ---------------------------------------------------------------------------------------------
# one cell


def run_cell(family: str, variant_name: str, model_dir: Path, tmp: Path) -> Cell:
    from rich.console import Console

    from peftcli import artifacts
    from peftcli.trainer import train

    variant, cell = VARIANTS[variant_name], Cell(family, variant_name)
    check = Checks(cell)
    tok = AutoTokenizer.from_pretrained(model_dir)
    logit_batch = text_batch(tok)
    mask = logit_batch["attention_mask"]

    result = None
    recipe = tiny_run_recipe(tmp, model_dir, variant.method, eval_rows=True, max_steps=2,
                             micro_batch_size=len(SORT_ROWS))  # one micro-batch per step: all 4 rows
    if (family, variant_name) in REFUSED:  # the method cannot apply: one line, no training
        with check("refused"):
            with pytest.raises(UserError, match=re.escape(REFUSED[family, variant_name])) as refusal:
                train(recipe, console=Console(quiet=True))
            assert "\n" not in str(refusal.value)
        return cell
    with check("train"):
        result = train(recipe, console=Console(quiet=True))
    if result is not None:
        trained_checks(check, variant, result, model_dir, logit_batch)

    if variant.hf is not None:
        with check("ours_loads_hf"):
            hf_logits = hf_made_adapter(model_dir, variant, tmp / "hf_adapter", logit_batch)
            overrides = {"quantization": "nf4"} if variant.quantized else None
            ours = artifacts.load_adapted(tmp / "hf_adapter", model_overrides=overrides).model
            assert_logits_close(own_logits(ours, logit_batch), hf_logits, mask, ATOL["hf"],
                                "ours on HF peft's adapter vs HF peft")
        theirs, ours_file = cell.notes.get("ours_loads_hf", ""), cell.failed.get("hf_loads_ours")
        if ours_file and theirs:  # HF peft cannot run this method on this model at all: no reference either way
            cell.notes["hf_loads_ours"] = f"HF peft fails on its own adapter ({theirs}); on ours: {cell.failed.pop('hf_loads_ours')}"
    return cell


def trained_checks(check: Checks, variant, result, model_dir: Path, logit_batch: dict) -> None:
    """The checks of a finished run (see the module docstring)."""
    from peftcli import artifacts, evaluate, merge, methods
    from peftcli.data import render_prompt
    from peftcli.rundir import read_events

    cell, run, mask = check.cell, result.run_dir, logit_batch["attention_mask"]
    cell.loss_path, cell.padding_free = result.summary.get("loss_path"), result.summary.get("padding_free")
    losses = [e["loss"] for e in read_events(run / "metrics.jsonl") if e.get("event") == "train"]
    with check("finite"):
        assert len(losses) == 2 and all(map(math.isfinite, losses)), f"train losses {losses}"
        assert math.isfinite(result.summary["eval_loss"]), f"eval loss {result.summary['eval_loss']}"

    adapted = None
    with check("reload"):
        loaded = artifacts.load_adapted(run)
        adapted, tok = loaded.model, loaded.tokenizer
        expected = own_logits(adapted, logit_batch)
        assert_logits_close(expected, own_logits(result.model.eval(), logit_batch), mask, ATOL["reload"],
                            "reloaded vs trained")
    if adapted is None:
        return

    with check("changed"):  # 2 steps at lr 1e-2 move the logits: a method that trains nothing is caught here
        base_logits = own_logits(base_model(model_dir, variant.quantized), logit_batch)[mask.bool()]
        moved, scale = float((expected[mask.bool()] - base_logits).abs().max()), float(base_logits.std())
        assert moved > CHANGED * scale, f"the adapted model's logits differ from the base's by only {moved:.1e} " \
                                        f"(base logits' std {scale:.1e})"

    with check("own_loss"):
        rows = "padding-free rows" if cell.padding_free else "padded rows"
        batch = padded_batch(result.datasets.eval, tok.pad_token_id)  # the 4 rows: also each step's micro-batch
        if variant.identity_init:  # step 1 trained on the base model itself
            assert_loss_equal(losses[0], own_loss(base_model(model_dir, variant.quantized), batch),
                              f"step-1 train loss ({rows})")
        assert_loss_equal(result.summary["eval_loss"], own_loss(adapted, batch), "final eval loss")

    with check("generate"):
        prompts = [render_prompt(SORT_ROWS[0], "alpaca", tok), SHORT_PROMPT]
        cached = evaluate.generate(adapted, tok, prompts, NEW_TOKENS, use_cache=True)
        uncached = evaluate.generate(adapted, tok, prompts, NEW_TOKENS, use_cache=False)
        assert cached == uncached, f"cache on {cached} != off {uncached}"

    if methods.get(variant.method["name"]).CANNOT_MERGE is None:
        with check("merge"):
            out = run.parent / "merged"
            merge.merge_adapter(run, out, log=lambda _: None)
            merged = AutoModelForCausalLM.from_pretrained(out).eval()
            assert_logits_close(own_logits(merged, logit_batch), expected, mask, ATOL["merge"], "merged vs adapted")

    if variant.hf is not None:
        from peft import PeftModel

        with check("hf_loads_ours"):
            hf = PeftModel.from_pretrained(base_model(model_dir, variant.quantized), run / "adapter").eval()
            assert_logits_close(own_logits(hf, logit_batch), expected, mask, ATOL["hf"], "HF peft on our adapter vs ours")


def test_zoo_covers_every_registered_method():
    from peftcli.methods import METHODS

    # a method added to the registry needs its line in tests/zoo.py VARIANTS
    assert {v.method["name"] for v in VARIANTS.values()} == set(METHODS)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(families()))
def test_zoo(family, variant, family_dir, tmp_path, record, monkeypatch):
    from peftcli import rundir

    monkeypatch.setattr(rundir, "plot_loss", lambda *a, **k: None)  # loss.png: 0.7 s of matplotlib, tested elsewhere
    t0 = time.perf_counter()
    try:
        model_dir = family_dir(family)
    except Exception as e:
        record(Cell(family, variant, notes={"base": f"the tiny config does not build in transformers: {one_line(e)}"}))
        raise
    cell = run_cell(family, variant, model_dir, tmp_path)
    cell.seconds = time.perf_counter() - t0
    record(cell)
    assert not cell.failed, f"{family} × {variant}: " + "; ".join(f"{k}: {v}" for k, v in cell.failed.items())


# ---------------------------------------------------------------------------------------------
# per family: the base in transformers itself, and all-linear


def linear_modules(model: nn.Module) -> set[str]:
    """Paths of the model's Linear and Conv1D (GPT-2's transposed linear) modules."""
    from transformers.pytorch_utils import Conv1D

    return {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def hf_all_linear(model: nn.Module) -> set[str]:
    """The Linear/Conv1D modules HF peft's ``target_modules="all-linear"`` wraps. Its parameter
    targets (fused MoE experts, the router's weight) are not modules: the interop checks cover
    those, and whether the router is adapted is a choice (C15: not unless asked)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    hf = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    return {name.removeprefix("base_model.model.") for name, m in hf.named_modules()
            if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)}


@pytest.mark.parametrize("family", list(families()))
def test_zoo_family(family, family_dir, record):
    from peftcli.methods import lora

    cell = Cell(family, "family")
    check = Checks(cell)
    with check("base"):  # transformers alone: a failure here is not peftcli's
        model_dir = family_dir(family)
        tok = AutoTokenizer.from_pretrained(model_dir)
        base = base_model(model_dir)
        assert torch.isfinite(own_logits(base, text_batch(tok))).all(), "non-finite logits"
        enc = tok(["the quick brown fox jumps", "hello"], padding=True, padding_side="left", return_tensors="pt")
        greedy = [base.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=c, pad_token_id=tok.pad_token_id)
                  for c in (True, False)]
        assert torch.equal(*greedy), "transformers' own greedy output differs with the cache on and off"
    if "base" in cell.failed:
        cell.notes["base"] = "the tiny config does not run in transformers on CPU: " + cell.failed.pop("base")
    else:
        with check("all_linear"):
            base = base_model(model_dir)
            linear = linear_modules(base)
            ours = set(lora.apply(base, lora.Config(**LORA))) & linear  # modules; parameter targets aside
            hf = hf_all_linear(base_model(model_dir))
            assert ours == hf, f"ours only {sorted(ours - hf)[:4]}, HF peft only {sorted(hf - ours)[:4]}"
    record(cell)
    assert not cell.failed and not cell.notes, {**cell.failed, **cell.notes}


# ---------------------------------------------------------------------------------------------
# through the command line


CLI_CELLS = [(f, v) for f, v in [("gpt2", "lora"), ("mixtral", "lora"), ("gemma2", "prompt")] if f in families()]


@pytest.mark.parametrize("family,variant", CLI_CELLS, ids=[f"{f}-{v}" for f, v in CLI_CELLS])
def test_zoo_cli_smoke(family, variant, family_dir, tmp_path, record):
    from peftcli.recipe import dump

    recipe = tiny_run_recipe(tmp_path, family_dir(family), VARIANTS[variant].method)
    (tmp_path / "recipe.yaml").write_text(dump(recipe))
    p = subprocess.run([PEFT, "train", str(tmp_path / "recipe.yaml"), "--smoke"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    cell = Cell(family, f"cli:{variant}")
    with Checks(cell)("cli_smoke"):
        tail = (p.stderr.strip().splitlines() or [""])[-1]
        assert p.returncode == 0 and "FAIL" not in p.stderr, f"exit {p.returncode}: {tail}"
        assert "smoke ok   adapter saved and reloaded" in p.stderr, tail
    record(cell)
    assert not cell.failed, p.stderr[-2000:]
