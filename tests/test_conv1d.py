"""C14: GPT-2's Conv1D layers (weight stored in × out, forward x @ W + b) are linear layers for
every weight method — target selection, training, files, merge (also from NF4) — with HF peft
0.21.2 on the same weights as the oracle."""

from __future__ import annotations

import json
import math

import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers import logits, method_recipe, perturb, saved_adapter
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import tiny_run_recipe, tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from peftcli import artifacts, merge, methods, models
from peftcli.methods import adapter, ia3, lora
from peftcli.rundir import read_events
from peftcli.trainer import train

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
BLOCK = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
GPT2_IA3 = {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}  # HF peft's GPT-2 defaults
METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    "dora": {"name": "lora", "r": 4, "alpha": 8, "dora": True, "target_modules": "all-linear"},
    "ia3": {"name": "ia3", **GPT2_IA3},
    "houlsby": {"name": "adapter", "variant": "houlsby", "reduction_factor": 8},
    "pfeiffer": {"name": "adapter", "variant": "pfeiffer", "reduction_factor": 8},
}
# HF peft (the reference) warns that it ignores our "peftcli" block, and that it sets fan_in_fan_out for Conv1D
pytestmark = [pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['peftcli'\]"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random 2-layer GPT-2 (n_embd 64, 4 heads, tied head) + the tiny tokenizer, saved."""
    tok = tiny_tokenizer()
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=len(tok),
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2") / "base"
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(gpt2_dir, tmp_path_factory):
    """method key -> a run trained for 2 steps by peftcli.trainer.train (trained once per module)."""
    done = {}

    def run(key):
        if key not in done:
            tmp = tmp_path_factory.mktemp(key)
            done[key] = train(tiny_run_recipe(tmp, gpt2_dir, METHODS[key], max_steps=2))
        return done[key]
    return run


def gpt2(path) -> GPT2LMHeadModel:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def trainable_grads(model) -> dict[str, torch.Tensor]:
    """Gradients of every trainable parameter for one LM loss on IDS (train mode)."""
    model.train()
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    model.eval()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# targets


def test_C14_all_linear_is_hf_peft_set(gpt2_dir):
    model = gpt2(gpt2_dir)
    ours = lora.find_targets(model, "all-linear")
    # HF peft on the same model: its all-linear expansion (Linear and Conv1D, minus the output head)
    hf = get_peft_model(gpt2(gpt2_dir), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert sorted(ours) == sorted(hf.peft_config["default"].target_modules) == sorted(BLOCK)
    assert "lm_head" not in ours
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in ours)


def test_C14_adapter_finds_gpt2_blocks(gpt2_dir):
    model = gpt2(gpt2_dir)
    for variant, parts in (("houlsby", ("attn.c_proj", "mlp.c_proj")), ("pfeiffer", ("mlp.c_proj",))):
        cfg = adapter.Config(variant=variant, reduction_factor=8)
        assert adapter.find_targets(model, cfg) == [f"transformer.h.{i}.{p}" for i in range(2) for p in parts]


def test_C14_ia3_vectors_match_hf_peft_gpt2_defaults(gpt2_dir, tmp_path):
    model = gpt2(gpt2_dir)
    ia3.apply(model, ia3.Config(**GPT2_IA3))
    ours = {k: tuple(v.shape) for k, v in ia3.state_dict(model).items()}
    # HF peft with its built-in GPT-2 defaults (target_modules / feedforward_modules unset)
    hf = get_peft_model(gpt2(gpt2_dir), IA3Config(task_type="CAUSAL_LM"))
    hf.save_pretrained(tmp_path / "hf")
    theirs = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "hf" / "adapter_model.safetensors")).items()}
    assert ours == theirs
    # the feed-forward flag: mlp.c_proj scales its 4·64 input, c_attn its 3·64 (q, k, v) output
    assert ours["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"] == (1, 256)
    assert ours["base_model.model.transformer.h.0.attn.c_attn.ia3_l"] == (192, 1)


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("key", list(METHODS))
def test_C14_every_method_trains_on_gpt2(runs, key):
    result = runs(key)

    losses = [e["loss"] for e in read_events(result.run_dir / "metrics.jsonl") if e["event"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    wrapped = [m for m in result.model.modules() if hasattr(m, "base_layer")]
    assert wrapped and all(isinstance(m.base_layer, Conv1D) for m in wrapped)
    grads = trainable_grads(result.model)
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not g.abs().max() > 0]
    reloaded = artifacts.load_adapted(result.run_dir).model
    torch.testing.assert_close(logits(reloaded, IDS), logits(result.model, IDS), atol=1e-6, rtol=0)


def test_C14_lora_layer_on_conv1d_is_hand_formula():
    torch.manual_seed(0)
    base = Conv1D(48, 16)  # nf = out 48, nx = in 16: weight (16, 48)
    layer = lora.LoRALinear(base, r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        want = x @ base.weight + base.bias + 2.0 * x @ (layer.lora_B.weight @ layer.lora_A.weight).T  # hand computation
        torch.testing.assert_close(layer.eval()(x), want, atol=1e-5, rtol=1e-5)
        assert layer.delta_weight().shape == layer.merged_weight().shape == (48, 16)  # ours: (out, in)
        torch.testing.assert_close(layer.merged_weight(), base.weight.T + layer.delta_weight(), atol=0, rtol=0)


def test_C14_pissa_on_conv1d_starts_at_the_base(gpt2_dir):
    model = gpt2(gpt2_dir)
    expected = logits(model, IDS)
    lora.apply(model, lora.Config(r=4, target_modules="all-linear", init="pissa", dropout=0.0))
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.base_layer.weight.shape == (64, 192)  # the residual keeps the Conv1D layout
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# files, both ways with HF peft


@pytest.mark.parametrize("key", ["lora", "dora", "ia3"])
def test_C14_hf_peft_loads_our_gpt2_adapters(gpt2_dir, runs, key):
    run = runs(key).run_dir
    ours = artifacts.load_adapted(run).model
    expected = logits(ours, IDS)
    assert (expected - logits(gpt2(gpt2_dir), IDS)).abs().max() > 1e-4  # the adapter changes the output
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True  # what HF peft writes for Conv1D targets

    hf = PeftModel.from_pretrained(gpt2(gpt2_dir), run / "adapter").eval()  # HF peft on the same files
    torch.testing.assert_close(logits(hf, IDS), expected, atol=1e-4, rtol=0)


def test_C14_we_load_hf_peft_gpt2_lora(gpt2_dir, tmp_path):
    hf = get_peft_model(gpt2(gpt2_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False, task_type="CAUSAL_LM"))  # random A and B
    hf.eval()
    expected = logits(hf, IDS)
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    loaded = artifacts.load_adapted(tmp_path / "hf")
    model = loaded.model
    assert loaded.method == "lora" and sorted(lora.lora_layers(model)) == sorted(BLOCK)
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-5, rtol=0)

    # the same keys and shapes as our own file for the same config
    ours = gpt2(gpt2_dir)
    lora.apply(ours, lora.Config(r=4, alpha=8, target_modules="all-linear"))
    theirs = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in lora.state_dict(ours).items()} == {k: v.shape for k, v in theirs.items()}


# ---------------------------------------------------------------------------------------------
# merge


def _assert_conv1d_files(merged_dir, base_dir):
    """The merged dir holds every base tensor in the base's layout, and reloads as Conv1D."""
    saved, original = load_file(str(merged_dir / "model.safetensors")), load_file(str(base_dir / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}
    reloaded = gpt2(merged_dir)
    assert all(isinstance(reloaded.get_submodule(n), Conv1D) for n in BLOCK)
    return saved, original, reloaded


@pytest.mark.parametrize("key", ["lora", "dora", "ia3"])
def test_C14_merge_writes_conv1d_layout_and_reloads(gpt2_dir, runs, tmp_path, key):
    run = runs(key).run_dir
    adapted_model = artifacts.load_adapted(run).model
    adapted = logits(adapted_model, IDS)

    out = merge.merge_adapter(run, tmp_path / "merged", dtype="float32")

    saved, original, reloaded = _assert_conv1d_files(out, gpt2_dir)
    torch.testing.assert_close(logits(reloaded, IDS), adapted, atol=1e-5, rtol=0)
    if key == "lora":  # hand computation, in the file's (in, out) layout: W' = W + s·(B A)ᵀ with s = 8/4
        layer = lora.lora_layers(adapted_model)["transformer.h.0.attn.c_proj"]  # square: a layout slip would load silently
        delta = 2.0 * (layer.lora_B.weight @ layer.lora_A.weight).detach()
        w = "transformer.h.0.attn.c_proj.weight"
        torch.testing.assert_close(saved[w], original[w] + delta.T, atol=1e-6, rtol=0)
        assert delta.abs().max() > 1e-4


def test_C14_merge_from_nf4_writes_conv1d_layout(gpt2_dir, tmp_path):
    recipe = method_recipe("qlora", gpt2_dir, "nf4", r=4, alpha=8, target_modules=["c_attn", "attn.c_proj"])
    model = saved_adapter(recipe, tmp_path / "adapter", lambda m: perturb(m, ["lora_B"]))  # B as if trained
    c_fc = model.transformer.h[0].mlp.c_fc  # not targeted: transformers holds a Conv1D as a transposed 4-bit Linear
    assert models.is_quantized_linear(c_fc) and c_fc.source_cls is Conv1D and (c_fc.in_features, c_fc.out_features) == (64, 256)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is False  # as HF peft on 4-bit
    adapted = logits(model, IDS)
    # reference, with bitsandbytes directly, in the file's (in, out) layout: dequant(W_nf4)ᵀ + s·(B A)ᵀ
    expected = {}
    for name, layer in lora.lora_layers(model).items():
        w4 = layer.base_layer.weight
        delta = 2.0 * (layer.lora_B.weight @ layer.lora_A.weight).detach()  # (out, in)
        expected[name] = (bnbf.dequantize_4bit(w4.data, w4.quant_state).float() + delta).T
    expected["transformer.h.0.mlp.c_fc"] = bnbf.dequantize_4bit(c_fc.weight.data, c_fc.weight.quant_state).float().T  # not adapted

    out = merge.merge_adapter(tmp_path / "adapter", tmp_path / "merged")

    saved, original, reloaded = _assert_conv1d_files(out, gpt2_dir)
    for name, want in expected.items():
        torch.testing.assert_close(saved[name + ".weight"], want, atol=1e-6, rtol=0)
    w = "transformer.h.0.mlp.c_fc.weight"  # the unadapted layer: the base's W up to the NF4 rounding
    assert 0 < (saved[w] - original[w]).abs().max() < 0.02
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded, IDS), adapted, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", [{"name": "qlora", "r": 4, "alpha": 8, "dora": True, "target_modules": "all-linear"},
                                    {"name": "ia3", **GPT2_IA3}], ids=["dora", "ia3"])
def test_C14_dora_and_ia3_merge_from_nf4_reload(gpt2_dir, tmp_path, method):
    recipe = method_recipe(**method, base_dir=gpt2_dir, quantization="nf4")
    model, _, base_path = models.load_base(str(gpt2_dir), "nf4")
    fp = models.fingerprint(model)
    methods.get(method["name"]).apply(model, recipe.method)
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: every trainable tensor moved off its initial value
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn_like(p) * 0.1)
    artifacts.save_adapter(tmp_path / "adapter", model, recipe, base_path, fp)
    adapted = logits(model.eval(), IDS)
    assert (adapted - logits(gpt2(gpt2_dir), IDS)).abs().max() > 1e-3

    out = merge.merge_adapter(tmp_path / "adapter", tmp_path / "merged")

    _, _, reloaded = _assert_conv1d_files(out, gpt2_dir)
    torch.testing.assert_close(logits(reloaded, IDS), adapted, atol=1e-4, rtol=0)
