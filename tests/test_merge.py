"""Merging an adapter into its base (C1 parity and dtype, C2 4-bit base, C3 tied embeddings)."""

from __future__ import annotations

import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers import logits, method_recipe, perturb, saved_adapter
from peft import PeftModel
from safetensors.torch import load_file
from tiny import save_tiny
from transformers import AutoModelForCausalLM

from peftcli import merge, models
from peftcli.errors import UserError
from peftcli.methods import lora

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
QVO = ["q_proj", "v_proj", "o_proj"]
# HF peft (the reference) warns that it ignores our "peftcli" block in adapter_config.json
pytestmark = pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['peftcli'\]")


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tied") / "base", tie_word_embeddings=True)


def train_adapter(base_dir, run_dir, quantization="none", dtype="float32", method="lora", **method_keys):
    """Load the base as a recipe says, apply LoRA with random non-zero B (as if trained), save
    the adapter into ``run_dir/adapter``; return the adapted model (eval mode)."""
    recipe = method_recipe(method, base_dir, quantization, dtype, r=4, alpha=8, **method_keys)
    return saved_adapter(recipe, run_dir / "adapter", lambda model: perturb(model, ["lora_B"]))


def base_weights(base_dir) -> dict[str, torch.Tensor]:
    return load_file(str(base_dir / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# C1 merge parity and dtype


def test_C1_merge_parity_fp32(tiny_dir, tmp_path):
    model = train_adapter(tiny_dir, tmp_path, target_modules=QVO, dropout=0.1)
    assert not any(m.training for m in model.modules())  # eval mode: dropout 0.1 is off
    adapted = logits(model, IDS)
    assert (adapted - logits(AutoModelForCausalLM.from_pretrained(tiny_dir), IDS)).abs().max() > 1e-3  # B really is non-zero

    lora.merge(model)  # in memory
    assert not lora.lora_layers(model)
    torch.testing.assert_close(logits(model, IDS), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_C1_merge_half_base_on_cpu(tiny_dir, tmp_path, dtype):
    torch_dtype = models.DTYPES[dtype]
    model = train_adapter(tiny_dir, tmp_path, dtype=dtype, target_modules=QVO, dropout=0.1)
    q = lora.lora_layers(model)["model.layers.0.self_attn.q_proj"]
    W, A, B = q.base_layer.weight.detach().clone(), q.lora_A.weight.detach().clone(), q.lora_B.weight.detach().clone()
    k_before = model.model.layers[0].self_attn.k_proj.weight.detach().clone()

    out = merge.merge_adapter(tmp_path, tmp_path / "merged")  # no "not implemented for Half"

    saved = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch_dtype}  # the base dtype is kept
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    # one rounding of (W + scale·B·A) summed in float32 (hand computation)
    expected = (W.float() + (8 / 4) * (B.float() @ A.float())).to(torch_dtype)
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], expected)
    assert torch.equal(saved["model.layers.0.self_attn.k_proj.weight"], k_before)  # untouched layer unchanged
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch_dtype
    assert torch.isfinite(logits(reloaded, IDS)).all()


def test_C1_merge_half_base_into_float32(tiny_dir, tmp_path):
    """--dtype float32 from a bfloat16 base: W upcast exactly, the sum kept in float32 (no
    bfloat16 rounding in between)."""
    model = train_adapter(tiny_dir, tmp_path, dtype="bfloat16", target_modules=["q_proj"])
    q = lora.lora_layers(model)["model.layers.1.self_attn.q_proj"]
    expected = q.base_layer.weight.detach().float() + 2.0 * (q.lora_B.weight @ q.lora_A.weight).detach()

    out = merge.merge_adapter(tmp_path, tmp_path / "merged", dtype="float32")

    saved = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    torch.testing.assert_close(saved["model.layers.1.self_attn.q_proj.weight"], expected, atol=1e-7, rtol=1e-6)


def test_C1_merge_of_an_auto_run_trained_in_bf16_writes_the_float32_base_as_stored(tiny_dir, tmp_path, monkeypatch):
    """model.dtype auto on a CPU with bf16 units (training stores the frozen Linear weights in
    bf16 for its autocast); the merge still folds into the base as stored (float32), never into a
    bfloat16 rounding."""
    monkeypatch.setenv("PEFTCLI_CPU_BF16", "1")
    model = train_adapter(tiny_dir, tmp_path, dtype="auto", target_modules=["q_proj"])
    q = lora.lora_layers(model)["model.layers.1.self_attn.q_proj"]
    models.store_linear_weights(model, torch.bfloat16)  # how the run held its base
    assert q.base_layer.weight.dtype == torch.bfloat16
    stored = base_weights(tiny_dir)  # float32 on disk: the reference
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = stored[name] + 2.0 * (q.lora_B.weight @ q.lora_A.weight).detach()  # scale alpha/r = 8/4

    messages = []
    out = merge.merge_adapter(tmp_path, tmp_path / "merged", log=messages.append)

    saved = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    torch.testing.assert_close(saved[name], expected, atol=1e-7, rtol=1e-6)
    k = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(saved[k], stored[k])  # untouched: bit for bit the stored float32, not bf16-rounded
    assert not torch.equal(stored[k], stored[k].to(torch.bfloat16).float())
    assert "dtype float32 (the base's stored dtype, for model.dtype auto" in messages[0]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peftcli"]["model"]["dtype"] == "auto"


def test_C2_merge_of_an_auto_qlora_run_keeps_the_unquantised_modules_as_stored(tiny_dir, tmp_path, monkeypatch):
    """QLoRA with model.dtype auto on a CPU with bf16 units (the run computes in bfloat16, scoring
    in float32); the merge loads the unquantised modules in float32, as stored."""
    monkeypatch.setenv("PEFTCLI_CPU_BF16", "1")
    model = train_adapter(tiny_dir, tmp_path, quantization="nf4", dtype="auto", method="qlora", target_modules=["q_proj"])
    assert model.model.norm.weight.dtype == torch.float32  # an auto 4-bit base loaded for scoring computes in float32

    out = merge.merge_adapter(tmp_path, tmp_path / "merged")

    saved, stored = load_file(str(out / "model.safetensors")), base_weights(tiny_dir)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
        assert torch.equal(saved[name], stored[name]), name


# ---------------------------------------------------------------------------------------------
# C2 merge from a 4-bit base


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_C2_merge_from_4bit_base(tiny_dir, tmp_path, quantization):
    model = train_adapter(tiny_dir, tmp_path, quantization=quantization, method="qlora", target_modules=["q_proj", "v_proj"])
    layers = lora.lora_layers(model)
    # reference, computed here with bitsandbytes directly: dequant(W_4bit) + scale·B·A
    expected = {}
    for name, layer in layers.items():
        w4 = layer.base_layer.weight
        expected[name] = bnbf.dequantize_4bit(w4.data, w4.quant_state).float() + 2.0 * (layer.lora_B.weight @ layer.lora_A.weight).detach()
    k = model.model.layers[0].self_attn.k_proj  # a 4-bit layer the adapter does not touch
    expected_k = bnbf.dequantize_4bit(k.weight.data, k.weight.quant_state).float()
    adapted = logits(model, IDS)

    messages = []
    out = merge.merge_adapter(tmp_path, tmp_path / "merged", log=messages.append)

    assert "dequantised" in messages[0] and "float32" in messages[0]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    saved = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    original = base_weights(tiny_dir)
    for name, want in expected.items():
        got = saved[name + ".weight"]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        assert (got - original[name + ".weight"]).abs().max() > 1e-3  # never the original W (+ update) nor an unchanged base
    torch.testing.assert_close(saved["model.layers.0.self_attn.k_proj.weight"], expected_k, atol=0, rtol=0)
    assert not torch.equal(saved["model.layers.0.self_attn.k_proj.weight"], original["model.layers.0.self_attn.k_proj.weight"])

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    torch.testing.assert_close(logits(merged, IDS), adapted, atol=1e-4, rtol=0)


def test_C2_merged_weight_is_not_the_unchanged_base(tiny_dir, tmp_path):
    """The merged weight differs from dequant(W_nf4) by exactly the update, scale·B·A."""
    model = train_adapter(tiny_dir, tmp_path, quantization="nf4", method="qlora", target_modules=["q_proj"])
    q = lora.lora_layers(model)["model.layers.0.self_attn.q_proj"]
    dequant = bnbf.dequantize_4bit(q.base_layer.weight.data, q.base_layer.weight.quant_state).float()
    out = merge.merge_adapter(tmp_path, tmp_path / "merged")
    got = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(got - dequant, 2.0 * (q.lora_B.weight @ q.lora_A.weight).detach(), atol=1e-6, rtol=1e-5)
    assert (got - dequant).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# PiSSA: the base holds the residual, the merge gives back the original W plus the trained update


def test_pissa_merge_is_original_weight_plus_trained_update(tiny_dir, tmp_path):
    model = train_adapter(tiny_dir, tmp_path, target_modules=["q_proj", "v_proj"], init="pissa", dropout=0.0)
    q = lora.lora_layers(model)["model.layers.0.self_attn.q_proj"]
    A, B, A0, B0 = (t.detach().clone() for t in (q.lora_A.weight, q.lora_B.weight, q.init_A, q.init_B))
    adapted = logits(model, IDS)

    out = merge.merge_adapter(tmp_path, tmp_path / "merged")

    # hand computation: W_res + 2·B A = W + 2·(B A − B0 A0), W the original (unmodified) base weight
    W = base_weights(tiny_dir)["model.layers.0.self_attn.q_proj.weight"]
    saved = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(saved["model.layers.0.self_attn.q_proj.weight"], W + 2.0 * (B @ A - B0 @ A0), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), IDS), adapted, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# C3 tied embeddings


def test_C3_tied_head_lora_merge_and_reload(tied_dir, tmp_path):
    model = train_adapter(tied_dir, tmp_path, target_modules=["lm_head"])
    assert model.get_input_embeddings().weight is model.lm_head.base_layer.weight  # tied base
    embedding = model.get_input_embeddings().weight.detach().clone()
    adapted = logits(model, IDS)

    # (a) merge in memory: the embedding stays bit-identical, logits equal the adapted model's
    lora.merge(model)
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(logits(model, IDS), adapted, atol=1e-5, rtol=0)
    merged_logits = logits(model, IDS)

    # (b) write with merge_adapter, reload from disk: same logits, still untied
    out = merge.merge_adapter(tmp_path, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr()
    assert torch.equal(reloaded.get_input_embeddings().weight, embedding)
    assert not torch.equal(reloaded.lm_head.weight, embedding)
    torch.testing.assert_close(logits(reloaded, IDS), merged_logits, atol=1e-6, rtol=0)


def test_C3_tied_model_with_lora_elsewhere_stays_tied(tied_dir, tmp_path):
    model = train_adapter(tied_dir, tmp_path, target_modules=["q_proj", "v_proj"])
    embedding = model.get_input_embeddings().weight.detach().clone()
    adapted = logits(model, IDS)
    out = merge.merge_adapter(tmp_path, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    assert torch.equal(reloaded.get_input_embeddings().weight, embedding)
    torch.testing.assert_close(logits(reloaded, IDS), adapted, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# end to end: save_adapter -> merge_adapter -> from_pretrained, with HF peft's merge as the reference


def test_merged_dir_logits_equal_adapted_model(tiny_dir, tmp_path):
    model = train_adapter(tiny_dir, tmp_path, target_modules="all-linear", dropout=0.1)
    adapted = logits(model, IDS)
    out = merge.merge_adapter(tmp_path, tmp_path / "merged")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged, IDS), adapted, atol=1e-4, rtol=0)

    # HF peft's merge_and_unload of the same adapter on the same base
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter").merge_and_unload()
    ours = merged.state_dict()
    for key, want in hf.state_dict().items():
        torch.testing.assert_close(ours[key], want, atol=1e-6, rtol=1e-6)
    # and the tokenizer came along
    assert (out / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_merge_replaces_a_previous_merge_and_leaves_no_temporaries(tiny_dir, tmp_path):
    train_adapter(tiny_dir, tmp_path, target_modules=["q_proj"])
    out = merge.merge_adapter(tmp_path, tmp_path / "merged")
    first = (out / "model.safetensors").read_bytes()
    merge.merge_adapter(tmp_path / "adapter", tmp_path / "merged", dtype="bfloat16", overwrite=True)
    assert (out / "model.safetensors").read_bytes() != first
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_merge_refuses_unmergeable_method_and_bad_targets(tiny_dir, tmp_path, monkeypatch):
    train_adapter(tiny_dir, tmp_path, target_modules=["q_proj"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="peft merge did not write it"):
        merge.merge_adapter(tmp_path, tmp_path / "notes")
    with pytest.raises(UserError, match="adapter being merged"):
        merge.merge_adapter(tmp_path, tmp_path)
    with pytest.raises(UserError, match="base model dir"):
        merge.merge_adapter(tmp_path, tiny_dir)
    with pytest.raises(UserError, match="--dtype"):
        merge.merge_adapter(tmp_path, tmp_path / "m", dtype="int4")
    monkeypatch.setattr(lora, "CANNOT_MERGE", "a test says so")
    with pytest.raises(UserError, match="method lora cannot be merged: "):
        merge.merge_adapter(tmp_path, tmp_path / "m")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine" and not (tmp_path / "m").exists()


def test_merge_refuses_an_output_dir_inside_the_adapter(tiny_dir, tmp_path):
    train_adapter(tiny_dir, tmp_path)
    for inside in (tmp_path / "adapter" / "merged", tmp_path / "adapter", tmp_path):
        with pytest.raises(UserError, match="overlaps the adapter being merged"):
            merge.merge_adapter(tmp_path, inside)
    assert not (tmp_path / "adapter" / "merged").exists()
