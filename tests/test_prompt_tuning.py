"""Prompt tuning and P-tuning: C4 (soft prompts and the KV cache), initialisation, HF peft file
and loss parity both ways, a tiny training run and the merge refusal."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import logits, method_recipe, saved_adapter
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from tiny import tiny_llama, tiny_run_recipe, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftcli import artifacts, data, evaluate, merge, methods, models
from peftcli.errors import UserError
from peftcli.loss import supervised_loss_sum
from peftcli.methods import p_tuning, prompt_tuning

N = 8  # virtual tokens
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog"]  # different lengths
METHOD_KEYS = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": N},
    "p_tuning-mlp": {"name": "p_tuning", "num_virtual_tokens": N, "encoder_hidden_size": 32},
    "p_tuning-lstm": {"name": "p_tuning", "num_virtual_tokens": N, "encoder": "lstm", "encoder_hidden_size": 16},
}
# HF peft (the reference) warns that it ignores our "peftcli" block in adapter_config.json
pytestmark = pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['peftcli'\]")


def adapted(key: str, tok=None):
    """A tiny Llama (seed 0) with the method applied: random prompt, random encoder weights."""
    torch.manual_seed(1)
    model = tiny_llama(tok or tiny_tokenizer())
    cfg = method_recipe(**METHOD_KEYS[key]).method
    methods.get(cfg.name).apply(model, cfg)
    return model.eval()


def left_padded(tok, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded as peftcli.evaluate.generate pads."""
    ids = [tok(p, add_special_tokens=True).input_ids for p in prompts]
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return input_ids, mask


@torch.no_grad()
def greedy(model, tok, prompts: list[str], use_cache: bool = True, new: int = 10):
    """The generate() output: 10 new token ids per prompt (list of lists) and the first step's logits (B, V)."""
    input_ids, mask = left_padded(tok, prompts)
    out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=tok.pad_token_id, use_cache=use_cache,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, input_ids.shape[1]:].tolist(), out.logits[0]


# ---------------------------------------------------------------------------------------------
# C4: soft prompts and the KV cache


@pytest.mark.parametrize("key", list(METHOD_KEYS))
def test_C4_greedy_generation_same_with_cache_on_and_off_and_differs_from_base(key):
    tok = tiny_tokenizer()
    model = adapted(key, tok)

    with_cache, _ = greedy(model, tok, PROMPTS[:1], use_cache=True)
    without_cache, _ = greedy(model, tok, PROMPTS[:1], use_cache=False)
    base, _ = greedy(tiny_llama(tok), tok, PROMPTS[:1])

    assert len(with_cache[0]) == 10
    assert with_cache == without_cache
    assert with_cache != base


@pytest.mark.parametrize("key", list(METHOD_KEYS))
def test_C4_first_step_logits_equal_a_plain_forward_over_virtual_tokens_and_prompt(key):
    tok = tiny_tokenizer()
    model = adapted(key, tok)
    base = tiny_llama(tok)  # same seed: the same weights, no hooks
    ids = torch.tensor([tok(PROMPTS[1]).input_ids])  # (1, T)
    with torch.no_grad():
        virtual = model.prompt_encoder()  # (n, H)
        inputs_embeds = torch.cat([virtual[None], base.get_input_embeddings()(ids)], dim=1)  # (1, n+T, H)
        # reference: the base model's own forward over [virtual tokens + prompt embeddings]
        expected = base(inputs_embeds=inputs_embeds).logits[:, N:]  # (1, T, V)

        out = model(input_ids=ids, output_hidden_states=True)
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits  # embeddings given instead of ids
        _, first_step = greedy(model, tok, PROMPTS[1:])

    assert virtual.shape == (N, 64)
    assert out.logits.shape == (1, ids.shape[1], len(tok))  # the real positions only
    assert all(h.shape[1] == ids.shape[1] for h in out.hidden_states)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_embeds, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(first_step, expected[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", list(METHOD_KEYS))
def test_C4_left_padded_batch_rows_equal_their_single_row_generation(key):
    tok = tiny_tokenizer()
    model = adapted(key, tok)

    batch_ids, batch_first = greedy(model, tok, PROMPTS)
    batch_no_cache, _ = greedy(model, tok, PROMPTS, use_cache=False)
    singles = [greedy(model, tok, [p]) for p in PROMPTS]

    assert left_padded(tok, PROMPTS)[1][0].tolist().count(0) > 0  # the first row really is padded
    assert batch_ids == [ids[0] for ids, _ in singles] == batch_no_cache
    for row, (_, first) in enumerate(singles):
        torch.testing.assert_close(batch_first[row], first[0], atol=1e-5, rtol=0)
    # the product's path: peft generate / eval's left-padded batch
    assert evaluate.generate(model, tok, PROMPTS, 10) == [evaluate.generate(model, tok, [p], 10)[0] for p in PROMPTS]


def test_right_padded_batch_row_equals_the_row_alone():
    tok = tiny_tokenizer()
    model = adapted("prompt_tuning", tok)
    short, long = [1, 17, 42, 99], [1, 5, 6, 200, 201, 2, 8, 9, 10]
    batch = data.collate([{"input_ids": short, "labels": short}, {"input_ids": long, "labels": long}], tok.pad_token_id)
    with torch.no_grad():
        padded = logits(model, batch["input_ids"], batch["attention_mask"])[0, :len(short)]
        alone = logits(model, torch.tensor([short]))[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# the prompt and the encoder


def test_only_the_prompt_trains_and_parameter_counts():
    model = adapted("prompt_tuning")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.embedding.weight": N * 64}
    w = model.prompt_encoder.embedding.weight.detach()
    assert w.dtype == torch.float32 and -0.5 <= float(w.min()) and float(w.max()) <= 0.5  # Lester §3.2: U[-0.5, 0.5]

    model = adapted("p_tuning-mlp")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # hand computation: embedding 8·64 + Linear(64→32) + Linear(32→32) + Linear(32→64), with biases
    assert trainable == 8 * 64 + (64 * 32 + 32) + (32 * 32 + 32) + (32 * 64 + 64)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_encoder_parameters_are_named_and_shaped_as_hf_peft(encoder):
    ours = adapted(f"p_tuning-{encoder.lower()}")
    ours_shapes = {n: tuple(p.shape) for n, p in ours.prompt_encoder.named_parameters()}
    hidden = METHOD_KEYS[f"p_tuning-{encoder.lower()}"]["encoder_hidden_size"]
    # HF peft on the same spec
    hf = get_peft_model(tiny_llama(tiny_tokenizer()), PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=hidden, encoder_reparameterization_type=encoder))
    hf_shapes = {n: tuple(p.shape) for n, p in hf.prompt_encoder["default"].named_parameters()}
    assert ours_shapes == hf_shapes
    # same weights -> same output
    with torch.no_grad():
        for name, p in hf.prompt_encoder["default"].named_parameters():
            p.copy_(ours.prompt_encoder.get_parameter(name))
        expected = hf.prompt_encoder["default"](torch.arange(N)[None])[0]
    torch.testing.assert_close(ours.prompt_encoder(), expected, atol=1e-6, rtol=0)


def test_text_init_equals_hf_peft_and_vocab_init_samples_embedding_rows(tiny_dir):
    text = "hello world"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    text_init = method_recipe("prompt_tuning", num_virtual_tokens=N, init="text", init_text=text).method
    with pytest.raises(UserError, match=r"^method.init: text needs the base model's tokenizer.*tokenizer=\)$"):
        prompt_tuning.apply(AutoModelForCausalLM.from_pretrained(tiny_dir), text_init)  # no tokenizer given: no reload
    prompt_tuning.apply(model, text_init, tokenizer=AutoTokenizer.from_pretrained(tiny_dir))
    # HF peft's TEXT init on the same base and tokenizer
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tiny_dir)))
    assert torch.equal(model.prompt_encoder.embedding.weight, hf.prompt_encoder["default"].embedding.weight)
    # hand computation: the text's ids repeated to N rows
    ids = AutoTokenizer.from_pretrained(tiny_dir)(text).input_ids
    rows = model.get_input_embeddings().weight[(ids * N)[:N]]
    assert torch.equal(model.prompt_encoder.embedding.weight, rows)

    vocab = method_recipe("prompt_tuning", num_virtual_tokens=N, init="vocab").method
    samples = []
    for _ in range(2):
        torch.manual_seed(7)
        m = tiny_llama(tiny_tokenizer())
        prompt_tuning.apply(m, vocab)
        samples.append(m.prompt_encoder.embedding.weight.detach())
        table = m.get_input_embeddings().weight
        assert all(any(torch.equal(row, t) for t in table) for row in samples[-1])  # each row is a token's embedding
    assert torch.equal(samples[0], samples[1])  # the same seed, the same sample


def test_bad_config_values_are_user_errors():
    with pytest.raises(UserError, match="init: text needs init_text"):
        method_recipe("prompt_tuning", init="text")
    with pytest.raises(UserError, match="init_text is only used with init: text"):
        method_recipe("prompt_tuning", init_text="hello")
    with pytest.raises(UserError, match="method.num_virtual_tokens"):
        method_recipe("p_tuning", num_virtual_tokens=0)
    with pytest.raises(UserError, match="method.encoder"):
        method_recipe("p_tuning", encoder="gru")
    model = adapted("prompt_tuning")
    with pytest.raises(UserError, match="already has a prompt method"):
        prompt_tuning.apply(model, prompt_tuning.Config())


# ---------------------------------------------------------------------------------------------
# files: HF peft parity both ways


def saved(base_dir, adapter_dir, key):
    """Our method on the base (random prompt / encoder), saved to ``adapter_dir``; returns the model (eval)."""
    return saved_adapter(method_recipe(**METHOD_KEYS[key], base_dir=base_dir), adapter_dir, seed=2)


@pytest.mark.parametrize("key", list(METHOD_KEYS))
def test_our_adapter_loads_in_hf_peft_with_the_same_logits_and_loss(tiny_dir, tmp_path, key):
    model = saved(tiny_dir, tmp_path / "adapter", key)
    ours = logits(model, IDS)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with torch.no_grad():
        assert torch.equal(weights["prompt_embeddings"], model.prompt_encoder())  # HF's key: the (n, H) virtual tokens
    assert (cfg["peft_type"], cfg["task_type"], cfg["num_virtual_tokens"]) == (
        methods.get(METHOD_KEYS[key]["name"]).PEFT_TYPE, "CAUSAL_LM", N)

    # HF peft on the same files: it returns n + T positions; the last T are the real ones
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]),
                                   tmp_path / "adapter").eval()
    hf_logits = logits(hf, IDS)
    assert hf_logits.shape[1] == N + IDS.shape[1]
    torch.testing.assert_close(hf_logits[:, N:], ours, atol=1e-5, rtol=0)

    # loss: our trainer's mean over supervised tokens = HF peft's loss (labels extended by -100 there)
    tok = tiny_tokenizer()
    batch = data.collate([{"input_ids": [1, 17, 42, 99, 7], "labels": [-100, -100, 42, 99, 7]},
                          {"input_ids": [1, 5, 6, 200, 201, 2, 8, 9], "labels": [-100, 5, 6, 200, 201, 2, 8, 9]}],
                         tok.pad_token_id)
    with torch.no_grad():
        loss_sum, n = supervised_loss_sum(model, batch)
        hf_loss = hf(**batch).loss
    assert float(loss_sum) / n == pytest.approx(float(hf_loss), abs=1e-5)

    loaded = artifacts.load_adapted(tmp_path / "adapter")
    reloaded = loaded.model
    assert loaded.method == METHOD_KEYS[key]["name"]
    assert torch.equal(logits(reloaded, IDS), ours)


@pytest.mark.parametrize("key", list(METHOD_KEYS))
def test_hf_peft_adapter_loads_with_load_adapted(tiny_dir, tmp_path, key):
    keys = METHOD_KEYS[key]
    if keys["name"] == "prompt_tuning":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    else:
        config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=keys["encoder_hidden_size"],
                                     encoder_reparameterization_type=keys.get("encoder", "mlp").upper())
    # HF peft "trains" (its random init) and saves
    torch.manual_seed(3)
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), config).eval()
    expected = logits(hf, IDS)[:, N:]
    hf.save_pretrained(tmp_path / "hf_adapter")
    assert "peftcli" not in json.loads((tmp_path / "hf_adapter" / "adapter_config.json").read_text())

    loaded = artifacts.load_adapted(tmp_path / "hf_adapter")
    model = loaded.model

    assert loaded.method == keys["name"] and loaded.base_path == str(tiny_dir)
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-5, rtol=0)
    if keys["name"] == "p_tuning":  # only the encoder's output is in HF's file: a fixed table
        assert model.prompt_encoder.table is not None
        assert not any(p.requires_grad for p in model.parameters())
        assert set(p_tuning.state_dict(model)) == {"prompt_embeddings"}


def test_p_tuning_file_keeps_the_encoder_so_training_can_resume(tiny_dir, tmp_path):
    model = saved(tiny_dir, tmp_path / "adapter", "p_tuning-mlp")
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(weights) == {"prompt_embeddings"} | {f"prompt_encoder.{n}" for n, _ in model.prompt_encoder.named_parameters()}

    reloaded = artifacts.load_adapted(tmp_path / "adapter").model
    assert reloaded.prompt_encoder.table is None  # the live encoder, not a table
    for name, p in reloaded.prompt_encoder.named_parameters():
        assert torch.equal(p, model.prompt_encoder.get_parameter(name))
    with pytest.raises(UserError, match="missing prompt_encoder.mlp_head.4.bias"):
        p_tuning.load_state_dict(reloaded, {k: v for k, v in weights.items() if k != "prompt_encoder.mlp_head.4.bias"})
    with pytest.raises(UserError, match=r"has shape \(4, 64\)"):
        prompt_tuning.load_state_dict(adapted("prompt_tuning"), {"prompt_embeddings": torch.zeros(4, 64)})


# ---------------------------------------------------------------------------------------------
# training


def test_gradient_checkpointing_gives_the_same_loss_and_gradient():
    tok = tiny_tokenizer()
    batch = data.collate([{"input_ids": [1, 17, 42, 99, 7], "labels": [1, 17, 42, 99, 7]}], tok.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        model = adapted("p_tuning-mlp", tok).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        loss_sum, n = supervised_loss_sum(model, batch)
        (loss_sum / n).backward()
        grads.append((float(loss_sum.detach()), model.prompt_encoder.embedding.weight.grad.clone()))
    assert grads[1][0] == pytest.approx(grads[0][0], abs=1e-6)
    assert grads[0][1].abs().sum() > 0
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("key", ["prompt_tuning", "p_tuning-mlp"])
def test_tiny_training_run_reload_and_merge_refused(tmp_path, tiny_dir, key):
    from peftcli.rundir import read_events
    from peftcli.trainer import seed_everything, train

    recipe = tiny_run_recipe(tmp_path, tiny_dir, METHOD_KEYS[key], save_every=2, warmup_steps=0)
    seed_everything(recipe.train.seed)  # the trainer's own steps before training: seed, load, apply
    initial, _, _ = models.load_base(str(tiny_dir))
    methods.get(recipe.method.name).apply(initial, recipe.method)

    result = train(recipe)

    losses = [e["loss"] for e in read_events(result.run_dir / "metrics.jsonl") if e["event"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    for name, p in result.model.prompt_encoder.named_parameters():
        step = (p - initial.prompt_encoder.get_parameter(name)).abs().max()
        assert 0 < step <= 3 * 1e-2 * 1.5, name  # moved, by at most ~lr per Adam step: the start was reproduced
    reloaded = artifacts.load_adapted(result.run_dir).model
    torch.testing.assert_close(logits(reloaded, IDS), logits(result.model, IDS), atol=1e-6, rtol=0)
    # resume from the step-2 checkpoint: the adapter file holds everything that trains
    resumed = train(recipe, resume=True)
    assert resumed.summary["steps"] == 3

    name = recipe.method.name
    why = methods.get(name).CANNOT_MERGE
    with pytest.raises(UserError, match=f"method {name} cannot be merged: {why}"):
        merge.merge_adapter(result.run_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
