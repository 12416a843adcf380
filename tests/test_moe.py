"""C15: mixture-of-experts with fused experts (Mixtral, Qwen3-MoE in transformers 5).

References: HF peft 0.21 (``target_parameters``) on the same weights and files, the model's own
forward, and hand counts of the LoRA shapes."""

from __future__ import annotations

import io
import json

import pytest
import safetensors.torch
import torch
from helpers import logits, method_recipe, perturb, saved_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from rich.console import Console
from tiny import tiny_run_recipe, tiny_tokenizer
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from peftcli import artifacts, merge, methods, models, trainer
from peftcli.errors import UserError
from peftcli.methods import adapter, lora, lora_params
from peftcli.recipe import validate

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
EXPERTS = ["mlp.experts.gate_up_proj", "experts.down_proj"]
E, H, LAYERS = 4, 64, 2
INTERMEDIATE = {"mixtral": 96, "qwen3_moe": 48}  # per expert


def moe_model(arch: str, tok, seed: int = 0):
    """A random tiny MoE decoder: hidden 64, 2 layers, 4 experts, top-2."""
    common = dict(vocab_size=len(tok), hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=INTERMEDIATE[arch], num_local_experts=E, **common)).eval()
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=INTERMEDIATE[arch], num_experts=E,
                                              head_dim=16, **common)).eval()


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe_dir(request, tmp_path_factory):
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp(request.param) / "model"
    moe_model(request.param, tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def adapted(base_dir, out_dir, **method_keys):
    """Our LoRA on the saved base, random non-zero B, saved to ``out_dir``; returns the model."""
    recipe = method_recipe("lora", base_dir, r=4, alpha=8, **method_keys)
    return saved_adapter(recipe, out_dir, lambda model: perturb(model, ["lora_B"]))


def router_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith("mlp.gate") or n.endswith("mlp.gate.base_layer")]


# ---------------------------------------------------------------------------------------------
# HF peft parity, both ways


@pytest.mark.parametrize("method_keys", [
    {"target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERTS},
    {"target_modules": "all-linear"},
    {"target_modules": [], "target_parameters": ["experts.down_proj"], "layers": [1]},
], ids=["names+parameters", "all-linear", "parameters+layers"])
def test_C15_hf_peft_loads_our_moe_adapter_with_equal_logits(moe_dir, tmp_path, method_keys):
    model = adapted(moe_dir, tmp_path / "adapter", dropout=0.1, **method_keys)
    ours = logits(model, IDS)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # explicit names, never a pattern HF peft would expand its own way; dropout 0 for HF, 0.1 for us
    assert isinstance(cfg["target_modules"], list) and all(t.startswith("model.layers.") for t in cfg["target_modules"])
    assert cfg["target_parameters"] == lora_params.adapted_parameters(model)
    assert all(p.endswith((".experts.gate_up_proj", ".experts.down_proj")) for p in cfg["target_parameters"])
    assert cfg["lora_dropout"] == 0.0 and cfg["peftcli"]["method"]["dropout"] == 0.1

    with pytest.warns(UserWarning, match="peftcli"):
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_dir), tmp_path / "adapter").eval()
    hf_keys = {k.replace(".default", "") for k in hf.state_dict() if "lora_" in k}
    assert hf_keys == set(lora.state_dict(model))  # same wrapped set (and nesting) as ours
    assert not any("lora_" in n for n in router_names(hf.base_model.model))  # HF's all-linear would add it
    torch.testing.assert_close(logits(hf, IDS), ours, atol=1e-4, rtol=0)

    reloaded = artifacts.load_adapted(tmp_path / "adapter").model
    torch.testing.assert_close(logits(reloaded, IDS), ours, atol=1e-6, rtol=0)


def test_C15_all_linear_is_hf_peft_all_linear_without_the_router(moe_dir):
    """HF peft 0.21's all-linear on a transformers-5 MoE model: every attention Linear, the fused
    experts and the router (``gate.weight``); ours is the same set but the router."""
    ours = AutoModelForCausalLM.from_pretrained(moe_dir)
    wrapped = lora.apply(ours, lora.Config(target_modules="all-linear"))
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(moe_dir), LoraConfig(target_modules="all-linear"))
    hf_wrapped = {k.removeprefix("base_model.model.").replace(".default", "").removesuffix(".lora_A.weight")
                  for k in hf.state_dict() if k.endswith("lora_A.default.weight")}
    ours_wrapped = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    for k in lora.state_dict(ours) if k.endswith("lora_A.weight")}
    hf_router = {f"model.layers.{i}.mlp.gate" for i in range(LAYERS)}
    assert hf_router <= hf_wrapped
    assert ours_wrapped == hf_wrapped - hf_router
    assert not any(w.endswith(".gate") for w in wrapped)


def test_C15_we_load_hf_peft_moe_adapter(moe_dir, tmp_path):
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(moe_dir),
                        LoraConfig(r=2, lora_alpha=8, target_modules=None, target_parameters=EXPERTS,
                                   init_lora_weights="gaussian"))
    perturb(hf, ["lora_B"])
    hf.eval()
    expected = logits(hf, IDS)
    hf.save_pretrained(tmp_path / "hf")
    loaded = artifacts.load_adapted(tmp_path / "hf")
    model = loaded.model
    assert loaded.method == "lora" and not lora.lora_layers(model) and len(lora_params.param_layers(model)) == 2 * LAYERS
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-4, rtol=0)


def test_C15_we_load_hf_peft_all_linear_adapter_with_its_rank_pattern(moe_dir, tmp_path):
    """HF peft's all-linear on a transformers-5 MoE model gives the fused gate_up_proj 2r and
    2·alpha (its v4 -> v5 conversion: gate and up were two rank-r Linears), written as
    rank_pattern / alpha_pattern; ours reads them and sizes each layer the same."""
    arch = "mixtral" if "mixtral" in str(moe_dir) else "qwen3_moe"
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(moe_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb(hf, ["lora_B"])
    hf.eval()
    expected = logits(hf, IDS)
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert (cfg["rank_pattern"], cfg["alpha_pattern"]) == ({r".*\.gate_up_proj": 8}, {r".*\.gate_up_proj": 16})

    model = artifacts.load_adapted(tmp_path / "hf").model
    sizes = {n: (m.r, m.scaling, tuple(m.lora_A.weight.shape), tuple(m.lora_B.weight.shape))
             for n, m in lora_params.param_layers(model).items() if n.startswith("model.layers.0.mlp.experts")}
    inter = INTERMEDIATE[arch]  # hand computation: gate_up (E, 2I, H) at r 8, down (E, H, I) at r 4, both scale 2
    assert sizes == {"model.layers.0.mlp.experts.base_layer": (8, 2.0, (8 * E, H), (2 * inter, 8 * E)),
                     "model.layers.0.mlp.experts": (4, 2.0, (4 * E, inter), (H, 4 * E))}
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# training: expert gradients, the count by kind, the router left alone


def expected_counts(arch: str, r: int = 4) -> dict:
    """Hand count: q (64 -> 64) and v (64 -> 32) get r·(in + out); each fused weight r·E·(in + out)."""
    inter = INTERMEDIATE[arch]
    attention = LAYERS * r * ((H + 64) + (H + 32))
    experts = LAYERS * r * E * ((H + 2 * inter) + (inter + H))  # gate_up (2I x H), down (H x I)
    return {"attention": attention, "experts": experts}


def test_C15_one_training_step_moves_expert_lora_and_counts_it(moe_dir, tmp_path):
    arch = "mixtral" if "mixtral" in str(moe_dir) else "qwen3_moe"
    base = AutoModelForCausalLM.from_pretrained(moe_dir)
    router_before = {n: p.detach().clone() for n, p in base.named_parameters() if ".mlp.gate." in n}
    recipe = tiny_run_recipe(tmp_path, moe_dir, {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1,
                                                 "target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERTS},
                             max_steps=2)
    out = io.StringIO()
    result = trainer.train(recipe, console=Console(file=out, width=400))
    model = result.model

    counts = methods.trainable_by_kind(model)
    assert counts == expected_counts(arch)
    banner = out.getvalue()
    assert f"experts {counts['experts']:,}" in banner and f"attention {counts['attention']:,}" in banner

    # after two steps B != 0, so a backward pass reaches every expert's A and B
    model.train()
    model.zero_grad()
    model(IDS, labels=IDS).loss.backward()
    for name, layer in lora_params.param_layers(model).items():
        for w in (layer.lora_A.weight, layer.lora_B.weight):
            per_expert = w.grad.reshape(E, -1, w.shape[-1]) if w is layer.lora_A.weight else \
                w.grad.reshape(w.shape[0], -1, E).permute(2, 0, 1)
            assert (per_expert.flatten(1).abs().sum(1) > 0).all(), name  # every expert got a gradient
        assert layer.lora_B.weight.abs().sum() > 0  # and was trained

    # the router: not wrapped, frozen, bit-identical after training
    router = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if ".mlp.gate." in n}
    assert sorted(router) == sorted(router_before)
    for n, p in router.items():
        assert not p.requires_grad and p.grad is None
        torch.testing.assert_close(p, router_before[n], atol=0, rtol=0)


def test_C15_router_is_adapted_when_named(moe_dir):
    model = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    expected = logits(model, IDS)
    lora.apply(model, lora.Config(r=2, target_modules=[], target_parameters=["mlp.gate.weight"]))
    torch.testing.assert_close(logits(model, IDS), expected, atol=0, rtol=0)  # B = 0: starts as the base
    assert methods.trainable_by_kind(model) == {"router": LAYERS * 2 * (H + E)}
    layer = lora_params.param_layers(model)["model.layers.0.mlp.gate"]
    assert (layer.lora_A.weight.shape, layer.lora_B.weight.shape) == ((2, H), (E, 2))


# ---------------------------------------------------------------------------------------------
# merge


def test_C15_merged_moe_model_equals_the_adapted_one(moe_dir, tmp_path):
    model = adapted(moe_dir, tmp_path / "adapter", target_modules=["q_proj", "o_proj"], target_parameters=EXPERTS)
    expected = logits(model, IDS)
    out = merge.merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged, IDS), expected, atol=1e-5, rtol=0)
    # the fused weights themselves hold W + scale·B_e A_e (hand computation from the saved factors)
    base = AutoModelForCausalLM.from_pretrained(moe_dir)
    sd = safetensors.torch.load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    A = sd["base_model.model.model.layers.1.mlp.experts.lora_A.weight"].reshape(E, 4, -1)  # down_proj: (E, r, I)
    B = sd["base_model.model.model.layers.1.mlp.experts.lora_B.weight"].reshape(H, 4, E)  # (H, r, E)
    want = base.model.layers[1].mlp.experts.down_proj + 2.0 * torch.einsum("ore,eri->eoi", B, A)
    torch.testing.assert_close(merged.model.layers[1].mlp.experts.down_proj, want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# bottleneck adapters on MoE blocks


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_C15_bottleneck_adapters_attach_after_the_moe_block_and_train(moe_dir, variant):
    model = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        block_out = model.model.layers[0].mlp(x)  # the MoE block's own forward
    expected = logits(model, IDS)
    targets = adapter.apply(model, adapter.Config(variant=variant, reduction_factor=8))
    per_block = (["self_attn.o_proj"] if variant == "houlsby" else []) + ["mlp"]
    assert targets == [f"model.layers.{i}.{t}" for i in range(LAYERS) for t in per_block]
    torch.testing.assert_close(logits(model, IDS), expected, atol=0, rtol=0)  # identity at init

    perturb(model, ["adapter_up"])
    wrapped = model.model.layers[0].mlp
    with torch.no_grad():
        hand = block_out + wrapped.adapter_up(torch.relu(wrapped.adapter_down(block_out)))  # Houlsby §2.1
        torch.testing.assert_close(wrapped(x), hand, atol=1e-6, rtol=0)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "mlp.adapter_" in n]
    assert len(grads) == 4 * LAYERS and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert methods.trainable_by_kind(model)["mlp"] == LAYERS * (2 * H * (H // 8) + H + H // 8)


# ---------------------------------------------------------------------------------------------
# what cannot apply says so in one line


@pytest.mark.parametrize("method, match", [
    ({"name": "lora", "dora": True, "target_parameters": EXPERTS}, "target_parameters cannot be combined with dora"),
    ({"name": "lora", "init": "pissa", "target_parameters": EXPERTS}, "init pissa"),
])
def test_C15_unsupported_combinations_are_one_line_errors(method, match):
    with pytest.raises(UserError, match=match) as e:
        validate({"method": method, "data": {"train": {"path": "x.jsonl"}}})
    assert "\n" not in str(e.value)


def test_C15_bad_targets_name_the_fix(moe_dir):
    model = AutoModelForCausalLM.from_pretrained(moe_dir)
    with pytest.raises(UserError, match="did you mean 'down_proj'"):
        lora.apply(model, lora.Config(target_parameters=["experts.dwn_proj"]))
    with pytest.raises(UserError, match=r"method.target_parameters, e.g. gate.weight"):
        lora.apply(model, lora.Config(target_modules=["gate"]))
    with pytest.raises(UserError, match="name Linear layers in method.target_modules"):
        lora.apply(model, lora.Config(target_modules=[], target_parameters=["q_proj.weight"]))


def test_C15_qlora_adapts_the_experts_that_stay_full_precision(moe_dir):
    # bitsandbytes quantises Linear layers only: the fused 3-D expert weights stay float, so
    # qlora on them is LoRA on a float weight; a 4-bit weight named as a parameter is refused
    model = models.load_model(str(moe_dir), "nf4")
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    names = lora.apply(model, methods.get("qlora").Config(target_modules=["q_proj"], target_parameters=EXPERTS))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert methods.trainable_by_kind(model)["experts"] > 0
    with pytest.raises(UserError, match="q_proj.weight belongs to a Linear4bit; name Linear layers in method.target_modules") as e:
        lora.apply(models.load_model(str(moe_dir), "nf4"), lora.Config(target_modules=[], target_parameters=["q_proj.weight"]))
    assert "\n" not in str(e.value)
