"""C13 (prompt methods on the body the model's own forward runs) and C16 (sliding-window and other
attention options in padding-free rows)."""

from __future__ import annotations

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from tiny import tiny_llama
from torch import nn
from transformers import BartConfig, BartForCausalLM, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from peftcli import methods
from peftcli.errors import UserError
from peftcli.models import decoder_body, decoder_body_name
from peftcli.recipe import validate

N = 5  # virtual tokens
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
PAD = 2
# HF peft (the reference) warns about transformers 5's cache argument names
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated", "ignore:Both `past_key_values`")


def tiny_opt(word_embed_proj_dim: int = 64, seed: int = 0) -> OPTForCausalLM:
    """A 2-layer OPT, hidden 64, ffn 128; ``word_embed_proj_dim`` != 64 adds project_in / project_out."""
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=word_embed_proj_dim,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=PAD)
    return OPTForCausalLM(config).eval()


FAMILIES = {
    "opt": lambda: tiny_opt(),
    "opt-project-in-out": lambda: tiny_opt(word_embed_proj_dim=32),
    "llama": lambda: tiny_llama(seed=0),
}
BODIES = {"opt": "model.decoder", "opt-project-in-out": "model.decoder", "llama": "model"}
METHOD_KEYS = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": N},
    "p_tuning": {"name": "p_tuning", "num_virtual_tokens": N, "encoder_hidden_size": 32},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": N},
}


def adapted(family: str, key: str):
    """Our method on a tiny base (random prompt, encoder or prefix), eval mode."""
    model = FAMILIES[family]()
    cfg = validate({"model": {"name_or_path": "unused"}, "method": METHOD_KEYS[key],
                    "data": {"train": {"path": "unused.jsonl"}}}).method
    torch.manual_seed(1)
    methods.get(cfg.name).apply(model, cfg)
    return model.eval()


def hf_peft(family: str, key: str, weights: torch.Tensor):
    """HF peft's model of the same method on the same base, holding our saved ``prompt_embeddings``."""
    base = FAMILIES[family]()
    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": N, "inference_mode": True}
    embed_dim = base.get_input_embeddings().weight.shape[1]  # OPT: word_embed_proj_dim, not hidden_size
    config = {"prompt_tuning": lambda: PromptTuningConfig(**common, token_dim=embed_dim),
              "p_tuning": lambda: PromptEncoderConfig(**common, token_dim=embed_dim),
              "prefix_tuning": lambda: PrefixTuningConfig(**common)}[key]()
    hf = get_peft_model(base, config).eval()
    with torch.no_grad():
        hf.prompt_encoder.default.embedding.weight.copy_(weights)
    return hf


@torch.no_grad()
def greedy(model, use_cache: bool) -> list[list[int]]:
    out = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), do_sample=False, max_new_tokens=8,
                         min_new_tokens=8, pad_token_id=PAD, use_cache=use_cache)
    return out[:, IDS.shape[1]:].tolist()


def tiny_other(family: str):
    """Families whose body is not at ``base_model_prefix`` either, or is named otherwise."""
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    config = BartConfig(vocab_size=320, d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128,
                        encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, max_position_embeddings=64)
    return BartForCausalLM(config).eval()


OTHER_BODIES = {"gpt2": "transformer", "bart": "model.decoder"}


@pytest.mark.parametrize("family", list(FAMILIES) + list(OTHER_BODIES))
def test_C13_decoder_body_is_the_module_the_forward_runs(family):
    model = FAMILIES[family]() if family in FAMILIES else tiny_other(family)
    calls = []
    body = decoder_body(model)
    body.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        from_body = model.get_output_embeddings()(body(input_ids=IDS, use_cache=False).last_hidden_state)

    assert decoder_body_name(model) == {**BODIES, **OTHER_BODIES}[family]
    assert calls == [1, 1]  # the model's own forward ran through it, once
    torch.testing.assert_close(from_body, logits, atol=1e-5, rtol=0)  # body + head: the model's own logits


@pytest.mark.parametrize("key", list(METHOD_KEYS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_C13_adapted_forward_equals_hf_peft_and_differs_from_base(family, key):
    model = adapted(family, key)
    weights = methods.get(METHOD_KEYS[key]["name"]).state_dict(model)["prompt_embeddings"]
    hf = hf_peft(family, key, weights)
    with torch.no_grad():
        ours = model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
        reference = hf(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits  # HF peft on the same weights
        base = FAMILIES[family]()(input_ids=IDS).logits
    reference = reference[:, -IDS.shape[1]:]  # prompt methods: HF peft returns n + T positions, the last T are real

    assert ours.shape == base.shape
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    assert (ours - base).abs().max() > 1e-2


@pytest.mark.parametrize("key", list(METHOD_KEYS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_C13_greedy_generate_same_with_cache_on_and_off_and_differs_from_base(family, key):
    model = adapted(family, key)

    with_cache, without_cache = greedy(model, use_cache=True), greedy(model, use_cache=False)
    base = greedy(FAMILIES[family](), use_cache=True)

    assert with_cache == without_cache
    assert with_cache != base


class FlatLM(nn.Module):
    """A causal LM whose forward embeds and projects itself: no body module."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 10)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None):
        return self.head(self.embed(input_ids))


def test_C13_no_decoder_body_is_a_one_line_user_error():
    with pytest.raises(UserError, match="calls no decoder body") as e:
        decoder_body(FlatLM())
    assert "\n" not in str(e.value)
    # a body that takes no inputs_embeds cannot take virtual tokens
    model = tiny_opt()
    model.model.decoder.forward = lambda input_ids=None, attention_mask=None, **kw: None
    with pytest.raises(UserError, match="takes inputs_embeds") as e:
        method = methods.get("prompt_tuning")
        method.apply(model, method.Config(num_virtual_tokens=N))
    assert "\n" not in str(e.value)
