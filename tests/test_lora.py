"""LoRA layer, target matching, scale (C1 precondition, C9) and the gaussian / PiSSA inits, with HF
peft as the oracle."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
from helpers import method_recipe, perturb, saved_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny import tiny_llama
from transformers import AutoModelForCausalLM

from peftcli import artifacts, merge, models
from peftcli.errors import UserError
from peftcli.methods import lora, lora_kernel
from peftcli.recipe import validate

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])


def lora_cfg(**keys) -> lora.Config:
    return method_recipe("lora", **keys).method


# ---------------------------------------------------------------------------------------------
# C9 rsLoRA scale


def test_C9_rslora_scale_at_creation_reload_and_merge(tiny_dir, tmp_path):
    recipe = validate({"model": {"name_or_path": str(tiny_dir), "dtype": "float32"},
                       "method": {"name": "lora", "r": 16, "alpha": 16, "rslora": True, "dropout": 0.0,
                                  "target_modules": ["q_proj", "v_proj"]},
                       "data": {"train": {"path": "unused.jsonl"}}})
    model, _, base_path = models.load_base(str(tiny_dir))
    fp = models.fingerprint(model)
    lora.apply(model, recipe.method)
    perturb(model, ["lora_B"])  # non-zero B so the update is visible (zeros is the init)

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
    reloaded = artifacts.load_adapted(out).model
    assert {layer.scaling for layer in lora.lora_layers(reloaded).values()} == {4.0}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, logits, atol=1e-6, rtol=0)

    # an HF-only config (no peftcli block) keeps the scale too
    hf_only = {k: v for k, v in cfg.items() if k != "peftcli"}
    assert lora.config_from_adapter(hf_only).rslora is True

    # in the merged update: W' - W = 4 · B A — written to disk by `peft merge`'s function, and in memory
    W = q.base_layer.weight.detach().clone()
    BA = (q.lora_B.weight @ q.lora_A.weight).detach()
    merged_dir = merge.merge_adapter(out, tmp_path / "merged", dtype="float32")
    written = safetensors.torch.load_file(str(merged_dir / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(written - W, 4.0 * BA, atol=1e-6, rtol=1e-5)
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
    # the tiny Llama has blocks 0 and 1: the message names the layers key, not the targets
    with pytest.raises(UserError, match=r"^method.layers: \[5\] not in this model \(blocks 0-1\)$"):
        lora.apply(tiny_llama(), lora_cfg(target_modules=["q_proj"], layers=[1, 5]))


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
    perturb(model, ["lora_B"])
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, model(IDS).logits)  # deterministic: dropout off
    model.train()
    layer = next(iter(lora.lora_layers(model).values()))
    assert layer.dropout.training and layer.dropout.p == 0.1


# ---------------------------------------------------------------------------------------------
# init: gaussian (HF peft's init_lora_weights="gaussian") and PiSSA (Meng et al. 2024, §3)

QV = ["q_proj", "v_proj"]


def test_gaussian_init_is_hf_peft_gaussian():
    base_logits = tiny_llama()(IDS).logits.detach()
    model = tiny_llama()
    lora.apply(model, lora_cfg(r=8, init="gaussian", target_modules="all-linear", dropout=0.0))
    layers = lora.lora_layers(model).values()
    A = torch.cat([layer.lora_A.weight.detach().flatten() for layer in layers])  # 8192 draws
    assert all(torch.count_nonzero(layer.lora_B.weight) == 0 for layer in layers)
    # HF peft: nn.init.normal_(A, std=1/r), so std 1/8 = 0.125 (Kaiming-uniform here would give 0.072)
    hf = get_peft_model(tiny_llama(), LoraConfig(r=8, init_lora_weights="gaussian", target_modules="all-linear"))
    hf_A = torch.cat([p.detach().flatten() for n, p in hf.named_parameters() if "lora_A" in n])
    for draws in (A, hf_A):
        assert abs(draws.std().item() - 0.125) < 0.005 and abs(draws.mean().item()) < 0.005
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base_logits)  # B = 0: the base model, bit for bit
    cfg = lora.adapter_config(lora_cfg(init="gaussian"))
    assert cfg["init_lora_weights"] == "gaussian"
    assert lora.config_from_adapter(cfg).init == "gaussian"


def test_pissa_init_principal_part_residual_and_unchanged_output():
    base = tiny_llama()
    with torch.no_grad():
        expected = base(IDS).logits
    model = tiny_llama()  # same weights
    lora.apply(model, lora_cfg(r=4, alpha=8, init="pissa", target_modules=QV, dropout=0.0))
    hf = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=QV))
    for name, layer in lora.lora_layers(model).items():
        W = base.get_submodule(name).weight.detach()  # the original (out, in)
        A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        # hand computation: scale·B·A is the top-4 part of the SVD of W (scale = 8/4 = 2)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(2.0 * B @ A, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight + 2.0 * B @ A, W, atol=1e-5, rtol=0)  # residual + s·B·A = W
        assert torch.equal(layer.init_A, A) and torch.equal(layer.init_B, B)
        assert not layer.base_layer.weight.requires_grad
        # HF peft's pissa_init on the same weights
        h = hf.base_model.model.get_submodule(name)
        torch.testing.assert_close(A, h.lora_A["default"].weight.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(B, h.lora_B["default"].weight.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, h.base_layer.weight, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)


def pissa_trained(base_dir, out_dir, **keys):
    """Our PiSSA on the base, A and B moved as a few training steps would, saved; returns the model."""
    def as_trained(model):  # each trainable tensor moved by 2% of its mean magnitude
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn(p.shape, generator=g) * p.abs().mean())

    recipe = method_recipe("lora", base_dir, r=4, alpha=8, init="pissa", target_modules=QV, **keys)
    return saved_adapter(recipe, out_dir, as_trained)


@pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['peftcli'\]")
@pytest.mark.parametrize("keys,alpha", [({}, 16.0), ({"rslora": True}, 8 * math.sqrt(2)), ({"dora": True}, 16.0)],
                         ids=["pissa", "pissa+rslora", "pissa+dora"])
def test_pissa_adapter_loads_in_hf_peft_on_the_original_base(tiny_dir, tmp_path, keys, alpha):
    model = pissa_trained(tiny_dir, tmp_path / "adapter", **keys)
    with torch.no_grad():
        ours = model(IDS).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        assert (ours - base(IDS).logits).abs().max() > 1e-3  # the perturbation shows

    # saved as a plain rank-2r LoRA relative to the original W, scale unchanged (r 8, alpha 16 or 8·√2)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["init_lora_weights"]) == (8, True) and math.isclose(cfg["lora_alpha"], alpha)
    assert cfg["peftcli"]["method"]["init"] == "pissa" and cfg["peftcli"]["method"]["r"] == 4
    weights = safetensors.torch.load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)

    hf = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # HF peft, the unmodified base
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, ours, atol=1e-5, rtol=0)

    reloaded = artifacts.load_adapted(tmp_path / "adapter").model
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, ours, atol=1e-5, rtol=0)
    # saving the reloaded model writes the same tensors (a resumed run's checkpoints stay consistent)
    again = lora.state_dict(reloaded)
    assert sorted(again) == sorted(weights) and all(torch.equal(again[k], weights[k]) for k in weights)


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
def test_pissa_file_is_hf_peft_conversion(tmp_path):
    """Our saved tensors equal HF peft's save_pretrained(path_initial_model_for_weight_conversion=...)
    of the same PiSSA weights."""
    ours = tiny_llama()
    cfg = lora_cfg(r=4, alpha=8, init="pissa", target_modules=QV)
    lora.apply(ours, cfg)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.01)  # "trained"
    hf = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=QV))
    hf.peft_config["default"].init_lora_weights = True  # HF peft's recipe: save the initial adapter first
    hf.save_pretrained(tmp_path / "init")
    hf.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            h = hf.base_model.model.get_submodule(name)
            h.lora_A["default"].weight.copy_(layer.lora_A.weight)
            h.lora_B["default"].weight.copy_(layer.lora_B.weight)
    hf.save_pretrained(tmp_path / "hf", path_initial_model_for_weight_conversion=str(tmp_path / "init"))

    theirs = safetensors.torch.load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    mine = lora.state_dict(ours)
    assert sorted(mine) == sorted(theirs)
    for key, want in theirs.items():
        torch.testing.assert_close(mine[key], want, atol=1e-6, rtol=0, msg=key)
    hf_cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    our_cfg = lora.adapter_config(cfg)
    assert {k: our_cfg[k] for k in ("r", "lora_alpha", "init_lora_weights")} == \
        {k: hf_cfg[k] for k in ("r", "lora_alpha", "init_lora_weights")}


def test_hf_unconverted_pissa_adapter_loads_with_load_adapted(tiny_dir, tmp_path):
    """HF peft's plain save of a PiSSA model (rank r, init_lora_weights "pissa") is relative to the
    residual base; HF peft recomputes it on load, and so do we."""
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                        LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=QV))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_" in name:
                p.add_(0.01)
    hf.eval()
    with torch.no_grad():
        expected = hf(IDS).logits
    hf.save_pretrained(tmp_path / "hf_adapter")
    assert json.loads((tmp_path / "hf_adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    model = artifacts.load_adapted(tmp_path / "hf_adapter").model
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)


def test_pissa_refused_on_a_quantised_base_and_unknown_hf_inits(tiny_dir):
    model, _, _ = models.load_base(str(tiny_dir), "nf4")
    with pytest.raises(UserError, match="pissa needs a full-precision base"):
        lora.apply(model, lora_cfg(init="pissa"))
    with pytest.raises(UserError, match="method.init: pissa needs a full-precision base"):
        validate({"method": {"name": "qlora", "init": "pissa"}, "data": {"train": {"path": "unused.jsonl"}}})
    with pytest.raises(UserError, match="method.init: pissa needs r <= min"):
        lora.apply(tiny_llama(), lora_cfg(r=40, init="pissa"))  # v_proj is 32 × 64
    for init in ("pissa_niter_4", "olora"):
        with pytest.raises(UserError, match=f"init_lora_weights '{init}' is not supported"):
            lora.config_from_adapter({"r": 4, "init_lora_weights": init})


def test_a_misspelt_target_name_is_an_error_not_ignored():
    from tiny import tiny_llama

    near_miss = r"method.target_modules: 'v_porj' matched no module \(did you mean 'v_proj'\? Linear names here: .*v_proj"
    with pytest.raises(UserError, match=near_miss):
        lora.apply(tiny_llama(), lora.Config(target_modules=["q_proj", "v_porj"]))


# ---------------------------------------------------------------------------------------------
# rank_pattern / alpha_pattern (HF peft's LoraConfig fields of the same names)

RANK_PATTERN = {r"model\.layers\.1\.self_attn\.q_proj": 2, "q_proj": 8, r"mlp\..*": 6}  # first match wins
ALPHA_PATTERN = {"v_proj": 2.0}
# hand computation, r 4 and alpha 8 elsewhere: path -> (r, in, out, scale = alpha / r)
PATTERN_LAYERS = {
    "model.layers.0.self_attn.q_proj": (8, 64, 64, 8 / 8),
    "model.layers.1.self_attn.q_proj": (2, 64, 64, 8 / 2),  # the first key, not q_proj's 8
    "model.layers.0.self_attn.v_proj": (4, 64, 32, 2 / 4),
    "model.layers.1.self_attn.v_proj": (4, 64, 32, 2 / 4),
    "model.layers.0.mlp.down_proj": (6, 128, 64, 8 / 6),
    "model.layers.1.mlp.down_proj": (6, 128, 64, 8 / 6),
}


@pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['peftcli'\]")
def test_rank_and_alpha_patterns_size_each_layer_and_load_in_hf_peft(tiny_dir, tmp_path):
    recipe = validate({"model": {"name_or_path": str(tiny_dir), "dtype": "float32"},
                       "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                  "target_modules": ["q_proj", "v_proj", "down_proj"],
                                  "rank_pattern": RANK_PATTERN, "alpha_pattern": ALPHA_PATTERN},
                       "data": {"train": {"path": "unused.jsonl"}}})
    model, _, base_path = models.load_base(str(tiny_dir))
    fp = models.fingerprint(model)
    lora.apply(model, recipe.method)
    layers = lora.lora_layers(model)
    got = {n: (m.r, m.in_features, m.out_features, m.scaling) for n, m in layers.items()}
    assert got == PATTERN_LAYERS
    assert {n: (tuple(m.lora_A.weight.shape), tuple(m.lora_B.weight.shape)) for n, m in layers.items()} == {
        n: ((r, i), (o, r)) for n, (r, i, o, _) in PATTERN_LAYERS.items()}
    # HF peft's own get_peft_model sizes the same layers the same way
    hf_own = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN))
    hf_sizes = {n.removeprefix("base_model.model."): (m.r["default"], m.in_features, m.out_features, m.scaling["default"])
                for n, m in hf_own.named_modules() if isinstance(m, LoraLayer)}
    assert hf_sizes == PATTERN_LAYERS

    perturb(model, ["lora_B"])
    with torch.no_grad():
        ours = model(IDS).logits
    out = artifacts.save_adapter(tmp_path / "adapter", model, recipe, base_path, fp)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["rank_pattern"], cfg["alpha_pattern"]) == (RANK_PATTERN, ALPHA_PATTERN)
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, ours, atol=1e-4, rtol=0)
    # ours, from the HF fields alone and from the file
    hf_only = lora.config_from_adapter({k: v for k, v in cfg.items() if k != "peftcli"})
    assert (hf_only.rank_pattern, hf_only.alpha_pattern) == (RANK_PATTERN, ALPHA_PATTERN)
    reloaded = artifacts.load_adapted(out).model
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, ours, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['peftcli'\]")
def test_pissa_with_patterns_saves_doubled_pattern_values_that_hf_peft_loads(tiny_dir, tmp_path):
    model = pissa_trained(tiny_dir, tmp_path / "adapter", rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4.0})
    assert {n: m.r for n, m in lora.lora_layers(model).items() if "v_proj" in n} == {
        "model.layers.0.self_attn.v_proj": 2, "model.layers.1.self_attn.v_proj": 2}
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # the rank-2r file: r and alpha doubled, pattern values too (scale 4/2 = 8/4 kept)
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (8, 16.0, {"v_proj": 4}, {"v_proj": 8.0})
    with torch.no_grad():
        ours = model(IDS).logits
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter").eval()
        torch.testing.assert_close(hf(IDS).logits, ours, atol=1e-5, rtol=0)


def test_patterns_that_match_nothing_or_are_not_regexes_are_one_line_errors():
    # HF peft's rule: a key matches from a dot, so "proj" selects no ...q_proj (HF peft would only warn)
    with pytest.raises(UserError, match=r"method.rank_pattern: 'proj' matches none of the adapted .*q_proj, v_proj"):
        lora.apply(tiny_llama(), lora_cfg(target_modules=QV, rank_pattern={"proj": 8}))
    with pytest.raises(UserError, match="method.alpha_pattern: 'o_proj' matches none"):
        lora.apply(tiny_llama(), lora_cfg(target_modules=QV, alpha_pattern={"o_proj": 8}))
    for bad, match in [({"rank_pattern": {"(q": 8}}, "not a regex"), ({"rank_pattern": {"q_proj": 0}}, "must be > 0"),
                       ({"alpha_pattern": {"q_proj": float("nan")}}, "must be > 0")]:
        with pytest.raises(UserError, match=match) as e:
            lora_cfg(**bad)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# the training branch (LoRABranch): hand-written backward, dropout positions drawn again from their seed


def plain_branch(x, A, B, scaling, keep, scale):
    """The LoRA update by autograd on the formula, with a given keep mask (None: no dropout)."""
    xd = x if keep is None else torch.where(keep, x * scale, 0)
    return scaling * (xd @ A.T) @ B.T


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_training_branch_matches_autograd_on_the_formula(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    x[0, 0, :3] = 0.0  # zeros in x that are kept must still pass gradient
    A = torch.randn(4, 12, generator=g, dtype=torch.float64)
    B = torch.randn(7, 4, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    seed = 1234
    keep = lora_kernel.keep_mask(x.shape, p, seed, x.device) if p else None
    scale = 1 / (1 - p)
    ours = [t.clone().requires_grad_() for t in (x, A, B)]
    ref = [t.clone().requires_grad_() for t in (x, A, B)]
    y = lora_kernel.LoRABranch.apply(*ours, 2.0, p, seed, torch.float64)
    y_ref = plain_branch(*ref, 2.0, keep, scale)
    assert torch.allclose(y, y_ref, atol=1e-12)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    for a, b in zip(ours, ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)
    if p:
        no_dropout = 2.0 * grad_out @ B @ A  # d/dx without the mask
        dropped = ~keep
        assert dropped.any() and torch.all(ours[0].grad[dropped] == 0)
        assert torch.allclose(ours[0].grad[keep], no_dropout[keep] * scale)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_positions_are_independent_draws_at_rate_p(p):
    """drop_index samples a Bernoulli(p) process by its geometric gaps: the dropped share, the share
    of adjacent pairs both dropped (p² if independent) and the share in the last tenth of the
    positions (no drift along the tensor) all within 5 sigma of 400,000 independent draws."""
    shape = torch.Size([400, 1000])
    n, cpu = shape.numel(), torch.device("cpu")
    m = lora_kernel.keep_mask(shape, p, 7, cpu)
    assert m.shape == shape and m.dtype == torch.bool
    assert torch.equal(m, lora_kernel.keep_mask(shape, p, 7, cpu))  # same seed, same mask
    assert not torch.equal(m, lora_kernel.keep_mask(shape, p, 8, cpu))
    dropped = ~m.flatten()

    def within_5_sigma(share: float, q: float, count: int) -> bool:
        return abs(share - q) < 5 * math.sqrt(q * (1 - q) / count)

    assert within_5_sigma(dropped.float().mean().item(), p, n)
    assert within_5_sigma((dropped[1:] & dropped[:-1]).float().mean().item(), p * p, n // 2)  # overlapping pairs: ~n/2 effective
    assert within_5_sigma(dropped[-n // 10:].float().mean().item(), p, n // 10)
    idx = lora_kernel.drop_index(n, p, 7, cpu)
    assert idx.dtype == torch.int64 and torch.all(idx[1:] > idx[:-1]) and 0 <= idx[0] and idx[-1] < n
    assert lora_kernel.keep_mask(torch.Size([3]), 0.5, 0, cpu).shape == (3,)


def test_dropout_positions_past_the_first_chunk_of_gaps():
    """When a round of gaps ends before n (rare by default), drop_index draws more and goes on from
    the last position: 97 gaps a round for ~1,000 positions takes about 11 rounds."""
    n, p = 10_000, 0.1
    idx = lora_kernel.drop_index(n, p, 3, torch.device("cpu"), chunk=97)
    assert torch.all(idx[1:] > idx[:-1]) and 0 <= idx[0] and n - 100 < idx[-1] < n
    assert abs(len(idx) / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    first = lora_kernel.drop_index(n, p, 3, torch.device("cpu"), chunk=len(idx) + 500)  # one round, the same draws
    assert torch.equal(idx, first)


def test_train_mode_layer_equals_eval_formula_without_dropout_and_checkpointing_redraws_the_mask():
    """A train-mode layer (the branch) gives the eval-mode output and gradients when p = 0; with p > 0,
    activation checkpointing's recompute draws the same mask (the seed comes from the global RNG, which
    checkpointing restores), so gradients equal those of the un-checkpointed step."""
    from torch.utils.checkpoint import checkpoint

    base = torch.nn.Linear(12, 7)
    layer = lora.LoRALinear(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 12)
    y_eval = layer.eval()(x)
    y_train = layer.train()(x)
    assert torch.allclose(y_train, y_eval, atol=1e-6)

    layer = lora.LoRALinear(torch.nn.Linear(12, 7), r=4, alpha=8, dropout=0.2).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    grads = []
    for use_checkpoint in (False, True):
        layer.zero_grad()
        torch.manual_seed(3)
        xi = x.clone().requires_grad_()
        y = checkpoint(layer, xi, use_reentrant=False) if use_checkpoint else layer(xi)
        y.square().sum().backward()
        grads.append((xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
