"""The one setup path (peftcli.prepare): data before the model, what a run gets, `peft validate`."""


import pytest
from helpers import write_jsonl, write_recipe
from tiny import SORT_ROWS, tiny_run_recipe
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from peftcli import data, models, prepare
from peftcli.cli import app
from peftcli.errors import UserError

LORA_QV = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
# the tiny Llama: 2 layers, hidden 64, q_proj 64 -> 64, v_proj 64 -> 32 (2 kv heads x 16);
# LoRA r=4 adds A (4 x in) and B (out x 4) to each: hand computation
LORA_QV_PARAMS = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
BAD_ROW = {"instruction": "Sort the numbers.", "input": "2, 1"}  # no "output"


def _recording(monkeypatch) -> list[str]:
    """Record the order in which setup builds the data and loads the model."""
    calls = []
    build, load_model = data.build, models.load_model
    monkeypatch.setattr(data, "build", lambda *a, **k: calls.append("data") or build(*a, **k))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: calls.append("model") or load_model(*a, **k))
    return calls


def test_a_bad_data_file_is_reported_before_the_model_loads(tmp_path, tiny_dir, monkeypatch):
    calls = _recording(monkeypatch)
    recipe = tiny_run_recipe(tmp_path, tiny_dir, LORA_QV, rows=SORT_ROWS + [BAD_ROW])
    with pytest.raises(UserError, match="missing field 'output' for format alpaca"):
        prepare.load(recipe)
    assert calls == ["data"]  # the model never loaded


def test_load_gives_the_run_its_data_model_and_counts(tmp_path, tiny_dir, monkeypatch):
    calls = _recording(monkeypatch)
    recipe = tiny_run_recipe(tmp_path, tiny_dir, LORA_QV, eval_rows=True, eval_max_samples=3)
    p = prepare.load(recipe)
    assert calls == ["data", "model"]
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)  # the base, loaded apart: the reference
    assert p.trainable == LORA_QV_PARAMS and p.base_params == sum(t.numel() for t in base.parameters())
    assert p.fingerprint == models.fingerprint(base)  # of the base before the method
    assert len(p.targets) == 4 and all(t.endswith(("q_proj", "v_proj")) for t in p.targets)
    assert len(p.datasets.train) == len(SORT_ROWS) and len(p.eval_examples) == 3 and p.mixed == "no"


def test_check_base_runs_before_the_method(tmp_path, tiny_dir):
    seen = []

    def refuse(model):
        seen.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
        raise UserError("--resume: another base")

    with pytest.raises(UserError, match="another base"):
        prepare.load(tiny_run_recipe(tmp_path, tiny_dir, LORA_QV), check_base=refuse)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert seen == [sum(p.numel() for p in base.parameters())]  # called once, on the base before the method


def _recipe_file(tmp_path, tiny_dir, rows) -> str:
    rows_file = write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = {"model": {"name_or_path": str(tiny_dir), "dtype": "float32"}, "method": LORA_QV,
              "data": {"train": {"path": str(rows_file), "format": "alpaca"}},
              "train": {"micro_batch_size": 2, "mixed_precision": "no"}, "output": {"dir": str(tmp_path / "run")}}
    return str(write_recipe(tmp_path / "recipe.yaml", recipe))


def test_validate_prints_what_the_run_would_train(tmp_path, tiny_dir):
    result = CliRunner().invoke(app, ["validate", _recipe_file(tmp_path, tiny_dir, SORT_ROWS)])
    assert result.exit_code == 0, result.output
    assert f"data: {len(SORT_ROWS)} of {len(SORT_ROWS)} train rows kept" in result.output
    assert "matched 4 modules: " in result.output
    assert f"trainable parameters: {LORA_QV_PARAMS:,} = " in result.output
    assert "loss path: " in result.output and "peak memory estimate: " in result.output
    assert not (tmp_path / "run").exists()  # validate writes nothing


def test_validate_reports_bad_data_before_the_model_loads(tmp_path, tiny_dir, monkeypatch):
    calls = _recording(monkeypatch)
    result = CliRunner().invoke(app, ["validate", _recipe_file(tmp_path, tiny_dir, SORT_ROWS + [BAD_ROW])])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ") and "row 5" in result.output, result.output
    assert calls == ["data"]
