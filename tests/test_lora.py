"""LoRA layer, target matching and scale (C1 precondition, C9), with HF peft as the oracle."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_llama

from peftcli import artifacts, models
from peftcli.errors import UserError
from peftcli.methods import lora
from peftcli.recipe import validate

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])


def lora_cfg(**keys) -> lora.Config:
    return validate({"method": {"name": "lora", **keys}, "data": {"train": {"path": "unused.jsonl"}}}).method


def randomize_B(model, seed: int = 1) -> None:
    """Non-zero B so the update is visible (training would get there; zeros is the init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------------------------------
# C9 rsLoRA scale


def test_C9_rslora_scale_at_creation_reload_and_merge(tiny_dir, tmp_path):
    recipe = validate({"model": {"name_or_path": str(tiny_dir)},
                       "method": {"name": "lora", "r": 16, "alpha": 16, "rslora": True, "dropout": 0.0,
                                  "target_modules": ["q_proj", "v_proj"]},
                       "data": {"train": {"path": "unused.jsonl"}}})
    model, _, base_path = models.load_base(str(tiny_dir))
    fp = models.fingerprint(model)
    lora.apply(model, recipe.method)
    randomize_B(model)

    # at creation: hand computation alpha/sqrt(r) = 16/4 = 4 (plain LoRA would give alpha/r = 1)
    layers = lora.lora_layers(model)
    assert {layer.scaling for layer in layers.values()} == {4.0}
    q = layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        update = q(x) - q.base_layer(x)
        expected = 4.0 * x @ (q.lora_B.weight @ q.lora_A.weight).T  # 4 · B A x
    torch.testing.assert_close(update, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        logits = model(IDS).logits

    # after save + reload
    out = artifacts.save_adapter(tmp_path / "adapter", model, recipe, base_path, fp)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["peftcli"]["method"]["rslora"] is True
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 16
    reloaded, _, _ = artifacts.load_adapted(out)
    assert {layer.scaling for layer in lora.lora_layers(reloaded).values()} == {4.0}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, logits, atol=1e-6, rtol=0)

    # an HF-only config (no peftcli block) keeps the scale too
    hf_only = {k: v for k, v in cfg.items() if k != "peftcli"}
    assert lora.config_from_adapter(hf_only).rslora is True

    # in the merged update: W' - W = 4 · B A
    W = q.base_layer.weight.detach().clone()
    BA = (q.lora_B.weight @ q.lora_A.weight).detach()
    lora.merge(model)
    merged = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged.weight - W, 4.0 * BA, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("r,alpha,rslora,scale", [(8, 16, False, 2.0), (16, 16, True, 4.0), (4, 6, True, 3.0)])
def test_C9_scale_matches_hf_peft(r, alpha, rslora, scale):
    ours = tiny_llama()
    lora.apply(ours, lora_cfg(r=r, alpha=alpha, rslora=rslora))
    # HF peft on the same spec
    hf = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj", "v_proj"]))
    hf_scale = hf.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert math.isclose(hf_scale, scale)
    assert {layer.scaling for layer in lora.lora_layers(ours).values()} == {scale}


# ---------------------------------------------------------------------------------------------
# target matching (HF peft's rules: suffix names, full-match regex, all-linear without the head)


def hf_targets(target_modules, layers=None) -> list[str]:
    """The module paths HF peft wraps for the same spec (the reference)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=target_modules, layers_to_transform=layers))
    prefix = "base_model.model."
    return sorted(n.removeprefix(prefix) for n, m in model.named_modules()
                  if hasattr(m, "lora_A") and hasattr(m, "base_layer") and n.startswith(prefix))


@pytest.mark.parametrize("target_modules,layers,expected_count", [
    (["q_proj", "v_proj"], None, 4),                                   # names, suffix match
    (["self_attn.q_proj"], None, 2),                                   # a dotted suffix
    (["q_proj", "down_proj"], [1], 2),                                 # names within one block
    (r"model\.layers\.0\.self_attn\.(q|k)_proj", None, 2),             # regex, full match
    (r".*\.mlp\..*_proj", None, 6),
    ("all-linear", None, 14),                                          # 7 Linear per block, no lm_head
])
def test_target_matching_equals_hf_peft(target_modules, layers, expected_count):
    model = tiny_llama()
    names = lora.apply(model, lora_cfg(target_modules=target_modules, layers=layers))
    assert len(names) == expected_count
    if layers is None or not isinstance(target_modules, str):
        assert sorted(names) == hf_targets(target_modules, layers)


def test_all_linear_excludes_head_and_layers_filter():
    model = tiny_llama()
    names = lora.apply(model, lora_cfg(target_modules="all-linear", layers=[1]))
    assert "lm_head" not in names
    assert all(n.startswith("model.layers.1.") for n in names) and len(names) == 7
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, lora.LoRALinear)


def test_regex_must_match_whole_path():
    # "q_proj" as a string is a regex: it does not full-match "model.layers.0.self_attn.q_proj"
    with pytest.raises(UserError, match="matched no module"):
        lora.apply(tiny_llama(), lora_cfg(target_modules="q_proj"))


def test_name_is_a_suffix_at_a_dot_not_a_substring():
    with pytest.raises(UserError, match="matched no module"):
        lora.apply(tiny_llama(), lora_cfg(target_modules=["proj"]))


def test_nothing_matched_lists_linear_names():
    with pytest.raises(UserError) as err:
        lora.apply(tiny_llama(), lora_cfg(target_modules=["query", "value"]))
    msg = str(err.value)
    assert "\n" not in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in msg


def test_non_linear_target_is_refused():
    with pytest.raises(UserError, match="embed_tokens is a Embedding"):
        lora.apply(tiny_llama(), lora_cfg(target_modules=["embed_tokens"]))


def test_layers_filter_that_matches_nothing():
    with pytest.raises(UserError, match="matched no module"):
        lora.apply(tiny_llama(), lora_cfg(target_modules=["q_proj"], layers=[5]))


# ---------------------------------------------------------------------------------------------
# initialisation and mode


def test_zero_init_B_gives_base_logits():
    base = tiny_llama()
    with torch.no_grad():
        expected = base(IDS).logits
    model = tiny_llama()  # same seed: same weights
    names = lora.apply(model, lora_cfg(target_modules="all-linear", dropout=0.0))
    layers = lora.lora_layers(model)
    assert sorted(layers) == sorted(names)
    assert all(torch.count_nonzero(m.lora_B.weight) == 0 for m in layers.values())
    assert all(torch.count_nonzero(m.lora_A.weight) > 0 for m in layers.values())
    # only the LoRA weights train
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)  # base + 0: bit-identical


def test_C1_apply_keeps_eval_mode():
    """LoRA dropout must be off on a model in eval mode (C1 runs with dropout 0.1, eval mode)."""
    model = tiny_llama()  # eval mode
    lora.apply(model, lora_cfg(dropout=0.1))
    randomize_B(model)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, model(IDS).logits)  # deterministic: dropout off
    model.train()
    layer = next(iter(lora.lora_layers(model).values()))
    assert layer.dropout.training and layer.dropout.p == 0.1
