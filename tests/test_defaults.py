"""The default targets of lora and ia3 (a recipe without target_modules / feedforward_modules)
mean the same layers on every decoder family: LoRA the attention query and value projections
(Hu et al. 2021, §7.1), IA3 the keys, values and the feed-forward output projection's input
(Liu et al. 2022, §3.3) — a fused query/key/value Linear where the family fuses them.

The reference is HF peft 0.21.2's per-model-type defaults (``peft.utils.constants``), applied
by HF peft itself to a copy of the same model; for the families HF peft has no default for, a
hand-written list of the layers the paper means in that family's code."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.ia3 import IA3Layer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import constants
from tiny import tiny_run_recipe, tiny_tokenizer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from peftcli import artifacts, models
from peftcli.errors import UserError
from peftcli.methods import ia3, lora
from peftcli.recipe import validate
from peftcli.trainer import train

pytestmark = pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['peftcli'\]")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
GQA = dict(intermediate_size=128, num_key_value_heads=2)
# family: (model_type, config overrides on TINY) — hidden 64, 2 layers, the tiny tokenizer's vocabulary
FAMILIES = {
    "llama": ("llama", GQA),
    "mistral": ("mistral", GQA),
    "qwen2": ("qwen2", GQA),
    "qwen3": ("qwen3", {**GQA, "head_dim": 16}),
    "qwen3_moe": ("qwen3_moe", {**GQA, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "mixtral": ("mixtral", {**GQA, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma": ("gemma", {**GQA, "head_dim": 16}),
    "gemma2": ("gemma2", {**GQA, "head_dim": 16, "query_pre_attn_scalar": 16}),
    "gemma3": ("gemma3_text", {**GQA, "head_dim": 16, "query_pre_attn_scalar": 16}),
    "phi": ("phi", GQA),
    "phi3": ("phi3", GQA),
    "gpt2": ("gpt2", {"n_inner": 128}),
    "gpt_neox": ("gpt_neox", {"intermediate_size": 128}),
    "opt": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "falcon": ("falcon", {"ffn_hidden_size": 128}),
    "olmo2": ("olmo2", GQA),
    "granite": ("granite", GQA),
    "stablelm": ("stablelm", GQA),
    "cohere": ("cohere", GQA),
    "smollm3": ("smollm3", GQA),
    "gptj": ("gptj", {"n_inner": 128, "rotary_dim": 8}),
    "bloom": ("bloom", {}),
}
QV, KV_DOWN = ["q_proj", "v_proj"], (["k_proj", "v_proj", "down_proj"], ["down_proj"])
# where HF peft has no default: the paper's layers, read off each family's modeling code by hand
# family: {method: target_modules} for lora, {method: (target_modules, feedforward_modules)} for ia3
BY_HAND = {
    "phi3": {"lora": ["qkv_proj"], "ia3": (["qkv_proj", "down_proj"], ["down_proj"])},  # fused q/k/v
    "olmo2": {"lora": QV, "ia3": KV_DOWN},
    "granite": {"lora": QV, "ia3": KV_DOWN},
    "stablelm": {"ia3": KV_DOWN},
    "cohere": {"lora": QV, "ia3": KV_DOWN},
    "smollm3": {"lora": QV, "ia3": KV_DOWN},
    "qwen3_moe": {"lora": QV, "ia3": (["k_proj", "v_proj"], [])},  # fused experts: no Linear to scale
}
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])


def tiny_family(family: str) -> nn.Module:
    """A random tiny ``family`` model, float32, eval mode, seed 0."""
    tok = tiny_tokenizer()
    model_type, overrides = FAMILIES[family]
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TINY, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def hf_default(model: nn.Module, method: str) -> tuple[set[str], set[str]] | None:
    """(wrapped module paths, feedforward paths) of HF peft's default for the model type, applied
    by HF peft to ``model``; None where HF peft has no default. The mapping's lists are passed
    explicitly: HF peft's own ``target_modules=None`` path converts the config for transformers 5
    before it fills the default and then finds nothing on Mixtral; the lists are the same."""
    model_type = model.config.model_type
    if method == "lora":
        targets = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        config = targets and LoraConfig(target_modules=targets)
    else:
        targets = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
        config = targets and IA3Config(target_modules=targets,
                                       feedforward_modules=constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])
    if not config:
        return None
    wrapped = {n.removeprefix("base_model.model."): m for n, m in get_peft_model(model, config).named_modules()
               if isinstance(m, BaseTunerLayer)}
    return set(wrapped), {n for n, m in wrapped.items() if isinstance(m, IA3Layer) and m.is_feedforward}


def ours(model: nn.Module, method: str):
    """(config after apply, wrapped paths, feedforward paths) of our default ``method`` on ``model``."""
    module = lora if method == "lora" else ia3
    cfg = module.Config()
    assert cfg.target_modules is None  # the schema's default stays distinguishable from any explicit list
    wrapped = module.apply(model, cfg)
    feedforward = {n for n, m in ia3.ia3_layers(model).items() if m.is_feedforward}
    return cfg, set(wrapped), feedforward


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_hf_peft_defaults_and_apply(family, method):
    model = tiny_family(family)
    with torch.no_grad():
        base = model(IDS).logits
    reference = hf_default(copy.deepcopy(model), method)
    cfg, wrapped, feedforward = ours(model, method)
    if reference is None:
        want = BY_HAND[family][method]
        assert (cfg.target_modules, cfg.feedforward_modules) == want if method == "ia3" else cfg.target_modules == want
    else:
        assert (wrapped, feedforward) == reference
    assert wrapped and all(".0." in n or ".1." in n for n in wrapped)  # every block, inside its blocks
    assert isinstance(cfg.target_modules, list)  # the explicit list, for the run's files
    # apply works: the start is the base model (zero B, unit vectors), and every wrapped layer trains
    out = model(IDS).logits
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)
    out.float().pow(2).mean().backward()
    for name in wrapped:
        grads = [p.grad for p in model.get_submodule(name).parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("family,method", [("gpt2", "ia3"), ("phi3", "lora"), ("falcon", "lora"), ("opt", "ia3")])
def test_the_resolved_list_is_saved_and_hf_peft_loads_it(family, method, tmp_path):
    model = tiny_family(family)
    recipe = validate({"model": {"name_or_path": "unused"}, "method": {"name": method},
                       "data": {"train": {"path": "unused.jsonl"}}})
    fp = models.fingerprint(model)
    reference = copy.deepcopy(model)
    wrapped = set((lora if method == "lora" else ia3).apply(model, recipe.method))
    artifacts.save_adapter(tmp_path / "adapter", model, recipe, "unused", fp)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] and saved["peftcli"]["method"]["target_modules"] == recipe.method.target_modules
    if method == "ia3":
        assert saved["feedforward_modules"] == recipe.method.feedforward_modules
    hf = PeftModel.from_pretrained(reference, tmp_path / "adapter")  # HF peft reads the explicit names the same way
    assert {n.removeprefix("base_model.model.") for n, m in hf.named_modules() if isinstance(m, BaseTunerLayer)} == wrapped


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8}, {"name": "ia3"}])
def test_a_run_records_the_explicit_list_in_recipe_yaml(tmp_path, method):
    tok = tiny_tokenizer()
    model_dir = tmp_path / "gpt2"
    tiny_family("gpt2").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    recipe = tiny_run_recipe(tmp_path, model_dir, method, max_steps=1)
    train(recipe)
    run = tmp_path / "run"
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())["method"]
    files = json.loads((run / "adapter" / "adapter_config.json").read_text())
    if method["name"] == "lora":  # the recipe records the names; the file every wrapped module's path
        assert recorded["target_modules"] == files["peftcli"]["method"]["target_modules"] == ["c_attn"]
        assert files["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    else:
        assert recorded["target_modules"] == files["target_modules"] == ["c_attn", "mlp.c_proj"]
        assert recorded["feedforward_modules"] == files["feedforward_modules"] == ["mlp.c_proj"]


# ---------------------------------------------------------------------------------------------
# where the defaults cannot be found: one line naming the key


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.alpha, self.attn.beta = nn.Linear(8, 24), nn.Linear(8, 8)  # names that say nothing
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))


class _Anonymous(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.embed = nn.Embedding(10, 8)

    def get_input_embeddings(self):
        return self.embed


@pytest.mark.parametrize("module", [lora, ia3])
def test_no_query_value_found_is_one_line_naming_the_key_and_the_linears(module):
    with pytest.raises(UserError, match=r"^method\.target_modules: .*Linear names here: 0, 1, alpha, beta\)$") as e:
        module.apply(_Anonymous(), module.Config())
    assert "\n" not in str(e.value)


def test_ia3_square_ffn_cannot_be_placed_by_shapes():
    # intermediate = hidden: gate, up and down all map 64 -> 64
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=320, **TINY, **{**GQA, "intermediate_size": 64}))
    with pytest.raises(UserError, match=r"^method\.feedforward_modules: cannot tell"):
        ia3.apply(model, ia3.Config())
    assert lora.apply(model, lora.Config()) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


def test_ia3_feedforward_among_explicit_targets():
    cfg = ia3.Config(target_modules=["q_proj", "mlp.down_proj"])
    ia3.apply(tiny_family("llama"), cfg)
    assert cfg.feedforward_modules == ["mlp.down_proj"]
    cfg = ia3.Config(target_modules="all-linear")  # a string: the feed-forward output projections by name
    model = tiny_family("gpt2")
    ia3.apply(model, cfg)
    assert cfg.feedforward_modules == ["mlp.c_proj"]
    assert {n for n, m in ia3.ia3_layers(model).items() if m.is_feedforward} == {f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)}
    with pytest.raises(UserError, match=r"^method\.feedforward_modules: target 'c_proj' selects"):
        ia3.apply(tiny_family("gpt2"), ia3.Config(target_modules=["c_attn", "c_proj"]))


def test_ia3_explicit_feedforward_must_be_within_the_default_targets():
    cfg = ia3.Config(feedforward_modules=["up_proj"])
    with pytest.raises(UserError, match=r"^method\.feedforward_modules: feedforward_modules \['up_proj'\] are not in target_modules"):
        ia3.apply(tiny_family("llama"), cfg)
    cfg = ia3.Config(feedforward_modules=[])  # keys and values scaled at their output, down_proj too
    ia3.apply(tiny_family("llama"), cfg)
    assert cfg.target_modules == ["k_proj", "v_proj", "down_proj"]


def test_module_names_are_the_shortest_unambiguous_suffixes():
    model = tiny_family("gpt2")
    paths = [f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)]
    assert lora.module_names(model, paths) == ["mlp.c_proj"]
    assert lora.module_names(model, paths + [f"transformer.h.{i}.attn.c_proj" for i in (0, 1)]) == ["c_proj"]
    assert lora.module_names(model, ["transformer.h.1.mlp.c_proj"]) == ["1.mlp.c_proj"]
