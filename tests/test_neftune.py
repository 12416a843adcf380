"""NEFTune (``train.neftune_alpha``; Jain et al. 2023, Algorithm 1): uniform noise of at most
alpha/√(L·d) on the input embeddings of the training forward, L each example's own length.

The noise itself on a plain embedding (its bound per example, its spread, zero on padding and in
eval, reproducible from the seed); the virtual tokens of a prompt method untouched; a training
step equal to the model's own forward on embeddings + the same noise computed by hand; and the
trainer: noisy steps, clean evals, hooks gone afterwards."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from helpers import random_example
from tiny import tiny_llama, tiny_run_recipe
from torch import nn

from peftcli import data
from peftcli.data import IGNORE_INDEX
from peftcli.loss import SupervisedLoss, eval_loss, make_collate, prepare_padding_free
from peftcli.methods import lora, prompt_tuning
from peftcli.neftune import NEFTune, example_lengths
from peftcli.trainer import accumulate_gradients, train

ALPHA = 5.0


class EmbedOnly(nn.Module):
    """A loss module whose forward is only the embedding (what NEFTune hooks), returning it."""

    def __init__(self, width: int = 1024):
        super().__init__()
        self.embed = nn.Embedding(400, width)

    def forward(self, batch):
        return self.embed(batch["input_ids"])


def _noise_of(module: EmbedOnly, batch: dict, seed: int = 0) -> torch.Tensor:
    """What the hooked training forward adds to the embeddings of ``batch``, (B, T, d)."""
    hooks = NEFTune(ALPHA).attach(module, module.embed)
    torch.manual_seed(seed)
    noisy = module(batch)
    hooks.detach()
    return (noisy - module.embed(batch["input_ids"])).detach()


def test_example_lengths_padded_and_padding_free():
    padded = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    assert example_lengths(padded).tolist() == [[3, 3, 3, 0], [2, 2, 0, 0]]
    free = {"input_ids": torch.zeros(1, 6, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}
    assert example_lengths(free).tolist() == [[3, 3, 3, 2, 2, 1]]
    plain = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    assert example_lengths(plain).tolist() == [[5] * 5] * 2


def test_noise_is_uniform_within_each_examples_bound():
    module = EmbedOnly().train()
    d = 1024
    lengths = [3, 7, 20]  # one padding-free row: the bound is each example's, not the row's (30)
    ids = torch.randint(0, 400, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "position_ids": torch.tensor([[i for n in lengths for i in range(n)]])}
    noise = _noise_of(module, batch)
    start = 0
    for n in lengths:
        part, bound = noise[0, start:start + n], ALPHA / math.sqrt(n * d)  # Algorithm 1: α/√(L·d)
        start += n
        assert float(part.abs().max()) <= bound * (1 + 1e-6)
        assert float(part.abs().max()) >= 0.99 * bound  # ≥ 3,072 draws: the largest is near the bound
        assert abs(float(part.mean())) < 0.05 * bound  # U(-b, b): mean 0, std b/√3
        assert float(part.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # right-padded rows: each row's own length, no noise on its padding
    mask = torch.tensor([[1] * 20, [1] * 5 + [0] * 15])
    noise = _noise_of(module, {"input_ids": ids[:, :20].repeat(2, 1), "attention_mask": mask})
    assert float(noise[0].abs().max()) == pytest.approx(ALPHA / math.sqrt(20 * d), rel=0.01)
    assert float(noise[1, :5].abs().max()) == pytest.approx(ALPHA / math.sqrt(5 * d), rel=0.01)
    assert not noise[1, 5:].any()


def test_no_noise_in_eval_mode_outside_the_loss_call_or_after_detach():
    module = EmbedOnly(64)
    batch = {"input_ids": torch.arange(10)[None]}
    clean = module.embed(batch["input_ids"])
    hooks = NEFTune(ALPHA).attach(module, module.embed)
    module.eval()
    assert torch.equal(module(batch), clean)  # eval mode
    module.train()
    assert torch.equal(module.embed(batch["input_ids"]), clean)  # the embedding called outside the training loss call
    assert not torch.equal(module(batch), clean)  # the training forward
    hooks.detach()
    assert torch.equal(module(batch), clean)


def test_the_noise_is_drawn_from_the_seeded_generator():
    module = EmbedOnly(64).train()
    batch = {"input_ids": torch.arange(12)[None]}
    assert torch.equal(_noise_of(module, batch, seed=3), _noise_of(module, batch, seed=3))
    assert not torch.equal(_noise_of(module, batch, seed=3), _noise_of(module, batch, seed=4))


def test_virtual_tokens_get_no_noise(tok):
    model = tiny_llama(tok)
    n = 4
    prompt_tuning.apply(model, prompt_tuning.Config(num_virtual_tokens=n))
    model.train()
    ids = torch.randint(5, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
    loss_module = SupervisedLoss(model)
    NEFTune(ALPHA).attach(loss_module, model.get_input_embeddings())
    loss_module(batch)
    hidden = seen[-1]  # the first layer's input: [virtual tokens ; embeddings + noise], (B, n + T, d)
    prompt = prompt_tuning.state_dict(model)[prompt_tuning.EMBEDDINGS_KEY]
    assert torch.equal(hidden[:, :n], prompt.expand(2, -1, -1))  # the virtual tokens exactly
    real = hidden[:, n:] - model.get_input_embeddings()(ids).detach()
    d = real.shape[-1]
    assert 0 < float(real.abs().max()) <= ALPHA / math.sqrt(6 * d) * (1 + 1e-6)  # L = the 6 real tokens


def _lora_model(tok):
    model = tiny_llama(tok)
    lora.apply(model, lora.Config(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)  # non-zero B so A gets gradients too
    return model.train()


@pytest.mark.parametrize("padding_free", [False, True])
def test_a_training_step_equals_the_hand_computation_with_the_same_noise(tok, padding_free):
    model = _lora_model(tok)
    examples = [random_example(9, 3, 0), random_example(14, 5, 1)]
    if padding_free:
        assert prepare_padding_free(model)
        batch = data.collate_padding_free(examples)
    else:
        batch = data.collate(examples, tok.pad_token_id)
    loss_module = SupervisedLoss(model)
    hooks = NEFTune(ALPHA).attach(loss_module, model.get_input_embeddings())
    torch.manual_seed(5)
    loss, n = accumulate_gradients(loss_module, [batch], "cpu")
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    hooks.detach()
    model.zero_grad(set_to_none=True)

    # by hand: the same U(-1, 1) draw, scaled by α/√(L·d) with L each example's length, added to the
    # embeddings; then each example alone through the model's own forward and logits
    torch.manual_seed(5)
    rows, width = batch["input_ids"].shape
    d = model.config.hidden_size
    eps = torch.rand(rows, width, d) * 2 - 1
    embeds = model.get_input_embeddings()(batch["input_ids"])
    total, count, start = 0.0, 0, 0
    for b, e in enumerate(examples):
        length = len(e["input_ids"])
        row, span = (0, slice(start, start + length)) if padding_free else (b, slice(0, length))
        start += length
        x = embeds[row, span] + eps[row, span] * ALPHA / math.sqrt(length * d)
        logits = model(inputs_embeds=x[None], use_cache=False).logits[0]
        targets = torch.tensor(e["labels"][1:])
        keep = targets != IGNORE_INDEX
        total = total + F.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum")
        count += int(keep.sum())
    (total / count).backward()
    assert count == n
    assert loss == pytest.approx(float(total.detach()) / count, abs=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[k], p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                                    {"name": "prompt_tuning", "num_virtual_tokens": 3}], ids=["lora", "prompt_tuning"])
def test_the_trainer_trains_noisy_and_evaluates_clean(tmp_path, tiny_dir, method):
    def run(where, **train_keys):
        where.mkdir()
        return train(tiny_run_recipe(where, tiny_dir, method, eval_rows=True, max_steps=2, **train_keys))

    noisy = run(tmp_path / "noisy", neftune_alpha=50.0)
    plain = run(tmp_path / "plain")
    first = [[json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("event") == "train"][0]["loss"] for r in (noisy, plain)]
    assert first[0] != pytest.approx(first[1], abs=1e-4)  # the same weights at step 1, the noise changes the loss
    embedding = noisy.model.get_input_embeddings()
    assert not embedding._forward_hooks  # the hooks are gone with the run
    # the final eval was clean: the returned model (no hooks) scores the same on the eval rows
    again = eval_loss(noisy.model, noisy.datasets.eval, make_collate(False, noisy.tokenizer.pad_token_id), 2, nullcontext)
    assert again["eval_loss"] == pytest.approx(noisy.summary["eval_loss"], abs=1e-5)
