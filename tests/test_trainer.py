"""The training loop: loss normalisation (C8), EOS learning (C7), and the run dir it writes."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import peft_in_process, random_example
from tiny import tiny_llama, tiny_run_recipe, tiny_tokenizer

from peftcli import data, recipe, varlen
from peftcli.data import IGNORE_INDEX
from peftcli.errors import UserError
from peftcli.loss import prepare_padding_free, supervised_loss_sum
from peftcli.methods import lora
from peftcli.rundir import read_events
from peftcli.trainer import accumulate_gradients, train


def _lora_model(tok, dropout=0.0, seed=0):
    model = tiny_llama(tok, seed=seed)
    lora.apply(model, lora.Config(r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed + 1)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)  # non-zero B so A gets gradients too
    return model.train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_C8a_extra_padding_changes_nothing():
    tok = tiny_tokenizer()
    model = _lora_model(tok)
    examples = [random_example(7, 3, 0), random_example(12, 4, 1)]
    batch = data.collate(examples, tok.pad_token_id)
    loss, n = accumulate_gradients(model, [batch], "cpu")
    g = _grads(model)
    model.zero_grad()
    extra = 9  # append 9 more padded positions to every row
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.full((2, extra), tok.pad_token_id)], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(2, extra, dtype=torch.long)], 1),
        "labels": torch.cat([batch["labels"], torch.full((2, extra), IGNORE_INDEX)], 1),
    }
    loss2, n2 = accumulate_gradients(model, [padded], "cpu")
    assert n2 == n == (7 - 3) + (12 - 4) - 0  # supervised next-token targets: positions 1..T-1 with labels
    assert loss2 == pytest.approx(loss, abs=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, g[name], atol=1e-6, rtol=1e-5)


def test_C8b_micro_batch_vs_accumulation_same_gradients():
    tok = tiny_tokenizer()
    short, long = random_example(5, 2, 3), random_example(40, 10, 4)
    model = _lora_model(tok)
    loss_a, n_a = accumulate_gradients(model, [data.collate([short, long], tok.pad_token_id)], "cpu")
    g_a = _grads(model)
    model.zero_grad()
    loss_b, n_b = accumulate_gradients(
        model, [data.collate([short], tok.pad_token_id), data.collate([long], tok.pad_token_id)], "cpu")
    g_b = _grads(model)
    assert n_a == n_b == (5 - 2) + (40 - 10)
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], atol=1e-6, rtol=1e-5)

    # hand computation of the reference: the mean of per-token cross-entropies over both examples,
    # not the mean of the two per-example means (which would weight the 3 short tokens 11x more)
    with torch.no_grad():
        sums = [supervised_loss_sum(model, data.collate([e], tok.pad_token_id)) for e in (short, long)]
    token_mean = (float(sums[0][0]) + float(sums[1][0])) / (sums[0][1] + sums[1][1])
    mean_of_means = (float(sums[0][0]) / sums[0][1] + float(sums[1][0]) / sums[1][1]) / 2
    assert loss_a == pytest.approx(token_mean, abs=1e-5)
    assert abs(loss_a - mean_of_means) > 1e-3


def _per_token_losses(model, batch):
    """Cross-entropy of every next-token target (B, T-1), -100 targets as nan; full logits (reference path)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return ce.masked_fill(targets == IGNORE_INDEX, float("nan"))


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adapter"])
def test_padding_free_rows_same_loss_and_gradients_as_padded(method, attn):
    """attn "varlen": the trainer's per-example attention (peftcli.varlen) on the padding-free row;
    "sdpa"/"eager": transformers' block-diagonal mask. The padded batch and the per-example
    reference use transformers' sdpa/eager in every case."""
    from peftcli.methods import adapter, ia3

    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3, attn_implementation="sdpa" if attn == "varlen" else attn)
    if attn == "varlen":
        assert prepare_padding_free(model) and model.config._attn_implementation == varlen.NAME
        calls = []
        model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("example_bounds")),
                                                                   with_kwargs=True)
    if method in ("lora", "dora"):
        lora.apply(model, lora.Config(r=4, alpha=8, dropout=0.0, target_modules="all-linear", dora=method == "dora"))
        for layer in lora.lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    elif method == "ia3":
        ia3.apply(model, ia3.Config())
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, 1.0, 0.2)
    else:
        adapter.apply(model, adapter.Config(reduction_factor=4))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, 0.0, 0.1)
    model.train()
    # the third example is fully supervised (text format: its first token has a label), which the
    # padding-free row must not predict from the previous example's last token
    ids = random_example(11, 0, 9)["input_ids"]
    examples = [random_example(7, 3, 0), random_example(19, 4, 1), {"input_ids": ids, "labels": list(ids)}, random_example(2, 1, 2)]
    free = data.collate_padding_free(examples)
    assert free["input_ids"].shape == (1, 7 + 19 + 11 + 2) and "attention_mask" not in free
    assert free["position_ids"][0].tolist() == [*range(7), *range(19), *range(11), *range(2)]

    loss_p, n_p = accumulate_gradients(model, [data.collate(examples, tok.pad_token_id)], "cpu")
    g_p = _grads(model)
    model.zero_grad()
    loss_f, n_f = accumulate_gradients(model, [free], "cpu")
    g_f = _grads(model)
    if attn == "varlen":  # the padding-free row went through per-example attention, the padded batch did not
        assert calls == [None, [0, 7, 26, 37, 39]]
    assert n_f == n_p == (7 - 3) + (19 - 4) + 10 + 1
    assert loss_f == pytest.approx(loss_p, abs=1e-5)
    for name in g_p:
        torch.testing.assert_close(g_f[name], g_p[name], atol=1e-5, rtol=1e-4)

    # per example: the padding-free row's token losses == each example run alone (the reference)
    with torch.no_grad():
        row = _per_token_losses(model, free)[0]
        start = 0
        for e in examples:
            alone = _per_token_losses(model, data.collate([e], tok.pad_token_id))[0]
            n = len(e["input_ids"])
            inside = row[start:start + n - 1]  # targets inside the example; the boundary one is -100
            torch.testing.assert_close(inside, alone, atol=1e-5, rtol=1e-4, equal_nan=True)
            if start + n - 1 < row.numel():
                assert math.isnan(float(row[start + n - 1]))  # no target across the boundary
            start += n


def test_rounding_lengths_up_changes_no_loss_or_gradient():
    # data.pad_to_multiple_of: padded rows get extra padding, a padding-free row a filler segment
    tok = tiny_tokenizer()
    model = _lora_model(tok)
    examples = [random_example(7, 3, 0), random_example(19, 4, 1), random_example(2, 1, 2)]
    ref_loss, ref_n = accumulate_gradients(model, [data.collate(examples, tok.pad_token_id)], "cpu")
    ref = _grads(model)
    padded = data.collate(examples, tok.pad_token_id, multiple_of=16)
    free = data.collate_padding_free(examples, multiple_of=16, pad_id=tok.pad_token_id)
    assert padded["input_ids"].shape == (3, 32) and free["input_ids"].shape == (1, 32)
    assert free["position_ids"][0, 28:].tolist() == [0, 1, 2, 3]  # the filler is a segment of its own
    assert (free["labels"][0, 28:] == IGNORE_INDEX).all() and (free["input_ids"][0, 28:] == tok.pad_token_id).all()
    for batch in (padded, free):
        model.zero_grad()
        loss, n = accumulate_gradients(model, [batch], "cpu")
        assert n == ref_n and loss == pytest.approx(ref_loss, abs=1e-5)
        for name, grad in _grads(model).items():
            torch.testing.assert_close(grad, ref[name], atol=1e-5, rtol=1e-4)


def test_padding_free_training_matches_padded(tmp_path, tiny_dir):
    # the whole loop: the same seed gives the same losses with padding-free rows as with padded ones
    rows = ROWS * 2
    runs = {}
    for padding_free in (True, False):
        (tmp_path / str(padding_free)).mkdir()
        r = _tiny_recipe(tmp_path / str(padding_free), tiny_dir, rows, micro_batch_size=3)
        r.data.padding_free = padding_free
        runs[padding_free] = train(r)
    free, padded = runs[True], runs[False]
    losses = lambda r: [e["loss"] for e in read_events(r.run_dir / "metrics.jsonl") if e.get("event") == "train"]  # noqa: E731
    assert len(losses(free)) == 3
    assert losses(free) == pytest.approx(losses(padded), abs=1e-5)
    assert free.summary["eval_loss"] == pytest.approx(padded.summary["eval_loss"], abs=1e-5)


def test_supervised_loss_equals_hf_shifted_loss():
    # reference: transformers' own causal-LM loss (mean over shifted labels != -100)
    tok = tiny_tokenizer()
    model = _lora_model(tok).eval()
    batch = data.collate([random_example(9, 3, 5), random_example(6, 1, 6)], tok.pad_token_id)
    with torch.no_grad():
        s, n = supervised_loss_sum(model, batch)
        ref = model(**batch).loss
    assert float(s) / n == pytest.approx(float(ref), abs=1e-5)


def _tiny_recipe(tmp_path, tiny_dir, rows, method=None, **train):
    """6 steps, eval on the train rows every 3 steps, checkpoints every 3, logs every 2."""
    t = {"max_steps": 6, "log_every": 2, "eval_every": 3, "save_every": 3, "warmup_steps": 0, **train}
    return tiny_run_recipe(tmp_path, tiny_dir, method or {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                           rows, eval_rows=True, max_seq_len=200, **t)


# LoRA on the output head too: a random tiny Llama (init std 0.02) cannot move its logits far enough
# through the body alone to overfit.
ALL_LINEAR = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
              "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]}
ROWS = [{"instruction": "Sort the numbers.", "input": f"{a}, {b}", "output": f"{min(a, b)}, {max(a, b)}"}
        for a, b in [(3, 1), (7, 2), (5, 9), (4, 8), (6, 0), (2, 2)]]


def test_train_writes_the_run_dir(tmp_path, tiny_dir):
    result = train(_tiny_recipe(tmp_path, tiny_dir, ROWS))
    run = tmp_path / "run"
    for name in ("recipe.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "metrics.jsonl", "summary.json", "loss.png", "checkpoints/step-3/adapter/adapter_model.safetensors",
                 "checkpoints/step-3/optimizer.pt", "checkpoints/step-3/scheduler.pt", "checkpoints/step-3/rng.pt",
                 "checkpoints/step-3/state.json"):
        assert (run / name).is_file(), name
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps == [2, 4, 6]
    assert [e["step"] for e in events if e["event"] == "eval"] == [3, 6]
    assert all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in events if e["event"] == "train")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["trainable_params"] == result.summary["trainable_params"]
    assert summary["device"] == "cpu" and summary["cuda_peak_memory_gib"] is None  # the GPU's peak: on CUDA only
    # resolved recipe: every default filled and it validates again to the same recipe
    resolved = recipe.load_recipe(run / "recipe.yaml")
    assert resolved.train.scheduler == "cosine" and resolved.method.target_modules == ["q_proj", "v_proj"]
    # 2 layers x (q, v) x (A: 4x64 + B: 64x4 for q; B: 64... v has 2 kv heads x 16 = 32 outputs)
    assert summary["trainable_params"] == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))


def test_train_loss_decreases(tmp_path, tiny_dir):
    result = train(_tiny_recipe(tmp_path, tiny_dir, ROWS, ALL_LINEAR, max_steps=30, lr=5e-3, log_every=5, eval_every=0, save_every=0))
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert losses[-1] < 0.5 * losses[0]


def test_C7_overfit_one_example_generation_stops(tmp_path, tiny_dir):
    # pad == eos in the tiny tokenizer: EOS must still be supervised, so the model learns to stop
    from peftcli.evaluate import generate

    row = {"instruction": "Say hi.", "input": "", "output": "hello world"}
    result = train(_tiny_recipe(tmp_path, tiny_dir, [row], ALL_LINEAR, max_steps=50, micro_batch_size=1, lr=5e-3,
                                log_every=10, eval_every=0, save_every=0, scheduler="constant"))
    tok = result.tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    prompt = data.render_prompt(row, "alpaca", tok)
    prompt_ids = tok(prompt).input_ids
    out = result.model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=20, do_sample=False,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, len(prompt_ids):].tolist()
    assert tok.eos_token_id in new and len(new) < 20  # it stopped on its own
    assert generate(result.model, tok, [prompt], 20)[0].strip() == "hello world"


def test_C10_training_drops_rows_with_nothing_to_learn(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    rows = [{"instruction": "Count.", "input": "", "output": ""},                      # empty answer
            {"instruction": "the quick brown fox " * 60, "input": "", "output": "yes"},  # prompt > max_seq_len
            ROWS[0]]
    result = train(_tiny_recipe(tmp_path, tiny_dir, rows, max_steps=3, log_every=1, eval_every=0, save_every=0))
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = next(e for e in events if e["event"] == "data")["train"]
    assert (counts["rows"], counts["kept"], counts["dropped_empty_answer"], counts["dropped_truncated"]) == (3, 1, 1, 1)
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    weights = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_C11_no_pad_token_train_and_reload(tmp_path):
    from tiny import save_tiny

    from peftcli import artifacts

    model_dir = save_tiny(tmp_path / "nopad", pad=None)
    result = train(_tiny_recipe(tmp_path, model_dir, ROWS, max_steps=2, eval_every=0, save_every=0))
    tok = result.tokenizer
    rows = result.model.get_input_embeddings().num_embeddings
    assert tok.pad_token_id == tok.eos_token_id and len(tok) == rows == 320  # no token added, no resize
    assert all(max(e["input_ids"]) < rows for e in result.datasets.train)
    reloaded = artifacts.load_adapted(result.run_dir).model
    assert reloaded.get_input_embeddings().num_embeddings == rows
    batch = data.collate(result.datasets.train[:3], tok.pad_token_id)
    with torch.no_grad():
        a = result.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)


def test_resume_from_checkpoint_gives_the_same_adapter(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    recipe = _tiny_recipe(tmp_path, tiny_dir, ROWS, ALL_LINEAR, max_steps=6, save_every=3, eval_every=0)
    train(recipe)
    full = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    # resume replays steps 4..6 from checkpoints/step-3 (adapter, AdamW moments, schedule, RNG, data position)
    result = train(recipe, resume=True)
    resumed = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    steps = [e["step"] for e in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == "train"]
    assert steps == [2, 4, 6]  # events after the checkpoint were dropped, then logged again by the resumed run


def test_fresh_run_replaces_an_earlier_run(tmp_path, tiny_dir):
    recipe = _tiny_recipe(tmp_path, tiny_dir, ROWS, max_steps=6, save_every=3, eval_every=0)
    train(recipe)
    again = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": 2, "save_every": 0})})
    with pytest.raises(UserError, match=r"holds an earlier run \(2 checkpoints up to checkpoints/step-6 and adapter/\)"):
        train(again)
    result = train(again, overwrite=True)
    assert not (result.run_dir / "checkpoints").exists()  # no stale checkpoint to --resume from
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [2]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("order", ["before", "after"])
def test_C6_gradient_checkpointing_with_a_frozen_base(order, reentrant):
    from peftcli.prepare import enable_gradient_checkpointing

    tok = tiny_tokenizer()
    batch = data.collate([random_example(9, 3, 7), random_example(14, 5, 8)], tok.pad_token_id)

    def run(checkpointing):
        model = tiny_llama(tok, seed=0)
        cfg = lora.Config(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
        if checkpointing and order == "before":
            enable_gradient_checkpointing(model, reentrant)
        torch.manual_seed(1)
        lora.apply(model, cfg)
        if checkpointing and order == "after":
            enable_gradient_checkpointing(model, reentrant)
        model.train()
        assert model.is_gradient_checkpointing == checkpointing
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(5):
            loss_sum, n = supervised_loss_sum(model, batch)
            assert loss_sum.requires_grad
            (loss_sum / n).backward()
            if step == 0:
                grads = [layer.lora_B.weight.grad for layer in lora.lora_layers(model).values()]
                assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
            opt.step()
            opt.zero_grad()
            losses.append(float(loss_sum.detach()) / n)
        return losses

    reference = run(False)
    assert run(True) == pytest.approx(reference, abs=1e-6)  # fp32: the same loss curve


def test_report_to_tensorboard_logs_the_same_numbers(tmp_path, tiny_dir):
    # read back with tensorboard's own reader: the scalars are metrics.jsonl's values at the same steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = _tiny_recipe(tmp_path, tiny_dir, ROWS, report_to=["tensorboard"])
    result = train(r)
    events = read_events(result.run_dir / "metrics.jsonl")
    files = list((result.run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(files[0].parent)).Reload()
    train_loss = [(s.step, s.value) for s in acc.Scalars("train/loss")]
    expected = [(e["step"], e["loss"]) for e in events if e.get("event") == "train"]
    assert [s for s, _ in train_loss] == [s for s, _ in expected] == [2, 4, 6]
    assert [v for _, v in train_loss] == pytest.approx([v for _, v in expected], rel=1e-6)
    eval_loss = [(s.step, s.value) for s in acc.Scalars("eval/eval_loss")]
    assert eval_loss == [(e["step"], pytest.approx(e["eval_loss"], rel=1e-6)) for e in events if e.get("event") == "eval"]


# a stand-in for the wandb package: records what accelerate's WandBTracker hands it
STUB_WANDB = """
import json, os
config = type("Config", (), {"update": lambda self, values, **kw: None})()
class _Run:
    def log(self, values, step=None, **kw):
        with open(os.environ["STUB_WANDB_LOG"], "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\\n")
    def finish(self):
        with open(os.environ["STUB_WANDB_LOG"], "a") as f:
            f.write(json.dumps({"finished": True}) + "\\n")
def init(project=None, dir=None, name=None, **kw):
    with open(os.environ["STUB_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"init": project, "dir": dir, "name": name}) + "\\n")
    return _Run()
"""


def test_report_to_passes_any_accelerate_tracker(tmp_path, tiny_dir, monkeypatch):
    """train.report_to: [wandb] reaches accelerate's own WandBTracker (here with a stand-in
    wandb package): every train event's loss, lr and grad_norm and every eval loss arrive at
    their steps, equal to metrics.jsonl's."""
    import sys

    pkg = tmp_path / "site" / "wandb"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(STUB_WANDB)
    (tmp_path / "site" / "wandb-0.0.1.dist-info").mkdir()
    (tmp_path / "site" / "wandb-0.0.1.dist-info" / "METADATA").write_text("Name: wandb\nVersion: 0.0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("STUB_WANDB_LOG", str(tmp_path / "wandb.jsonl"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    import accelerate.tracking
    from accelerate.utils import LoggerType

    # accelerate lists the installed trackers once, when it is imported: add the stand-in
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [*accelerate.tracking._available_trackers, LoggerType.WANDB])
    result = train(_tiny_recipe(tmp_path, tiny_dir, ROWS, report_to=["wandb"]))
    logged = [json.loads(line) for line in (tmp_path / "wandb.jsonl").read_text().splitlines()]
    assert logged[0] == {"init": "peftcli", "dir": str(result.run_dir), "name": result.run_dir.name}
    assert logged[-1] == {"finished": True}
    events = read_events(result.run_dir / "metrics.jsonl")
    trains = [e for e in events if e["event"] == "train"]
    got = {e["step"]: e for e in logged[1:-1] if "train/loss" in e}
    assert sorted(got) == [e["step"] for e in trains] == [2, 4, 6]
    for e in trains:
        for key in ("loss", "lr", "grad_norm"):
            assert got[e["step"]][f"train/{key}"] == pytest.approx(e[key], rel=1e-6), key
    evals = {e["step"]: e["eval/eval_loss"] for e in logged if "eval/eval_loss" in e}
    assert evals == {e["step"]: pytest.approx(e["eval_loss"], rel=1e-6) for e in events if e["event"] == "eval"}


def test_report_to_a_tracker_not_installed_is_one_line(tmp_path, tiny_dir, capsys):
    """accelerate drops a tracker whose package is missing without a word; peft stops, exit 2,
    before anything is written."""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(recipe.dump(_tiny_recipe(tmp_path, tiny_dir, ROWS, report_to=["mlflow"])))
    code, err = peft_in_process(["train", str(recipe_file)], capsys)
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "train.report_to: mlflow needs its Python package" in err, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_the_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    from peftcli.recipe import TRACKERS

    assert sorted(TRACKERS) == sorted(x.value for x in LoggerType if x.value != "all")


@pytest.mark.parametrize("schedule,hf_name", [("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")])
def test_lr_schedule_equals_transformers(schedule, hf_name):
    """Our schedules give transformers' get_scheduler learning rates at every step (the reference)."""
    from transformers import get_scheduler

    from peftcli.trainer import make_scheduler

    r = recipe.validate({"method": {"name": "lora"}, "data": {"train": {"path": "unused.jsonl"}},
                         "train": {"scheduler": schedule, "warmup_steps": 3, "lr": 0.1}})
    ours_opt, ref_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1) for _ in range(2))
    ours, ref = make_scheduler(ours_opt, r, 20), get_scheduler(hf_name, ref_opt, num_warmup_steps=3, num_training_steps=20)
    seen = []
    for _ in range(22):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        seen.append(ours.get_last_lr()[0])
        for opt, sched in ((ours_opt, ours), (ref_opt, ref)):
            opt.step()
            sched.step()
    assert seen[0] == 0.0 and seen[3] == pytest.approx(0.1)  # warmup from 0 to the peak
    assert (seen[20] == pytest.approx(0.0)) == (schedule != "constant")


def test_optimizer_is_adamw_by_hand():
    """make_optimizer's steps equal AdamW computed by hand in float64 (Loshchilov & Hutter 2019,
    Algorithm 2: decoupled decay, bias-corrected moments), over tensors of several shapes."""
    from peftcli.trainer import make_optimizer

    r = recipe.validate({"method": {"name": "lora"}, "data": {"train": {"path": "unused.jsonl"}},
                         "train": {"lr": 0.01, "weight_decay": 0.1}})
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (5,), (2, 2, 2)]]
    ref = [p.detach().double().clone() for p in params]
    m, v = [torch.zeros_like(p) for p in ref], [torch.zeros_like(p) for p in ref]
    opt = make_optimizer(params, r)
    assert opt.defaults["fused"]  # the fused kernel on CPU
    lr, wd, (b1, b2), eps = 0.01, 0.1, (0.9, 0.999), 1e-8
    for t in range(1, 5):
        grads = [torch.randn(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            g = g.double()
            ref[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            ref[i] -= lr * (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
    for p, want in zip(params, ref):
        assert (p.detach().double() - want).abs().max() < 1e-6


@pytest.mark.parametrize("n", [5, 300, 600])
def test_chunked_head_cross_entropy_equals_the_full_logits_formula(n):
    """Loss and gradient of h: the block-wise pass (gradient formed in the forward) against autograd
    on the full (n, vocab) logits; n spans one block, a block and a bit, and several blocks."""
    from peftcli.loss import LOSS_CHUNK, head_cross_entropy

    assert n < LOSS_CHUNK or n > LOSS_CHUNK
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).double().requires_grad_(False)
    h = torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (n,), generator=g)
    loss = head_cross_entropy(head, h, targets)
    loss.backward(torch.tensor(0.5, dtype=torch.float64))
    ref_h = h.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(head(ref_h), targets, reduction="sum")
    (0.5 * ref).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)  # float32 accumulation
    torch.testing.assert_close(h.grad, ref_h.grad, atol=1e-6, rtol=1e-5)  # the softmax is float32 in both tools
    with torch.no_grad():  # evaluation: chunked, no gradient pass
        assert head_cross_entropy(head, h, targets).item() == pytest.approx(ref.item(), rel=1e-6)


def test_chunked_head_cross_entropy_under_autocast_is_autocasts_own_arithmetic():
    """Under bf16 autocast the block-wise head casts the float32 head once per call; the reference
    is the per-block formula where autocast casts the head at every matmul: bit for bit equal."""
    from peftcli.loss import LOSS_CHUNK, head_cross_entropy

    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    n = LOSS_CHUNK + 44
    h = torch.randn(n, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (n,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_cross_entropy(head, h, targets)
        ref_loss, ref_grad = torch.zeros(()), torch.empty_like(h)
        for start in range(0, n, LOSS_CHUNK):
            hc, tc = h.detach()[start:start + LOSS_CHUNK], targets[start:start + LOSS_CHUNK]
            logits = torch.nn.functional.linear(hc, head.weight)  # autocast casts both to bf16
            logp = torch.log_softmax(logits.float(), dim=-1)
            ref_loss += -logp.gather(1, tc[:, None]).sum()
            grad = logp.exp()
            grad[torch.arange(len(tc)), tc] -= 1.0
            ref_grad[start:start + LOSS_CHUNK] = (grad.to(torch.bfloat16) @ head.weight.to(torch.bfloat16)).float()
    loss.backward()
    assert torch.equal(loss.detach(), ref_loss) and torch.equal(h.grad, ref_grad)


def test_C20_a_bad_run_leaves_the_earlier_run_untouched(tmp_path, tiny_dir):
    """CASES C20: a new run into a run dir, --overwrite given, whose data turns out to be bad:
    every file of the earlier run (its recipe, adapter, checkpoint, metrics) is byte-identical."""
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora"}, max_steps=2)
    recipe.train.save_every = 1
    train(recipe)
    run = tmp_path / "run"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert Path("adapter/adapter_model.safetensors") in before and Path("checkpoints/step-2/optimizer.pt") in before
    bad = recipe.model_copy(deep=True)
    bad.data.train.path = str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="missing.jsonl: data file not found"):
        train(bad, overwrite=True)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before




def test_grad_norm_is_logged_and_equals_the_models_own_gradient_norm(tmp_path, tiny_dir):
    """metrics.jsonl's grad_norm (issue 17, item 6) is the L2 norm of every trainable gradient of
    the step, before clipping: here recomputed with the model's own forward and loss on the
    step's examples as one padded batch (the step's mean over supervised tokens)."""
    from peftcli import prepare
    from peftcli.trainer import seed_everything

    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora", "r": 4, "dropout": 0.0}, max_steps=1,
                             micro_batch_size=4, max_grad_norm=1e-3)  # clipping on: the norm logged is the one before it
    train(recipe.model_copy(deep=True))
    logged = [e for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["event"] == "train"][0]["grad_norm"]
    seed_everything(recipe.train.seed)
    p = prepare.load(recipe.model_copy(deep=True))  # the same initialisation: seeded as the run was
    batch = data.collate(p.datasets.train, p.tokenizer.pad_token_id)
    p.model(**batch).loss.backward()  # HF's own mean cross-entropy over the unmasked labels
    grads = [q.grad.flatten() for q in p.model.parameters() if q.requires_grad and q.grad is not None]
    expected = float(torch.linalg.vector_norm(torch.cat(grads)))
    assert expected > 1e-3 and logged == pytest.approx(expected, rel=1e-4)


def test_the_progress_bar_shows_no_nan_before_the_first_log_line(tmp_path, tiny_dir):
    """On a terminal the bar shows "loss -" until the first logged loss, lr, tokens/s and the time
    left from the first step, never "loss nan  0 tok/s" (issue 17, item 5). The bar is drawn at
    every step, so step 1's drawing (before the first log line) is in the output; a logged loss
    is drawn with its own step (never beside the step before), and each log line stays printed
    above the bar."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora"}, max_steps=4, log_every=2)
    train(recipe, console=Console(file=buf, force_terminal=True, color_system=None, width=200))
    shown = buf.getvalue()
    assert "nan" not in shown and " 0 tok/s" not in shown, shown[-2000:]
    assert re.search(r"loss \d+\.\d{4}  lr \d\.\d\de-\d\d  [1-9]\d* tok/s", shown), shown[-2000:]
    assert re.search(r"step 1/4 .*loss -  lr \d\.\d\de-\d\d  [1-9]\d* tok/s .*left \d:\d\d:\d\d", shown), shown[-2000:]
    frames = re.findall(r"step (\d)/4 \S+ loss (\S+)", shown)  # each drawing of the bar: (step, loss shown)
    assert frames and all((loss == "-") == (int(n) < 2) for n, loss in frames), frames
    for e in (e for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["event"] == "train"):
        assert f"step {e['step']}/4  loss {e['loss']:.4f}  lr {e['lr']:.2e}" in shown, shown[-2000:]  # the log lines stay
