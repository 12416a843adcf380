"""data.packing: first-fit-decreasing rows (against a plain first-fit-decreasing written here),
a packed micro-batch's loss and gradients against the model's own forward on the same examples
right-padded, a packed `peft train` against an unpacked run on the same micro-batches, resume,
and the refusals."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from helpers import peft_in_process, random_example, write_jsonl, write_recipe
from safetensors.torch import load_file
from tiny import tiny_llama, tiny_tokenizer

from peftcli import data, methods, models, packing, trainer
from peftcli.errors import UserError
from peftcli.guard import reference_loss_sum
from peftcli.loss import prepare_padding_free, supervised_loss_sum
from peftcli.recipe import validate
from peftcli.rundir import read_events


def plain_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook first-fit decreasing, O(n · rows): longest first (ties by index), each item
    into the first row with room, scanning the rows in order."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = next((j for j, f in enumerate(free) if f >= lengths[i]), len(rows))
        if j == len(rows):
            rows.append([])
            free.append(capacity)
        rows[j].append(i)
        free[j] -= lengths[i]
    return rows


def test_first_fit_decreasing_by_hand():
    # 6 (item 4) opens row 0, 5 row 1, 4 row 2; 3 fits row 1 (free 3), 2 fits row 0 (free 2)
    assert packing.first_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert packing.first_fit_decreasing([], 8) == []
    with pytest.raises(ValueError, match="item 1 has size 9"):
        packing.first_fit_decreasing([3, 9], 8)
    with pytest.raises(UserError, match="data.packing: train example 2 has 9 tokens, more than data.max_seq_len 8"):
        packing.pack([random_example(3, 1, 0), random_example(9, 1, 1)], 8)


@pytest.mark.parametrize("capacity", [16, 64, 512])
def test_rows_fit_keep_every_example_once_and_match_plain_ffd(capacity):
    rng = random.Random(capacity)
    lengths = [rng.randint(1, capacity) if rng.random() < 0.2 else rng.randint(1, max(1, capacity // 4)) for _ in range(700)]
    rows = packing.first_fit_decreasing(lengths, capacity)
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert rows == plain_ffd(lengths, capacity)  # the tree search finds the same first fit
    assert rows == packing.first_fit_decreasing(list(lengths), capacity)  # deterministic
    assert len(rows) >= math.ceil(sum(lengths) / capacity)


def test_packed_stream_is_seeded_and_covers_each_example_once_per_epoch():
    examples = [random_example(n, 1, n) for n in (9, 30, 4, 17, 22, 5, 11, 28, 3, 14)]
    packed = packing.pack(examples, 32)
    assert packed.tokens == sum(len(e["input_ids"]) for e in examples)
    assert packed.fill == pytest.approx(packed.tokens / (len(packed.rows) * 32))
    for epoch in (0, 1):
        order = packing.micro_batches(packed.rows, 2, seed=3, epoch=epoch)
        assert sorted(i for mb in order for i in mb) == list(range(len(examples)))
        assert order == packing.micro_batches(packed.rows, 2, seed=3, epoch=epoch)
        # micro-batch k holds rows order[2k], order[2k+1] of the seeded permutation of the rows
        perm = torch.randperm(len(packed.rows), generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        assert order[0] == packed.rows[perm[0]] + packed.rows[perm[1]]
    assert packing.micro_batches(packed.rows, 2, 3, 0) != packing.micro_batches(packed.rows, 2, 3, 1)
    # the trainer's stream resumed at a position continues as the uninterrupted one
    full = trainer.MicroBatches(examples, 2, 3, rows=packed.rows)
    drawn = [full.next() for _ in range(7)]
    resumed = trainer.MicroBatches(examples, 2, 3, **{"epoch": 0, "index": 0}, rows=packed.rows)
    for _ in range(3):
        resumed.next()
    again = trainer.MicroBatches(examples, 2, 3, **resumed.position, rows=packed.rows)
    assert [again.next() for _ in range(4)] == drawn[3:]


def _lora_llama(tok):
    """A tiny float32 Llama with LoRA on every linear layer, B non-zero so every gradient is in play."""
    model = tiny_llama(tok)
    cfg = validate({"model": {"name_or_path": "unused"}, "data": {"train": {"path": "unused.jsonl"}},
                    "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}}).method
    module = methods.get("lora")
    torch.manual_seed(1)
    module.apply(model, cfg)
    for layer in module.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model.train()


def _loss_and_grads(model, loss_fn):
    s, n = loss_fn()
    (s / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(s.detach()) / n, n, grads


EXAMPLES = [random_example(n, p, seed) for seed, (n, p) in enumerate([(17, 5), (9, 3), (30, 12), (12, 4), (25, 10),
                                                                       (7, 2), (14, 6), (21, 8), (5, 1), (19, 7)])]


def test_packed_micro_batch_loss_and_gradients_equal_the_models_own_forward_padded():
    tok = tiny_tokenizer()
    model = _lora_llama(tok)
    rows = packing.pack(EXAMPLES, 40).rows
    micro = [EXAMPLES[i] for i in packing.micro_batches(rows, 2, seed=0, epoch=0)[0]]
    assert len(micro) >= 3  # several examples per packed micro-batch
    assert prepare_padding_free(model)
    batch = data.collate_padding_free(micro, 16, tok.pad_token_id)
    got = _loss_and_grads(model, lambda: supervised_loss_sum(model, batch))
    # reference: the model's own forward and logits on the same examples right-padded, plain autograd
    ref = _loss_and_grads(model, lambda: reference_loss_sum(model, data.collate(micro, tok.pad_token_id)))
    assert got[1] == ref[1] == sum(sum(x != -100 for x in e["labels"][1:]) for e in micro)
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], atol=1e-6, rtol=1e-5)


def test_packed_step_equals_unpacked_step_on_the_same_examples():
    # the step's loss is the mean over all its supervised tokens: packed micro-batches of rows and
    # padded micro-batches of one example each give the same loss and gradients
    tok = tiny_tokenizer()
    model = _lora_llama(tok)
    prepare_padding_free(model)
    rows = packing.pack(EXAMPLES, 40).rows
    packed = [data.collate_padding_free([EXAMPLES[i] for i in mb], 8, tok.pad_token_id)
              for mb in packing.micro_batches(rows, 2, 0, 0)]
    unpacked = [data.collate([e], tok.pad_token_id) for e in EXAMPLES]
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    results = []
    for micro in (packed, unpacked):
        loss, n = trainer.accumulate_gradients(model, micro, "cpu")
        results.append((loss, n, {k: p.grad.clone() for k, p in params.items()}))
        model.zero_grad(set_to_none=True)
    (loss_p, n_p, g_p), (loss_u, n_u, g_u) = results
    assert n_p == n_u and loss_p == pytest.approx(loss_u, rel=1e-6)
    for k in g_u:
        torch.testing.assert_close(g_p[k], g_u[k], atol=1e-6, rtol=1e-5)


WORDS = "the quick brown fox jumps over the lazy dog and answer the question".split()
ROWS = [{"prompt": " ".join(WORDS[: 1 + i % 7]), "completion": " " + " ".join(WORDS[: 1 + (5 * i) % 13])}
        for i in range(14)]  # 4 to 65 tokens each
SEQ = 96  # max_seq_len: 6 rows
LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def _recipe(tmp_path, tiny_dir, name: str, method=LORA, packed: bool = True, **train) -> dict:
    source = {"path": str(write_jsonl(tmp_path / "train.jsonl", ROWS)), "format": "completion"}
    return {"model": {"name_or_path": str(tiny_dir), "dtype": "float32"}, "method": method,
            "data": {"train": source, "eval": source, "max_seq_len": SEQ, "packing": packed, "pad_to_multiple_of": 8},
            "train": {"micro_batch_size": 2, "lr": 1e-2, "log_every": 1, "eval_every": 0, "save_every": 0,
                      "warmup_steps": 0, "scheduler": "constant", "mixed_precision": "no", **train},
            "output": {"dir": str(tmp_path / name)}}


def _losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_events(run_dir / "metrics.jsonl") if e.get("event") == "train"]


def test_packed_train_matches_an_unpacked_run_on_the_same_micro_batches(tmp_path, tiny_dir, capsys, monkeypatch):
    code, err = peft_in_process(["train", write_recipe(tmp_path / "packed.yaml", _recipe(tmp_path, tiny_dir, "packed", epochs=2))],
                                capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "packed" / "summary.json").read_text())
    tok = models.load_tokenizer(str(tiny_dir))
    train = data.tokenize_rows(ROWS, "completion", tok, SEQ, False, "rows")[0]
    lengths = [len(e["input_ids"]) for e in train]
    rows = plain_ffd(lengths, SEQ)
    assert 2 < len(rows) < len(train)
    fill = 100 * sum(lengths) / (SEQ * len(rows))
    assert f"packing: {len(train)} examples into {len(rows)} rows of up to max_seq_len {SEQ} (fill {fill:.1f}%)" in err
    assert summary["packing"] == {"examples": len(train), "rows": len(rows), "max_seq_len": SEQ, "tokens": sum(lengths),
                                  "fill_pct": round(fill, 2), "rows_per_step": 2}
    assert summary["steps"] == 2 * math.ceil(len(rows) / 2)  # epochs count packed rows
    assert summary["tokens_seen"] == 2 * sum(lengths)  # every example once per epoch
    assert summary["padding_free"] is True and summary["loss_path"]["name"] == "fast"

    # unpacked: right-padded rows (packing and padding-free off), the same micro-batches drawn
    replay = trainer.MicroBatches
    monkeypatch.setattr(trainer, "MicroBatches", lambda examples, mbs, seed, epoch=0, index=0, rows=None:
                        replay(examples, mbs, seed, epoch, index, rows=packing.pack(examples, SEQ).rows))
    recipe = _recipe(tmp_path, tiny_dir, "unpacked", packed=False, max_steps=summary["steps"])
    recipe["data"]["padding_free"] = False
    result = trainer.train(validate(recipe))
    assert result.summary["padding_free"] is False and result.summary["packing"] is None
    assert result.summary["tokens_seen"] == summary["tokens_seen"]
    assert len(_losses(tmp_path / "packed")) == summary["steps"]
    assert _losses(tmp_path / "packed") == pytest.approx(_losses(result.run_dir), rel=1e-5)
    assert summary["eval_loss"] == pytest.approx(result.summary["eval_loss"], rel=1e-5)


def test_packed_resume_gives_the_same_adapter(tmp_path, tiny_dir):
    recipe = validate(_recipe(tmp_path, tiny_dir, "run", max_steps=7, save_every=4))
    trainer.train(recipe)
    full = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    losses = _losses(tmp_path / "run")
    # resume from step 4 (the final step's checkpoint moved away): mid-epoch of the packed stream
    (tmp_path / "run" / "checkpoints" / "step-7").rename(tmp_path / "step-7")
    result = trainer.train(recipe, resume=True)
    resumed = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert _losses(result.run_dir) == losses


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_packing_refused_for_methods_with_virtual_tokens_before_the_model_loads(tmp_path, tiny_dir, capsys, monkeypatch, name):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    for command in ("train", "validate"):
        code, err = peft_in_process([command, write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, tiny_dir, "run", {"name": name}))],
                                    capsys)
        assert code == 2, err
        line = err.strip()
        assert "\n" not in line and "data.packing" in line and name in line and "set data.packing: false" in line
    assert not (tmp_path / "run").exists()


def test_packing_needs_padding_free_rows(tmp_path, tiny_dir, capsys):
    recipe = _recipe(tmp_path, tiny_dir, "run")
    recipe["data"]["padding_free"] = False
    code, err = peft_in_process(["validate", write_recipe(tmp_path / "r.yaml", recipe)], capsys)
    assert code == 2 and "packing" in err and "padding_free: true" in err


def test_packing_refused_where_the_guard_refuses_padding_free_rows(tmp_path, tiny_dir, monkeypatch):
    load = models.load_model

    def soft_capped(*a, **k):  # a logit transform after the head (like Gemma 2's soft cap): the fast path is wrong
        model = load(*a, **k)
        model.register_forward_hook(lambda module, args, out: setattr(out, "logits", 2.0 * torch.tanh(out.logits)) or out)
        return model

    monkeypatch.setattr(models, "load_model", soft_capped)
    refusal = (r"data\.packing: padding-free rows differ from LlamaForCausalLM's own forward by loss \d\.\de[-+]\d+ nats, "
               r"gradients .* set data\.packing: false \(it then trains on the reference path\)")
    with pytest.raises(UserError, match=refusal):
        trainer.train(validate(_recipe(tmp_path, tiny_dir, "run", max_steps=2)))
    assert not (tmp_path / "run" / "adapter").exists()
    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setattr("peftcli.prepare.prepare_padding_free", lambda model: False)
    with pytest.raises(UserError, match=r"data\.packing: LlamaForCausalLM attends across examples in a padding-free row"):
        trainer.train(validate(_recipe(tmp_path, tiny_dir, "run", max_steps=2)))


def test_validate_reports_packing_and_fits_the_micro_batch_to_the_rows(tmp_path, tiny_dir, capsys, monkeypatch):
    from rich.console import Console

    from peftcli import cli

    monkeypatch.setattr(cli, "out", Console(stderr=True, width=300))  # validate's report in the one captured stream
    recipe = _recipe(tmp_path, tiny_dir, "run", micro_batch_size=64)
    code, err = peft_in_process(["validate", write_recipe(tmp_path / "r.yaml", recipe)], capsys)
    assert code == 0, err
    m = re.search(r"packing: 14 examples into (\d+) rows", err)
    assert m, err
    assert f"is more than the {m.group(1)} packed rows; micro-batches hold {m.group(1)}" in err
    # the peak-memory dry step ran on the largest packed micro-batch: all the rows, so every token
    tok = models.load_tokenizer(str(tiny_dir))
    tokens = sum(len(e["input_ids"]) for e in data.tokenize_rows(ROWS, "completion", tok, SEQ, False, "rows")[0])
    assert f"{-(-tokens // 8) * 8} tokens padding-free)" in err
