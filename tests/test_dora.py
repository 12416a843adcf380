"""DoRA (Liu et al. 2024): magnitude init, forward and gradients, files both ways and merging,
with HF peft as the oracle on the same weights (fp32)."""

from __future__ import annotations

import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers import logits, method_recipe, saved_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import tiny_llama, tiny_run_recipe
from transformers import AutoModelForCausalLM

from peftcli import artifacts, merge
from peftcli.methods import lora

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
QVO = ["q_proj", "v_proj", "o_proj"]
# HF peft (the reference) warns that it ignores our "peftcli" block in adapter_config.json
pytestmark = pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['peftcli'\]")


def dora_recipe(base_dir, quantization="none", method="lora", **keys):
    return method_recipe(method, base_dir, quantization, r=4, alpha=8, dora=True, **keys)


def perturb(named_parameters, seed: int = 1) -> None:
    """As if trained: non-zero B, a magnitude moved off its init (names work for ours and HF's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_parameters:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def trained(base_dir, out_dir, quantization="none", method="lora", **keys):
    """Our DoRA on the base, perturbed, saved to ``out_dir``; returns the model in eval mode."""
    recipe = dora_recipe(base_dir, quantization, method, **keys)
    return saved_adapter(recipe, out_dir, lambda model: perturb(model.named_parameters()))


def hf_dora(dropout: float = 0.0, target_modules=QVO):
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                                                   target_modules=target_modules))


def our_dora(dropout: float = 0.0, target_modules=QVO):
    model = tiny_llama()  # same seed as hf_dora's base: same weights
    lora.apply(model, dora_recipe("unused", dropout=dropout, target_modules=target_modules).method)
    return model


def param_key(name: str) -> str:
    """One name for ours and HF peft's: ``model.layers.0.self_attn.q_proj.lora_A`` /
    ``...lora_magnitude_vector`` (HF: ``base_model.model.`` prefix, ``.default`` adapter name)."""
    return name.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")


def copy_lora_weights(ours, hf) -> None:
    """Put HF's A, B and magnitude into our model (same layers), so both compute on one set."""
    hf_sd = {k.replace(".default", ""): v for k, v in hf.state_dict().items()}
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            prefix = f"base_model.model.{name}."
            layer.lora_A.weight.copy_(hf_sd[prefix + "lora_A.weight"])
            layer.lora_B.weight.copy_(hf_sd[prefix + "lora_B.weight"])
            layer.lora_magnitude_vector.copy_(hf_sd[prefix + "lora_magnitude_vector.weight"])


# ---------------------------------------------------------------------------------------------
# the layer


def test_magnitude_starts_at_the_row_norm_of_W_and_output_is_unchanged():
    base = tiny_llama()
    expected = logits(base, IDS)
    model = our_dora()
    layers = lora.lora_layers(model)
    assert all(isinstance(layer, lora.DoRALinear) for layer in layers.values())
    q = layers["model.layers.0.self_attn.q_proj"]
    # hand computation: m = ||W||_2 over each output row (dim 1 of the (out, in) weight), B = 0
    W = base.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q.lora_magnitude_vector.detach(), torch.linalg.norm(W, dim=1), atol=0, rtol=1e-6)
    assert q.lora_magnitude_vector.shape == (64,) and q.lora_magnitude_vector.requires_grad
    # HF peft on the same weights
    hq = hf_dora().base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.lora_magnitude_vector.detach(), hq.lora_magnitude_vector["default"].weight.detach(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-5, rtol=0)  # m / ||W|| = 1 at init
    trainable = {param_key(n).rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}


def test_forward_matches_the_formula():
    model = our_dora()
    perturb(model.named_parameters())
    v = lora.lora_layers(model)["model.layers.0.self_attn.v_proj"]
    x = torch.randn(3, 64)
    W, A, B, m = (t.detach() for t in (v.base_layer.weight, v.lora_A.weight, v.lora_B.weight, v.lora_magnitude_vector))
    V = W + 2.0 * B @ A  # W + (alpha/r)·B A, alpha/r = 8/4
    expected = x @ (m.unsqueeze(1) * V / torch.linalg.norm(V, dim=1, keepdim=True)).T  # eq. 5
    with torch.no_grad():
        torch.testing.assert_close(v(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_train_mode_forward_and_gradients_match_hf_peft(dropout):
    """With dropout HF peft feeds the dropped input to the whole DoRA term (the rescaled base part
    too); the norm is detached (§4.3). Same seed -> same dropout masks in both."""
    hf = hf_dora(dropout).train()
    perturb(hf.named_parameters())
    ours = our_dora(dropout).train()
    copy_lora_weights(ours, hf)

    results = {}
    for name, model in (("ours", ours), ("hf", hf)):
        torch.manual_seed(123)
        out = model(IDS).logits
        out.pow(2).mean().backward()
        grads = {param_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[name] = out.detach(), grads
    (ours_out, ours_grads), (hf_out, hf_grads) = results["ours"], results["hf"]
    torch.testing.assert_close(ours_out, hf_out, atol=1e-5, rtol=0)
    assert sorted(ours_grads) == sorted(hf_grads)
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grad, hf_grads[key], atol=1e-6, rtol=1e-4, msg=key)
    magnitude_grads = [g for k, g in ours_grads.items() if k.endswith("lora_magnitude_vector")]
    assert magnitude_grads and all(g.abs().max() > 0 for g in magnitude_grads)


# ---------------------------------------------------------------------------------------------
# files both ways


def test_our_dora_adapter_loads_in_hf_peft(tiny_dir, tmp_path):
    model = trained(tiny_dir, tmp_path / "adapter", target_modules=QVO, dropout=0.1)
    ours = logits(model, IDS)
    assert (ours - logits(AutoModelForCausalLM.from_pretrained(tiny_dir), IDS)).abs().max() > 1e-3

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peftcli"]["method"]["dora"] is True
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector"  # HF peft's key
    assert weights[key].shape == (64,) and len(weights) == 3 * 2 * 3

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(hf, IDS), ours, atol=1e-5, rtol=0)  # HF peft on the same files

    loaded = artifacts.load_adapted(tmp_path / "adapter")
    reloaded = loaded.model
    assert loaded.method == "lora"
    assert all(isinstance(layer, lora.DoRALinear) for layer in lora.lora_layers(reloaded).values())
    torch.testing.assert_close(logits(reloaded, IDS), ours, atol=1e-6, rtol=0)


def test_hf_dora_adapter_loads_with_load_adapted(tiny_dir, tmp_path):
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True, target_modules="all-linear"))
    perturb(hf.named_parameters())
    hf.eval()
    expected = logits(hf, IDS)
    hf.save_pretrained(tmp_path / "hf_adapter")

    cfg = artifacts.read_adapter_config(tmp_path / "hf_adapter")
    assert lora.config_from_adapter(cfg).dora is True
    loaded = artifacts.load_adapted(tmp_path / "hf_adapter")
    model = loaded.model
    assert loaded.method == "lora" and len(lora.lora_layers(model)) == 14
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# merging


def test_dora_merge_parity_in_memory_and_end_to_end(tiny_dir, tmp_path):
    model = trained(tiny_dir, tmp_path / "adapter", target_modules=QVO, dropout=0.1)
    adapted = logits(model, IDS)
    q = lora.lora_layers(model)["model.layers.1.self_attn.q_proj"]
    W, A, B, m = (t.detach().clone() for t in (q.base_layer.weight, q.lora_A.weight, q.lora_B.weight, q.lora_magnitude_vector))

    lora.merge(model)
    assert not lora.lora_layers(model)
    torch.testing.assert_close(logits(model, IDS), adapted, atol=1e-5, rtol=0)
    # hand computation: W' = m ⊙ (W + 2·B A) / ||W + 2·B A||_row
    V = W + 2.0 * B @ A
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight, m.unsqueeze(1) * V / V.norm(dim=1, keepdim=True),
                               atol=1e-6, rtol=1e-5)

    out = merge.merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged, IDS), adapted, atol=1e-5, rtol=0)
    # HF peft's merge_and_unload of the same adapter on the same base
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter").merge_and_unload()
    ours = merged.state_dict()
    for key, want in hf.state_dict().items():
        torch.testing.assert_close(ours[key], want, atol=1e-6, rtol=1e-6, msg=key)


def test_dora_on_nf4_base_trains_and_merges(tiny_dir, tmp_path):
    model = trained(tiny_dir, tmp_path / "adapter", quantization="nf4", method="qlora", target_modules=["q_proj", "v_proj"])
    layers = lora.lora_layers(model)
    q = layers["model.layers.0.self_attn.q_proj"]
    dequant = bnbf.dequantize_4bit(q.base_layer.weight.data, q.base_layer.weight.quant_state).float()
    # the magnitude started at the row norm of the dequantised weight (B was 0 then)
    fresh = lora.DoRALinear(lora.LoRALinear(q.base_layer, 4, 8))
    torch.testing.assert_close(fresh.lora_magnitude_vector.detach(), dequant.norm(dim=1), atol=0, rtol=1e-6)

    model.train()
    loss = model(IDS).logits.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(layer.lora_magnitude_vector.grad.abs().max() > 0 for layer in layers.values())
    model.eval()
    adapted = logits(model, IDS)
    expected = q.lora_magnitude_vector.detach().unsqueeze(1) * (V := dequant + 2.0 * (q.lora_B.weight @ q.lora_A.weight).detach()) \
        / V.norm(dim=1, keepdim=True)

    out = merge.merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    saved = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(saved["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    torch.testing.assert_close(logits(merged, IDS), adapted, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# through the trainer: DoRA with a PiSSA start trains, resumes to the same adapter, reloads


def test_dora_pissa_train_resume_and_reload(tmp_path, tiny_dir):
    from peftcli.trainer import train

    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "dora": True, "init": "pissa", "target_modules": QVO}
    recipe = tiny_run_recipe(tmp_path, tiny_dir, method, max_seq_len=200, max_steps=4, warmup_steps=0, save_every=2)
    result = train(recipe)
    full = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    layer = lora.lora_layers(result.model)["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(layer.lora_A.weight.detach(), layer.init_A)  # A moved from its PiSSA start
    assert (layer.lora_magnitude_vector.detach() - torch.linalg.norm(tiny_llama().model.layers[0].self_attn.q_proj.weight, dim=1)
            ).abs().max() > 1e-4  # and so did the magnitude

    resumed = train(recipe, resume=True)  # from checkpoints/step-2: apply (SVD), then load the rank-2r file
    again = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)

    reloaded = artifacts.load_adapted(tmp_path / "run").model
    torch.testing.assert_close(logits(reloaded, IDS), logits(resumed.model.eval(), IDS), atol=1e-5, rtol=0)
