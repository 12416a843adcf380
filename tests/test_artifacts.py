"""Adapter dir read/write: HF peft parity both ways, fingerprint check, atomic save."""

from __future__ import annotations

import json
import os
from functools import partial

import pytest
import safetensors.torch
import torch
import yaml
from helpers import logits, method_recipe, perturb, saved_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import save_tiny
from transformers import AutoModelForCausalLM

from peftcli import artifacts, models
from peftcli.errors import UserError
from peftcli.methods import lora
from peftcli.recipe import dump

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
make_recipe = partial(method_recipe, "lora", r=4, alpha=8)


def trained(base_dir, out_dir, **method_keys):
    """Our LoRA on the base with random non-zero B, saved to ``out_dir``; returns the model."""
    return saved_adapter(make_recipe(base_dir, **method_keys), out_dir, lambda model: perturb(model, ["lora_B"]))


# ---------------------------------------------------------------------------------------------
# HF peft parity


@pytest.mark.parametrize("method_keys", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r"model\.layers\.\d+\.(self_attn\.(q|k)_proj|mlp\.up_proj)"},
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "v_proj"], "r": 16, "alpha": 16, "rslora": True},
    {"target_modules": ["q_proj", "down_proj"], "layers": [1]},
    {"target_modules": "all-linear", "layers": [0]},
], ids=["names", "regex", "all-linear", "rslora", "names+layers", "all-linear+layers"])
def test_our_adapter_loads_in_hf_peft(tiny_dir, tmp_path, method_keys):
    model = trained(tiny_dir, tmp_path / "adapter", dropout=0.1, **method_keys)
    ours = logits(model.eval(), IDS)
    cfg = artifacts.read_adapter_config(tmp_path / "adapter")

    # HF peft on the same files; it warns that it ignores our "peftcli" block and loads anyway
    with pytest.warns(UserWarning, match="peftcli"):
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]),
                                       tmp_path / "adapter").eval()
    hf_wrapped = sorted(n.removeprefix("base_model.model.") for n, m in hf.named_modules()
                        if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    assert hf_wrapped == sorted(lora.lora_layers(model))
    if method_keys.get("rslora"):
        assert hf.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 4.0
    torch.testing.assert_close(logits(hf, IDS), ours, atol=1e-4, rtol=0)

    # and our own reload of the same files
    loaded = artifacts.load_adapted(tmp_path / "adapter")
    reloaded = loaded.model
    assert loaded.method == "lora" and sorted(lora.lora_layers(reloaded)) == hf_wrapped
    torch.testing.assert_close(logits(reloaded, IDS), ours, atol=1e-6, rtol=0)


def test_adapter_config_fields(tiny_dir, tmp_path):
    trained(tiny_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], r=8, alpha=16, dropout=0.1)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (8, 16, 0.1, False)
    assert cfg["base_model_name_or_path"] == str(tiny_dir)
    block = cfg["peftcli"]
    assert block["version"] and len(block["base_fingerprint"]) == 16
    assert block["method"]["name"] == "lora" and block["model"]["quantization"] == "none"
    weights = safetensors.torch.load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sorted(weights) == sorted(f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
                                     for i in (0, 1) for p in "qv" for ab in "AB")
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    with safetensors.safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("target_modules,rslora", [(["q_proj", "v_proj"], False), ("all-linear", True)])
def test_hf_peft_adapter_loads_with_load_adapted(tiny_dir, tmp_path, target_modules, rslora):
    # HF peft trains (random B) and saves an adapter
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=target_modules, use_rslora=rslora))
    perturb(hf, ["lora_B"])
    hf.eval()
    expected = logits(hf, IDS)
    hf.save_pretrained(tmp_path / "hf_adapter")
    assert "peftcli" not in json.loads((tmp_path / "hf_adapter" / "adapter_config.json").read_text())

    loaded = artifacts.load_adapted(tmp_path / "hf_adapter")
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.method == "lora" and loaded.recipe is None and loaded.run_dir is None and loaded.base_path == str(tiny_dir)
    assert loaded.model_config.quantization == "none" and loaded.model_config.dtype == "float32"
    assert tok.pad_token_id is not None
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# reading a run dir


def test_run_dir_and_adapter_dir_both_load(tiny_dir, tmp_path):
    recipe = make_recipe(tiny_dir, target_modules=["q_proj"])
    trained(tiny_dir, tmp_path / "run" / "adapter", target_modules=["q_proj"])
    (tmp_path / "run" / "recipe.yaml").write_text(dump(recipe))
    assert artifacts.find_adapter_dir(tmp_path / "run") == tmp_path / "run" / "adapter"
    assert artifacts.find_adapter_dir(tmp_path / "run" / "adapter") == tmp_path / "run" / "adapter"
    loaded = artifacts.load_adapted(tmp_path / "run")
    assert loaded.adapter_dir == tmp_path / "run" / "adapter" and loaded.run_dir == tmp_path / "run"
    assert loaded.recipe.model_dump(mode="json") == yaml.safe_load(dump(recipe))
    assert loaded.config["peftcli"]["method"]["target_modules"] == ["q_proj"]
    # a checkpoint's adapter finds the run's recipe too
    trained(tiny_dir, tmp_path / "run" / "checkpoints" / "step-2" / "adapter", target_modules=["q_proj"])
    loaded = artifacts.load_adapted(tmp_path / "run" / "checkpoints" / "step-2")
    assert loaded.run_dir == tmp_path / "run"
    assert loaded.recipe.model_dump(mode="json") == yaml.safe_load(dump(recipe))


@pytest.mark.parametrize("text,why", [("method: {name: lora, r: 0}\n", "method.r:"),
                                      ("method: [unclosed\n", "malformed YAML")], ids=["invalid", "malformed"])
def test_a_bad_run_recipe_is_one_line_naming_the_file(tiny_dir, tmp_path, text, why):
    trained(tiny_dir, tmp_path / "run" / "adapter", target_modules=["q_proj"])
    (tmp_path / "run" / "recipe.yaml").write_text(text)
    with pytest.raises(UserError) as err:
        artifacts.load_adapted(tmp_path / "run")
    assert str(err.value).startswith(f"{tmp_path / 'run' / 'recipe.yaml'}") and why in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such run dir"):
        artifacts.find_adapter_dir(tmp_path / "missing")
    with pytest.raises(UserError, match=f"{tmp_path}: not a run dir or adapter dir"):
        artifacts.find_adapter_dir(tmp_path)
    with pytest.raises(UserError, match="no adapter_config.json"):
        artifacts.read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed JSON"):
        artifacts.read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "base_model_name_or_path": "x"}))
    with pytest.raises(UserError, match="peft_type 'VERA' is not supported"):
        artifacts.load_adapted(tmp_path)


def test_pickled_weights_are_never_loaded(tiny_dir, tmp_path):
    trained(tiny_dir, tmp_path / "adapter", target_modules=["q_proj"])
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(UserError, match="adapter_model.bin .*not loaded"):
        artifacts.load_adapted(tmp_path / "adapter")


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_mismatch_is_refused(tiny_dir, tmp_path):
    other = save_tiny(tmp_path / "other", seed=1)  # same shapes, different weights
    trained(tiny_dir, tmp_path / "adapter", target_modules=["q_proj"])
    file = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(file.read_text())
    recorded = cfg["peftcli"]["base_fingerprint"]
    cfg["base_model_name_or_path"] = cfg["peftcli"]["model"]["name_or_path"] = str(other)
    file.write_text(json.dumps(cfg))

    with pytest.raises(UserError) as err:
        artifacts.load_adapted(tmp_path / "adapter")
    other_fp = models.fingerprint(AutoModelForCausalLM.from_pretrained(other))
    assert str(err.value) == (f"adapter {tmp_path / 'adapter'} was trained on a different base model "
                              f"(fingerprint {recorded}, this base has {other_fp})")
    artifacts.load_adapted(tmp_path / "adapter", check_fingerprint=False)  # the caller may insist


def test_check_base_compares_with_the_loaded_base(tiny_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    other = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "other", seed=1))
    recorded = models.fingerprint(base)
    assert artifacts.check_base(recorded, base, "adapter A") == recorded
    assert artifacts.check_base(None, other, "adapter A") == models.fingerprint(other)  # nothing recorded: no check
    with pytest.raises(UserError) as err:
        artifacts.check_base(recorded, other, "--resume: RUN/checkpoints/step-2")
    assert str(err.value) == (f"--resume: RUN/checkpoints/step-2 was trained on a different base model "
                              f"(fingerprint {recorded}, this base has {models.fingerprint(other)})")
    assert artifacts.recorded_fingerprint({"peft_type": "LORA"}) is None  # HF peft records none
    assert artifacts.recorded_fingerprint({"peftcli": {"base_fingerprint": recorded}}) == recorded


def test_fingerprint_survives_a_dtype_override(tiny_dir, tmp_path):
    trained(tiny_dir, tmp_path / "adapter", target_modules=["q_proj"])
    loaded = artifacts.load_adapted(tmp_path / "adapter", model_overrides={"dtype": "bfloat16"})
    model = loaded.model
    assert model.dtype == torch.bfloat16 and loaded.model_config.dtype == "bfloat16"
    with pytest.raises(UserError, match="model.colour"):
        artifacts.load_adapted(tmp_path / "adapter", model_overrides={"colour": "red"})


# ---------------------------------------------------------------------------------------------
# atomic save


def test_interrupted_save_leaves_the_old_adapter_intact(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    model = trained(tiny_dir, out, target_modules=["q_proj"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    recipe = make_recipe(tiny_dir, target_modules=["q_proj"])
    perturb(model, ["lora_B"], seed=2)  # a later step's weights

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(safetensors.torch, "save", crash)  # save_adapter serialises with save(), then writes
    with pytest.raises(KeyboardInterrupt):
        artifacts.save_adapter(out, model, recipe, str(tiny_dir), "0" * 16)
    with pytest.raises(KeyboardInterrupt):
        artifacts.save_adapter(tmp_path / "fresh", model, recipe, str(tiny_dir), "0" * 16)

    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no partial dir, no temporaries
    monkeypatch.undo()

    artifacts.save_adapter(out, model, recipe, str(tiny_dir), "0" * 16)  # a complete save replaces it
    assert (out / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_save_refuses_a_file_in_the_way(tiny_dir, tmp_path):
    (tmp_path / "adapter").write_text("a file")
    with pytest.raises(UserError, match="not a directory"):
        trained(tiny_dir, tmp_path / "adapter", target_modules=["q_proj"])



def test_saved_dir_has_a_plain_dir_mode(tiny_dir, tmp_path):
    trained(tiny_dir, tmp_path / "adapter", target_modules=["q_proj"])
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's private 0700
