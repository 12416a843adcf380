"""(IA)³: the layer, HF peft file parity both ways, merge (fp32 and NF4 base), a tiny training run."""

from __future__ import annotations

import json
import math
from functools import partial

import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers import logits, method_recipe, perturb, saved_adapter
from peft import IA3Config, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from tiny import tiny_llama, tiny_run_recipe
from transformers import AutoModelForCausalLM

from peftcli import artifacts, merge
from peftcli.errors import UserError
from peftcli.methods import ia3

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
# vectors away from ones, as if trained (ones is the init); names work for ours and HF peft's
randomize = partial(perturb, names=["ia3_l"], scale=0.5, shift=1.0)
# HF peft (the reference) warns that it ignores our "peftcli" block in adapter_config.json
pytestmark = pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['peftcli'\]")


def trained(base_dir, adapter_dir, quantization="none", **method_keys):
    """Our IA3 on the base with random vectors, saved to ``adapter_dir``; returns the model (eval)."""
    return saved_adapter(method_recipe("ia3", base_dir, quantization, **method_keys), adapter_dir, randomize)


# ---------------------------------------------------------------------------------------------
# the layer


def test_ones_init_gives_base_logits_and_only_vectors_train():
    expected = logits(tiny_llama(), IDS)
    model = tiny_llama()  # same seed: same weights
    names = ia3.apply(model, method_recipe("ia3").method)
    assert names == [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    layers = ia3.ia3_layers(model)
    assert all(torch.equal(m.ia3_l, torch.ones_like(m.ia3_l)) for m in layers.values())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".ia3_l") for n in trainable)
    # hand computation: per block k (32 outputs) + v (32 outputs) + down_proj input (128) = 192
    assert sum(trainable.values()) == 2 * (32 + 32 + 128)
    assert torch.equal(logits(model, IDS), expected)  # x · 1: bit-identical


def test_output_and_input_scaling_by_hand():
    model = tiny_llama()
    ia3.apply(model, method_recipe("ia3").method)
    randomize(model)
    k = model.model.layers[0].self_attn.k_proj
    down = model.model.layers[0].mlp.down_proj
    assert (k.is_feedforward, k.ia3_l.shape) == (False, (32,))
    assert (down.is_feedforward, down.ia3_l.shape) == (True, (128,))
    x, h = torch.randn(3, 64), torch.randn(3, 128)
    with torch.no_grad():
        # hand computation: l ⊙ (W x) for keys; W (l ⊙ h) for the feed-forward input
        torch.testing.assert_close(k(x), (x @ k.base_layer.weight.T) * k.ia3_l, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(down(h), (h * down.ia3_l) @ down.base_layer.weight.T, atol=1e-6, rtol=1e-6)


def test_saved_keys_and_shapes_equal_hf_peft():
    model = tiny_llama()
    ia3.apply(model, method_recipe("ia3").method)
    ours = {k: tuple(v.shape) for k, v in ia3.state_dict(model).items()}
    # HF peft on the same spec (its Llama defaults are the same): keys and layouts
    hf = get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]))
    assert ours == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(hf).items()}
    assert ours["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"] == (32, 1)
    assert ours["base_model.model.model.layers.0.mlp.down_proj.ia3_l"] == (1, 128)


def test_feedforward_must_be_within_targets():
    with pytest.raises(UserError, match=r"feedforward_modules \['up_proj'\] are not in target_modules"):
        method_recipe("ia3", target_modules=["k_proj", "v_proj"], feedforward_modules=["up_proj"])
    with pytest.raises(UserError, match="feedforward_modules"):
        ia3.config_from_adapter({"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]})
    with pytest.raises(UserError, match="matched no module"):
        ia3.apply(tiny_llama(), method_recipe("ia3", target_modules=["query"], feedforward_modules=[]).method)


# ---------------------------------------------------------------------------------------------
# HF peft parity


@pytest.mark.parametrize("method_keys", [
    {},
    {"target_modules": ["q_proj", "o_proj", "up_proj", "down_proj"], "feedforward_modules": ["up_proj", "down_proj"]},
    {"target_modules": r"model\.layers\.\d+\.(self_attn\.v_proj|mlp\.(gate|down)_proj)", "feedforward_modules": r".*\.down_proj"},
], ids=["defaults", "names", "regex"])
def test_our_adapter_loads_in_hf_peft(tiny_dir, tmp_path, method_keys):
    model = trained(tiny_dir, tmp_path / "adapter", **method_keys)
    ours = logits(model, IDS)
    assert (ours - logits(AutoModelForCausalLM.from_pretrained(tiny_dir), IDS)).abs().max() > 1e-3  # vectors really changed it
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["init_ia3_weights"], cfg["fan_in_fan_out"], cfg["modules_to_save"]) == \
        ("IA3", "CAUSAL_LM", True, False, None)

    # HF peft on the same files
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]),
                                   tmp_path / "adapter").eval()
    hf_layers = {n.removeprefix("base_model.model."): m for n, m in hf.named_modules()
                 if hasattr(m, "ia3_l") and hasattr(m, "base_layer")}
    assert {n: m.is_feedforward for n, m in hf_layers.items()} == {n: m.is_feedforward for n, m in ia3.ia3_layers(model).items()}
    torch.testing.assert_close(logits(hf, IDS), ours, atol=1e-5, rtol=0)

    loaded = artifacts.load_adapted(tmp_path / "adapter")
    reloaded = loaded.model
    assert loaded.method == "ia3"
    assert torch.equal(logits(reloaded, IDS), ours)


def test_hf_peft_adapter_loads_with_load_adapted(tiny_dir, tmp_path):
    # HF peft "trains" (random vectors) and saves an IA3 adapter
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), IA3Config(task_type="CAUSAL_LM"))
    randomize(hf, seed=3)
    expected = logits(hf.eval(), IDS)
    hf.save_pretrained(tmp_path / "hf_adapter")
    assert "peftcli" not in json.loads((tmp_path / "hf_adapter" / "adapter_config.json").read_text())

    loaded = artifacts.load_adapted(tmp_path / "hf_adapter")
    model = loaded.model
    assert loaded.method == "ia3" and loaded.base_path == str(tiny_dir)
    assert sorted(ia3.ia3_layers(model)) == sorted(f"model.layers.{i}.{p}" for i in (0, 1)
                                                   for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"))
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# merge


def test_merge_end_to_end(tiny_dir, tmp_path):
    model = trained(tiny_dir, tmp_path / "adapter", target_modules=["k_proj", "v_proj", "o_proj", "down_proj"])
    adapted = logits(model, IDS)
    layers = ia3.ia3_layers(model)
    k, down = layers["model.layers.0.self_attn.k_proj"], layers["model.layers.1.mlp.down_proj"]
    # hand computation, float32: l[:, None] · W for an output vector, W · l[None, :] for an input one
    expected_k = k.base_layer.weight.detach() * k.ia3_l.detach()[:, None]
    expected_down = down.base_layer.weight.detach() * down.ia3_l.detach()[None, :]

    out = merge.merge_adapter(tmp_path / "adapter", tmp_path / "merged")

    saved = load_file(str(out / "model.safetensors"))
    assert torch.equal(saved["model.layers.0.self_attn.k_proj.weight"], expected_k)
    assert torch.equal(saved["model.layers.1.mlp.down_proj.weight"], expected_down)
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged, IDS), adapted, atol=1e-5, rtol=0)


def test_merge_scales_the_bias_of_an_output_vector_only():
    out_layer = ia3.IA3Linear(torch.nn.Linear(8, 6), is_feedforward=False)
    in_layer = ia3.IA3Linear(torch.nn.Linear(8, 6), is_feedforward=True)
    model = torch.nn.Sequential(out_layer, torch.nn.ReLU(), torch.nn.Linear(6, 8), in_layer)
    randomize(model)
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = model(x)
        b_out, b_in = out_layer.base_layer.bias.clone(), in_layer.base_layer.bias.clone()
        l_out = out_layer.ia3_l.clone()
        ia3.merge(model)
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
    assert type(model[0]) is torch.nn.Linear and type(model[3]) is torch.nn.Linear
    assert torch.equal(model[0].bias, b_out * l_out) and torch.equal(model[3].bias, b_in)


def test_nf4_base_merges_into_dequantized_weight_times_vector(tiny_dir, tmp_path):
    model = trained(tiny_dir, tmp_path / "adapter", quantization="nf4")
    adapted = logits(model, IDS)
    expected = {}
    for name, layer in ia3.ia3_layers(model).items():
        w4 = layer.base_layer.weight
        dequant = bnbf.dequantize_4bit(w4.data, w4.quant_state).float()  # reference: bitsandbytes directly
        vec = layer.ia3_l.detach()
        expected[name] = dequant * vec[None, :] if layer.is_feedforward else dequant * vec[:, None]

    out = merge.merge_adapter(tmp_path / "adapter", tmp_path / "merged")

    saved = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    for name, want in expected.items():
        torch.testing.assert_close(saved[name + ".weight"], want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), IDS), adapted, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# a tiny training run


def test_tiny_training_run_and_reload(tmp_path, tiny_dir):
    from peftcli.rundir import read_events
    from peftcli.trainer import train

    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "ia3"})

    result = train(recipe)

    losses = [e["loss"] for e in read_events(result.run_dir / "metrics.jsonl") if e["event"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert result.summary["trainable_params"] == 2 * (32 + 32 + 128)
    assert any(not torch.equal(m.ia3_l, torch.ones_like(m.ia3_l)) for m in ia3.ia3_layers(result.model).values())
    reloaded = artifacts.load_adapted(result.run_dir).model
    assert torch.equal(logits(reloaded, IDS), logits(result.model, IDS))
