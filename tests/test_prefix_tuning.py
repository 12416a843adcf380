"""Prefix tuning: CASES C5 (grouped-query attention, explicit head_dim), the KV cache on and off,
HF peft file and logits parity both ways, projection folding, a tiny training run."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from helpers import logits, method_recipe, perturb, saved_adapter
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from tiny import save_tiny, tiny_llama, tiny_run_recipe
from transformers import AutoModelForCausalLM

from peftcli import artifacts, evaluate, merge
from peftcli.errors import UserError
from peftcli.loss import supervised_loss_sum
from peftcli.methods import prefix_tuning as pt

# C5's model: hidden 64, 4 heads, 2 key/value heads, head_dim 32 (not 64 / 4)
GQA = {"head_dim": 32}
N = 5
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])  # row 2 right-padded
make_recipe = partial(method_recipe, "prefix_tuning", num_virtual_tokens=N)
PROMPTS = ["the quick brown fox", "hello world answer question user"]  # different lengths: left padding
# HF peft (the reference) warns that it ignores our "peftcli" block in adapter_config.json
pytestmark = pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['peftcli'\]",
                                        "ignore:`past_key_values` is deprecated", "ignore:Both `past_key_values`")


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """The C5 tiny Llama (head_dim 32) + tokenizer as a transformers dir."""
    return save_tiny(tmp_path_factory.mktemp("gqa") / "model", **GQA)


def prefixed(tokenizer=None, seed: int = 1, **method_keys):
    """The C5 tiny Llama with a random prefix (eval mode)."""
    model = tiny_llama(tokenizer, **GQA)
    pt.apply(model, make_recipe(**method_keys).method)
    perturb(model.prefix_encoder, seed=seed, scale=1.0)  # the prefix (or its MLP) from N(0, 1)
    return model


def masked_logits(model) -> torch.Tensor:
    """The logits of IDS under MASK, (B, T, V) float32; positions with attention mask 0 are
    zeroed (their values are arbitrary)."""
    return logits(model, IDS, MASK) * MASK[..., None]


def record_prefix_shapes(model) -> list:
    """Record, at each call of the decoder body, the (keys, values) shapes of every layer of the
    cache our pre-hook passed in (a pre-hook registered after ours sees what it built)."""
    seen = []

    def hook(module, args, kwargs):
        cache = kwargs["cache"]
        seen.append([(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers])

    model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def trained(base_dir, adapter_dir, **method_keys):
    """Our prefix (random) on the base, saved to ``adapter_dir``; returns the model (eval)."""
    return saved_adapter(make_recipe(base_dir, **method_keys), adapter_dir,
                         lambda model: perturb(model.prefix_encoder, scale=1.0))


# ---------------------------------------------------------------------------------------------
# C5 and the cache


def test_C5_prefix_tuning_gqa_explicit_head_dim():
    model = prefixed()
    assert pt.attention_shape(model) == (2, 2, 32)  # layers, kv heads, head_dim from config.head_dim
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * 32 != 64
    seen = record_prefix_shapes(model)

    # padded forward
    out = masked_logits(model)
    assert out.shape == (2, 7, 320) and torch.isfinite(out).all()
    assert seen[-1] == [((2, 2, N, 32), (2, 2, N, 32))] * 2  # per layer [batch, kv heads, n, head_dim]

    # backward: only the prefix gets gradients
    model.train()
    labels = IDS.masked_fill(MASK == 0, -100)
    loss_sum, n = supervised_loss_sum(model, {"input_ids": IDS, "attention_mask": MASK, "labels": labels})
    (loss_sum / n).backward()
    assert model.prefix_encoder.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("prefix_encoder."))

    # cached generation, left-padded batch of 2
    model.eval()
    seen.clear()
    ids = torch.tensor([[2, 2, 1, 17, 42], [1, 5, 6, 200, 201]])
    out = model.generate(input_ids=ids, attention_mask=(ids != 2).long(), max_new_tokens=4, do_sample=False,
                         pad_token_id=2, eos_token_id=None, use_cache=True)
    assert out.shape == (2, 9)
    assert seen[0] == [((2, 2, N, 32), (2, 2, N, 32))] * 2  # prefill: the prefix alone
    assert [shapes[0][0][2] for shapes in seen[1:]] == [N + 5, N + 6, N + 7]  # decode steps: prefix + past tokens


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_greedy_identical_with_cache_on_and_off_left_padded(tok, projection):
    model = prefixed(tok, projection=projection)

    on = evaluate.generate(model, tok, PROMPTS, max_new_tokens=10, use_cache=True)
    off = evaluate.generate(model, tok, PROMPTS, max_new_tokens=10, use_cache=False)
    alone = [evaluate.generate(model, tok, [p], max_new_tokens=10)[0] for p in PROMPTS]
    base = evaluate.generate(tiny_llama(tok, **GQA), tok, PROMPTS, max_new_tokens=10)

    assert all(on) and on == off
    assert on == alone  # the left-padded batch equals each prompt generated alone
    assert on != base


def test_first_step_and_positions_follow_hf_forward(tok):
    """Greedy tokens equal an argmax loop over HF peft's forward on the full sequence (no cache)
    with the same prefix. (HF peft 0.21's own ``generate`` drops the prefix under transformers 5:
    it passes ``past_key_values`` beside generate's ``cache``, which wins.)"""
    model = prefixed(tok)
    hf = get_peft_model(tiny_llama(tok, **GQA), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)).eval()
    with torch.no_grad():
        hf.prompt_encoder.default.embedding.weight.copy_(model.prefix_encoder.embedding.weight)
    ids = tok(PROMPTS[0]).input_ids
    expected = list(ids)
    for _ in range(10):  # HF peft on the same weights, position ids n, n+1, ... as it assigns them
        with torch.no_grad():
            expected.append(int(hf(input_ids=torch.tensor([expected])).logits[0, -1].argmax()))
    ours = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.pad_token_id)
    assert ours[0].tolist() == expected


# ---------------------------------------------------------------------------------------------
# HF peft parity


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_our_adapter_loads_in_hf_peft(gqa_dir, tmp_path, projection):
    model = trained(gqa_dir, tmp_path / "adapter", projection=projection)
    ours = masked_logits(model)
    assert (ours - masked_logits(AutoModelForCausalLM.from_pretrained(gqa_dir))).abs().max() > 1e-2  # the prefix changes it
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["num_virtual_tokens"], cfg["prefix_projection"]) == \
        ("PREFIX_TUNING", "CAUSAL_LM", N, False)  # the file holds the folded prefix, no MLP
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (N, 2 * 2 * 2 * 32)}

    # HF peft on the same files
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]),
                                   tmp_path / "adapter").eval()
    hf_cfg = hf.peft_config["default"]
    assert (hf_cfg.num_layers, hf_cfg.num_attention_heads, hf_cfg.token_dim) == (2, 2, 2 * 32)
    torch.testing.assert_close(masked_logits(hf), ours, atol=1e-5, rtol=0)

    loaded = artifacts.load_adapted(tmp_path / "adapter")
    reloaded = loaded.model
    assert loaded.method == "prefix_tuning"
    assert torch.equal(masked_logits(reloaded), ours)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_hf_peft_adapter_loads_with_load_adapted(gqa_dir, tmp_path, projection):
    # HF peft "trains" (random prefix, or random MLP) and saves a PrefixTuning adapter
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(gqa_dir),
                        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection))
    perturb(hf.prompt_encoder, seed=3, scale=1.0)
    expected = masked_logits(hf.eval())
    hf.save_pretrained(tmp_path / "hf_adapter")

    loaded = artifacts.load_adapted(tmp_path / "hf_adapter")
    model = loaded.model
    assert loaded.method == "prefix_tuning" and loaded.base_path == str(gqa_dir)
    assert model.prefix_encoder.folded is projection  # an MLP adapter arrives folded
    torch.testing.assert_close(masked_logits(model), expected, atol=1e-5, rtol=0)


def test_loss_equals_hf_peft_loss(gqa_dir, tmp_path):
    model = trained(gqa_dir, tmp_path / "adapter")
    labels = IDS.masked_fill(MASK == 0, -100)
    labels[:, :3] = -100  # a prompt: not supervised
    with torch.no_grad():
        loss_sum, n = supervised_loss_sum(model, {"input_ids": IDS, "attention_mask": MASK, "labels": labels})
    # HF peft on the same files: mean cross-entropy over the supervised next tokens
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gqa_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = hf(input_ids=IDS, attention_mask=MASK, labels=labels).loss
    assert n == 4 + 2  # hand count: targets at positions 3-6 of row 1, 3-4 of row 2
    torch.testing.assert_close(loss_sum / n, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# projection folding, errors


def test_projection_folds_into_the_saved_prefix(gqa_dir, tmp_path):
    model = trained(gqa_dir, tmp_path / "adapter", projection=True, encoder_hidden_size=48)
    enc = model.prefix_encoder
    # hand computation (§4.3): P = W2 tanh(W1 E + b1) + b2; E: (n, kv_heads·head_dim = 64)
    assert enc.embedding.weight.shape == (N, 64) and enc.transform[0].out_features == 48
    with torch.no_grad():
        e = enc.embedding.weight
        expected = torch.tanh(e @ enc.transform[0].weight.T + enc.transform[0].bias) @ enc.transform[2].weight.T \
            + enc.transform[2].bias
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(saved, expected, atol=1e-6, rtol=1e-6)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == N * 64 + (64 * 48 + 48) + (48 * 256 + 256)

    reloaded = artifacts.load_adapted(tmp_path / "adapter").model
    assert reloaded.prefix_encoder.folded and reloaded.prefix_encoder.transform is None
    assert torch.equal(reloaded.prefix_encoder(), saved)
    assert torch.equal(masked_logits(reloaded), masked_logits(model))
    reloaded.train()  # e.g. --resume: the MLP is gone, training further is refused in one line
    with pytest.raises(UserError, match="folded prefix only"):
        supervised_loss_sum(reloaded, {"input_ids": IDS, "attention_mask": MASK, "labels": IDS})


def test_refusals():
    model = prefixed()
    with pytest.raises(UserError, match=r"shape \(4, 256\), the model needs \(5, 256\)"):
        pt.load_state_dict(model, {"prompt_embeddings": torch.zeros(4, 256)})
    with pytest.raises(UserError, match="unexpected prompt_encoder.weight"):
        pt.load_state_dict(model, {"prompt_embeddings": torch.zeros(5, 256), "prompt_encoder.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="encoder-decoder"):
        pt.config_from_adapter({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 5, "num_transformer_submodules": 2})
    # merge refused with its reason: tests/test_method_contract.py, for every method
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(UserError, match="gradient checkpointing"):
        supervised_loss_sum(model, {"input_ids": IDS, "attention_mask": MASK, "labels": IDS})


# ---------------------------------------------------------------------------------------------
# a tiny training run


def test_tiny_training_run_reload_and_merge_refused(tmp_path, gqa_dir):
    from peftcli.rundir import read_events
    from peftcli.trainer import train

    recipe = tiny_run_recipe(tmp_path, gqa_dir, {"name": "prefix_tuning", "num_virtual_tokens": N, "projection": True}, save_every=1)

    result = train(recipe)

    losses = [e["loss"] for e in read_events(result.run_dir / "metrics.jsonl") if e["event"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    prefixes = [load_file(str(result.run_dir / d / "adapter_model.safetensors"))["prompt_embeddings"]
                for d in ("checkpoints/step-1/adapter", "checkpoints/step-2/adapter", "adapter")]
    assert not torch.equal(prefixes[0], prefixes[1]) and not torch.equal(prefixes[1], prefixes[2])  # it trains
    reloaded = artifacts.load_adapted(result.run_dir).model
    torch.testing.assert_close(masked_logits(reloaded), masked_logits(result.model), atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="method prefix_tuning cannot be merged: a prefix adds virtual key/value"):
        merge.merge_adapter(result.run_dir, tmp_path / "merged")


def test_C5_prefix_shape_is_the_cache_the_model_builds_not_its_config():
    # Falcon with multi_query keeps 1 key/value head although its config says num_kv_heads 4
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128)
    assert config.multi_query and config.num_kv_heads == 4
    model = FalconForCausalLM(config).eval()
    assert pt.attention_shape(model) == (2, 1, 16)
    pt.apply(model, pt.Config(num_virtual_tokens=N))
    out = masked_logits(model)
    assert out.shape == (2, 7, 320) and torch.isfinite(out).all()
