"""C16: sliding-window attention (and attention options per-example attention does not compute) in
padding-free rows."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import random_example
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from peftcli import data, varlen
from peftcli.loss import prepare_padding_free, supervised_loss_sum
from peftcli.methods import lora

WINDOW = 4  # shorter than every example below
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
FAMILIES = {
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=WINDOW)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                                  max_window_layers=1)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=WINDOW,
                                                         layer_types=["sliding_attention", "full_attention"])),
    # attention softcap 50: transformers runs it on eager attention; the final logit softcap is C12's case, off here
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW,
                                                     final_logit_softcapping=None)),
}
# the attention padding-free rows run on: per-example attention where the model is on sdpa
PADDING_FREE_ATTENTION = {"mistral": varlen.NAME, "qwen2": varlen.NAME, "gemma3": varlen.NAME, "gemma2": "eager"}


EXAMPLES = [random_example(9, 2, 0), random_example(13, 3, 1), random_example(6, 1, 2)]


def with_lora(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    lora.apply(model, lora.Config(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return model.train()


def loss_and_grads(model, loss_fn) -> tuple[float, dict]:
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def own_forward_loss(model) -> torch.Tensor:
    """Summed cross-entropy from the model's own forward and logits on right-padded rows."""
    batch = data.collate(EXAMPLES, pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_C16_padding_free_loss_and_lora_grads_equal_own_forward_with_the_window(family, monkeypatch):
    plans = []
    split = varlen.example_masks
    monkeypatch.setattr(varlen, "example_masks", lambda *a: plans.append(split(*a)) or plans[-1])
    model = with_lora(family)
    reference = copy.deepcopy(model)  # its own attention implementation, untouched
    calls = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw.get("example_bounds")), with_kwargs=True)
    assert prepare_padding_free(model)  # (a path that cannot honour the window must return False here)
    assert model.config._attn_implementation == PADDING_FREE_ATTENTION[family]
    free = data.collate_padding_free(EXAMPLES)

    ref_loss, ref_grads = loss_and_grads(reference, lambda: own_forward_loss(reference))
    loss, grads = loss_and_grads(model, lambda: supervised_loss_sum(model, free)[0])

    if model.config._attn_implementation == varlen.NAME:
        assert calls[-1] == [0, 9, 22, 28]  # the row went through per-example attention,
        assert plans and all(plan is not None for plan in plans)  # split into its examples,
        assert any(block is not None for plan in plans for block in plan)  # with the window's band
    assert loss == pytest.approx(ref_loss, abs=1e-4)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-4)


def test_C16_the_window_changes_the_loss():
    """The reference can fail: the same Mistral without its window gives another loss."""
    model = with_lora("mistral")
    wide = copy.deepcopy(model)
    wide.config.sliding_window = None
    with torch.no_grad():
        assert abs(float(own_forward_loss(model)) - float(own_forward_loss(wide))) > 1e-2


def test_C16_a_window_shorter_than_the_example_gives_each_example_its_band():
    mask = torch.ones(6, 6, dtype=torch.bool).tril_()
    band = mask & ~torch.ones(6, 6, dtype=torch.bool).tril_(-WINDOW)  # key > query - window
    row = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    row[0, 0, :3, :3] = torch.ones(3, 3, dtype=torch.bool).tril_()
    row[0, 0, 3:, 3:] = band

    plan = varlen.example_masks(row, [0, 3, 9])

    assert plan[0] is None  # 3 tokens, inside the window: plain causal
    assert torch.equal(plan[1], band)
    crossing = row.clone()
    crossing[0, 0, 5, 1] = True
    assert varlen.example_masks(crossing, [0, 3, 9]) is None  # attends across examples: not split


def test_C16_options_not_computed_go_to_transformers_sdpa(monkeypatch):
    """An attention option per-example attention does not compute is never dropped: the call goes
    to transformers' sdpa, which computes it or refuses it (softcap) as transformers does."""
    from transformers.integrations import sdpa_attention

    module = torch.nn.Module()
    q = k = v = torch.randn(1, 2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).tril_()[None, None]
    with pytest.raises(ValueError, match="softcap"):
        varlen.varlen_attention(module, q, k, v, mask, example_bounds=[0, 5], softcap=50.0)

    seen = []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: seen.append(kw) or ("sdpa", None))
    assert varlen.varlen_attention(module, q, k, v, mask, example_bounds=[0, 5], some_new_option=0.5)[0] == "sdpa"
    assert varlen.varlen_attention(module, q, k, v, mask, example_bounds=[0, 5], is_causal=False)[0] == "sdpa"
    assert [kw.get("some_new_option") for kw in seen] == [0.5, None]
    # bookkeeping arguments and options off are not options: per-example attention runs
    out, _ = varlen.varlen_attention(module, q, k, v, mask, example_bounds=[0, 5], position_ids=torch.arange(5)[None],
                                     sliding_window=WINDOW, softcap=None, output_attentions=False)
    assert out.shape == (1, 5, 2, 8) and len(seen) == 2


def test_per_example_attention_runs_in_float32_under_cpu_bf16_autocast():
    """CPU autocast runs ``scaled_dot_product_attention`` in bfloat16 even on float32 inputs (the
    rotary embedding returns float32 q and k when the residual stream is float32), and its CPU flash-attention backward
    is 2-4x slower in bfloat16 (bench/profile_step.py, workload A: 269 -> 67 ms a step). Per-example
    attention computes in float32 there: its output equals float32 attention without autocast."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    bounds = [0, 4, 9]
    want = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                     enable_gqa=True).transpose(1, 2) for s, e in zip(bounds, bounds[1:])], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = varlen.varlen_attention(module, q, k, v, None, example_bounds=bounds)
        in_bf16 = F.scaled_dot_product_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], is_causal=True, enable_gqa=True)
    assert in_bf16.dtype == torch.bfloat16  # what autocast alone would have computed
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
