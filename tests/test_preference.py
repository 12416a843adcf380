"""Preference tuning (peftcli.preference, peftcli.methods.off, format: preference).

References: the plain base's own forward (the method switched off), TRL's DPO and ORPO losses
on the same batch and weights (test_trl_*), the model's own logits (the blockwise head), and
label masks written out by hand from the tokenizer's pieces.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import logits, peft_in_process, perturb, write_jsonl, write_recipe
from tiny import tiny_llama
from zoo import VARIANTS

from peftcli import methods, models, preference, tokens
from peftcli.data import IGNORE_INDEX, tokenize_row, tokenize_rows
from peftcli.methods.off import switched_off
from peftcli.preference import PreferenceLoss, collate_pairs, sequence_logps

PAIRS = [
    {"prompt": "add the numbers 1 2\n", "chosen": "3", "rejected": "1 2"},
    {"prompt": "sort the letters b a\n", "chosen": "a b", "rejected": "b a b a"},
    {"prompt": [{"role": "user", "content": "reverse the word dog"}], "chosen": "god",
     "rejected": {"role": "assistant", "content": "dog dog"}},
]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def pair_examples(tok, rows=PAIRS, max_seq_len=128):
    return [tokenize_row(checked(r), "preference", tok, max_seq_len, False) for r in rows]


def checked(row):
    """A row as load_rows normalises it (chosen / rejected as text, prompt messages mapped)."""
    from peftcli.data import _check_row

    row = copy.deepcopy(row)
    _check_row(row, "preference", "row")
    return row


# ---------------------------------------------------------------------------------------------
# data: masking by hand


def test_text_prompt_pair_masks_the_prompt(tok):
    special = tokens.special_tokens(tok)
    eos = tok.eos_token_id
    e = tokenize_row(checked(PAIRS[0]), "preference", tok, 128, False)
    # as the completion format renders it: the tokenizer's prefix (here none: it adds no BOS), no EOS
    prompt = list(special.prefix_ids) + ids(tok, "add the numbers 1 2\n")
    assert e["input_ids"] == prompt + ids(tok, "3") + [eos]
    assert e["labels"] == [IGNORE_INDEX] * len(prompt) + ids(tok, "3") + [eos]
    assert e["rejected_input_ids"] == prompt + ids(tok, "1 2") + [eos]
    assert e["rejected_labels"] == [IGNORE_INDEX] * len(prompt) + ids(tok, "1 2") + [eos]


def test_chat_prompt_pair_supervises_the_reply_and_its_end_of_turn(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    e = tokenize_row(checked(PAIRS[2]), "preference", tok, 128, False)
    # ChatML written out by hand: the prompt with the generation prompt, then the reply and <|im_end|>
    prompt = ids(tok, "<|im_start|>user\nreverse the word dog<|im_end|>\n<|im_start|>assistant\n")
    assert e["input_ids"] == prompt + ids(tok, "god") + [im_end]
    assert e["labels"] == [IGNORE_INDEX] * len(prompt) + ids(tok, "god") + [im_end]
    assert e["rejected_input_ids"] == prompt + ids(tok, "dog dog") + [im_end]
    assert e["rejected_labels"][:len(prompt)] == [IGNORE_INDEX] * len(prompt)


def test_cut_and_dropped_pairs_are_counted(tok):
    rows = [checked(PAIRS[0]), checked({"prompt": "x " * 40, "chosen": "3", "rejected": "4"}),
            checked({"prompt": "add the numbers 1 2\n", "chosen": "the quick brown fox jumps over the lazy dog",
                     "rejected": " "})]
    prompt_len = len(tokens.special_tokens(tok).prefix_ids) + len(ids(tok, "add the numbers 1 2\n"))
    examples, stats = tokenize_rows(rows, "preference", tok, prompt_len + 2, False, "pairs")
    # row 1: its rejected reply "1 2" + EOS is 3+ tokens: cut; row 2: prompt over max_seq_len; row 3: empty rejected
    assert stats.rows == 3 and stats.kept == 1 and stats.truncated == 1
    assert stats.dropped == {"empty_answer": 1, "prompt_over_max_seq_len": 1}
    (e,) = examples
    assert len(e["input_ids"]) <= prompt_len + 2 and len(e["rejected_input_ids"]) == prompt_len + 2
    assert e["rejected_input_ids"][:prompt_len] == e["input_ids"][:prompt_len]


def test_collate_pairs_puts_chosen_rows_first(tok):
    examples = pair_examples(tok, [checked(r) for r in PAIRS[:2]])
    batch = collate_pairs(examples, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    for b, e in enumerate(examples):
        n, m = len(e["input_ids"]), len(e["rejected_input_ids"])
        assert batch["input_ids"][b, :n].tolist() == e["input_ids"]
        assert batch["input_ids"][2 + b, :m].tolist() == e["rejected_input_ids"]
        assert batch["labels"][2 + b, m:].eq(IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------------
# the method switched off = the plain base


def _apply(model, cfg: dict, tok):
    method = methods.get(cfg["name"])
    method.apply(model, methods.METHOD_CONFIGS[cfg["name"]](**cfg), tokenizer=tok)
    return model


OFF_VARIANTS = {**{k: v.method for k, v in VARIANTS.items()},
                "pissa": {**VARIANTS["lora"].method, "init": "pissa"}}


@pytest.mark.parametrize("variant", sorted(OFF_VARIANTS))
def test_switched_off_is_the_base_forward(variant, tok, tiny_dir):
    cfg = OFF_VARIANTS[variant]
    if variant == "qlora":  # a 4-bit base, loaded twice the same way
        base = models.load_model(str(tiny_dir), "nf4", "float32", True, False).eval()
        adapted = models.load_model(str(tiny_dir), "nf4", "float32", True, False).eval()
    else:
        base = tiny_llama(tok)
        adapted = copy.deepcopy(base)
    _apply(adapted, cfg, tok).eval()
    perturb(adapted, seed=3, scale=0.3)  # as if trained: the method changes the output
    ids_ = torch.tensor([[1, 20, 31, 42, 53, 64], [1, 70, 81, 92, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    plain, on = logits(base, ids_, mask), logits(adapted, ids_, mask)
    assert (on - plain)[mask.bool()].abs().max() > 1e-3  # the method is on the forward's way
    with switched_off(adapted):
        off = logits(adapted, ids_, mask)
    torch.testing.assert_close(off[mask.bool()], plain[mask.bool()], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logits(adapted, ids_, mask), on)  # on again after the block


# ---------------------------------------------------------------------------------------------
# the loss path: blockwise head = the model's own logits, values and gradients


def _lora_model(tok, seed=0):
    model = _apply(tiny_llama(tok, seed=seed), {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                                "target_modules": "all-linear"}, tok)
    perturb(model, names=["lora_B"], seed=5, scale=0.05)
    return model


def test_sequence_logps_blockwise_equals_own_logits(tok, monkeypatch):
    monkeypatch.setattr("peftcli.loss.LOSS_CHUNK", 3)  # several blocks
    model = _lora_model(tok)
    batch = collate_pairs(pair_examples(tok, [checked(r) for r in PAIRS]), tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    fast, n = sequence_logps(model, batch)
    grads_fast = torch.autograd.grad((fast * torch.arange(1.0, 7.0)).sum(), params)
    own, n_own = sequence_logps(model, batch, own_forward=True)
    grads_own = torch.autograd.grad((own * torch.arange(1.0, 7.0)).sum(), params)
    assert torch.equal(n, n_own) and n.tolist() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
    torch.testing.assert_close(fast, own, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_own):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_grad_accum_gives_the_same_step(objective, tok):
    # one micro-batch of 3 pairs vs micro-batches of 2 + 1: the same loss and gradients (mean over the step's pairs)
    examples = pair_examples(tok, [checked(r) for r in PAIRS])
    results = []
    for split in ([examples], [examples[:2], examples[2:]]):
        model = _lora_model(tok)
        loss_fn = PreferenceLoss(model, objective, beta=0.5, orpo_lambda=0.3)
        totals = preference.accumulate(loss_fn, [collate_pairs(mb, tok.pad_token_id) for mb in split], "cpu")
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((totals.mean_loss(objective), grads, totals.pairs))
    (l1, g1, n1), (l2, g2, n2) = results
    assert n1 == n2 == 3 and l1 == pytest.approx(l2, abs=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_dpo_and_orpo_by_hand():
    # hand computation on sequence log-probabilities
    c, r, rc, rr = torch.tensor([-2.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-4.0])
    losses, r_c, r_r = preference.dpo_loss(c, r, rc, rr, beta=0.5)
    z = 0.5 * ((-2 + 3) - (-5 + 4))  # β((π_c − ref_c) − (π_r − ref_r)) = 1
    assert losses.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(z)).item())
    assert (r_c.item(), r_r.item()) == (0.5, -0.5)
    mc, mr = torch.tensor([-0.5]), torch.tensor([-1.5])
    pc, pr = torch.exp(mc), torch.exp(mr)
    log_or = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    assert preference.orpo_log_odds(mc, mr).item() == pytest.approx(log_or.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# recipe errors: one line, exit 2, before the model loads


def _recipe(tmp_path, fmt, objective, rows=PAIRS, model=None):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return write_recipe(tmp_path / "r.yaml", {
        "model": {"name_or_path": str(model or tmp_path / "no-model")}, "method": {"name": "lora"},
        "data": {"train": {"path": str(data), "format": fmt}}, "train": {"objective": objective},
        "output": {"dir": str(tmp_path / "run")}})


@pytest.mark.parametrize("fmt, objective, says", [
    ("preference", "sft", "train.objective: format preference rows (prompt, chosen, rejected) need train.objective dpo or orpo"),
    ("completion", "dpo", "train.objective: dpo trains on format preference rows"),
    ("alpaca", "orpo", "train.objective: orpo trains on format preference rows"),
])
def test_format_and_objective_must_match(fmt, objective, says, tmp_path, capsys):
    code, err = peft_in_process(["train", _recipe(tmp_path, fmt, objective)], capsys)
    assert code == 2 and says in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_neftune_with_a_preference_objective_is_one_line(objective, tmp_path, capsys):
    recipe = _recipe(tmp_path, "preference", objective)
    code, err = peft_in_process(["train", recipe, "--set", "train.neftune_alpha=5"], capsys)
    assert code == 2 and f"train.neftune_alpha: NEFTune noises the sft forward; with {objective}" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_preference_row_is_one_line(tmp_path, tiny_dir, capsys):
    rows = [{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
             "rejected": "c"}]
    # the data is read (and refused) before the model loads: peft validate's setup path
    code, err = peft_in_process(["validate", _recipe(tmp_path, "preference", "dpo", rows, tiny_dir)], capsys)
    assert code == 2 and "field 'chosen' must be text or one assistant message" in err
    assert len(err.strip().splitlines()) == 1


def test_validate_steps_on_the_longest_pairs(tmp_path, tiny_dir, capsys):
    # peft validate's dry step runs the preference loss (DPO's reference forward too) on the longest pairs
    code, err = peft_in_process(["validate", _recipe(tmp_path, "preference", "dpo", model=tiny_dir)], capsys)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# a tiny run: the rewards in metrics.jsonl, the held-out preference eval


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_tiny_preference_run_logs_rewards(objective, tmp_path, tiny_dir):
    from peftcli.recipe import validate
    from peftcli.trainer import train

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    source = {"path": str(data), "format": "preference"}
    recipe = validate({
        "model": {"name_or_path": str(tiny_dir), "dtype": "float32"}, "method": {"name": "lora", "r": 4},
        "data": {"train": source, "eval": source, "max_seq_len": 64},
        "train": {"objective": objective, "max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2,
                  "log_every": 1, "eval_every": 2, "save_every": 0, "mixed_precision": "no"},
        "output": {"dir": str(tmp_path / "run")}})
    result = train(recipe)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train"]
    assert len(steps) == 3 and all(k in steps[0] for k in preference.METRICS)
    first = steps[0]
    assert first["rewards/margins"] == pytest.approx(first["rewards/chosen"] - first["rewards/rejected"], abs=1e-6)
    if objective == "dpo":  # LoRA starts as the identity: policy = reference, every reward 0, the loss log 2
        assert first["loss"] == pytest.approx(0.693147, abs=1e-5) and first["rewards/chosen"] == 0.0
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 3] and evals[0]["eval_pairs"] == 3
    assert 0.0 <= evals[-1]["eval_accuracy"] <= 1.0 and result.summary["objective"] == objective
    # peft eval on the run: the pairs' metrics for the base and the adapted model; the base's DPO rewards are 0
    from peftcli.evaluate import evaluate

    scored = evaluate(str(result.run_dir), generate_answers=False)
    base, adapted = scored["base"]["preference"], scored["adapted"]["preference"]
    assert base["eval_pairs"] == adapted["eval_pairs"] == 3
    assert adapted["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-4)  # the run's own final eval
    if objective == "dpo":
        assert base["eval_margin"] == 0.0 and base["eval_accuracy"] == 0.0


# ---------------------------------------------------------------------------------------------
# TRL's losses on the same batch and weights (TRL: a test-only reference, like HF peft)

PARITY_METHODS = {"lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
                  "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 3}}


def _parity_setup(tok, method: str):
    """(plain base, adapted model as if trained, pair batch): the base copied before the method is applied."""
    base = tiny_llama(tok, seed=2)
    model = _apply(copy.deepcopy(base), PARITY_METHODS[method], tok).eval()
    perturb(model, seed=7, scale=0.05)
    batch = collate_pairs(pair_examples(tok), tok.pad_token_id)
    return base, model, batch


@pytest.fixture
def fresh_accelerate_state():
    """TRL's Trainer sets accelerate's process-wide state (float32, CPU); reset it after the test so
    another test's run can choose its own mixed precision."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("method", sorted(PARITY_METHODS))
def test_dpo_loss_equals_trl(method, tok, tmp_path, fresh_accelerate_state):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    base, model, batch = _parity_setup(tok, method)
    beta = 0.3
    with torch.no_grad():
        loss, totals = PreferenceLoss(model, "dpo", beta=beta)(batch, pairs_step=3, chosen_tokens_step=0)
    # TRL's DPOTrainer on the same weights: the adapted model, and the plain base as its reference model
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, report_to="none", use_cpu=True, bf16=False, fp16=False)
    trainer = DPOTrainer(model=model, ref_model=base, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE_INDEX).long()}  # TRL's batch: [chosen; rejected]
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = trainer._metrics["eval"]  # the model is in eval mode
    assert abs(float(loss) - float(trl_loss)) < 1e-5
    assert abs(totals.chosen_reward / 3 - metrics["rewards/chosen"][-1]) < 1e-5
    assert abs(totals.rejected_reward / 3 - metrics["rewards/rejected"][-1]) < 1e-5
    assert totals.correct / 3 == pytest.approx(metrics["rewards/accuracies"][-1])


# one-token prompts: TRL's ORPO NLL runs over the whole chosen sequence (prompt included), ours over
# the response (Hong et al. 2024, eq. 6: the reference tokens); with a prompt of one token, which is
# never a target, the two are the same tokens
ONE_TOKEN_PROMPTS = [{"prompt": "x", "chosen": "3", "rejected": "1 2"},
                     {"prompt": "y", "chosen": "a b", "rejected": "b a b a"},
                     {"prompt": "z", "chosen": "the quick dog", "rejected": "dog"}]


@pytest.mark.parametrize("method", sorted(PARITY_METHODS))
def test_orpo_loss_equals_trl(method, tok, tmp_path, fresh_accelerate_state):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    _, model, _ = _parity_setup(tok, method)
    examples = pair_examples(tok, ONE_TOKEN_PROMPTS)
    assert all(e["labels"][0] == IGNORE_INDEX and e["labels"][1] != IGNORE_INDEX for e in examples)
    batch = collate_pairs(examples, tok.pad_token_id)
    lam, half = 0.2, len(examples)
    chosen_tokens = preference.chosen_tokens(batch)
    with torch.no_grad():
        loss, totals = PreferenceLoss(model, "orpo", orpo_lambda=lam)(batch, pairs_step=half, chosen_tokens_step=chosen_tokens)
    args = ORPOConfig(output_dir=str(tmp_path), beta=lam, report_to="none", use_cpu=True, bf16=False, fp16=False)
    trainer = ORPOTrainer(model=model, args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    trl_batch = {}
    for name, rows in (("chosen", slice(0, half)), ("rejected", slice(half, None))):
        trl_batch[f"{name}_input_ids"] = batch["input_ids"][rows]
        trl_batch[f"{name}_attention_mask"] = batch["attention_mask"][rows]
        trl_batch[f"{name}_labels"] = batch["labels"][rows]
    with torch.no_grad():
        trl_loss, metrics = trainer.get_batch_loss_metrics(model, trl_batch, train_eval="eval")
    assert abs(float(loss) - float(trl_loss)) < 1e-5
    assert abs(totals.chosen_reward / half - metrics["eval_rewards/chosen"]) < 1e-5
    assert abs(totals.rejected_reward / half - metrics["eval_rewards/rejected"]) < 1e-5
    assert abs(totals.log_odds / half - metrics["eval_log_odds_chosen"]) < 1e-5
    assert abs(totals.nll_sum / totals.chosen_tokens - metrics["eval_nll_loss"]) < 1e-5


def test_dpo_on_two_processes_equals_one_process_with_double_accumulation(tmp_path, tiny_dir):
    # DDP over gloo (2 CPU processes): each takes every other micro-batch of the step; the pair
    # counts and losses are summed across them, so the step is one process's with grad_accum 2
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from peftcli.rundir import read_events

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 3)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"name_or_path": str(tiny_dir), "dtype": "float32"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": {"path": str(data), "format": "preference"}, "max_seq_len": 64},
        "train": {"objective": "dpo", "max_steps": 3, "micro_batch_size": 2, "lr": 1e-2, "log_every": 1,
                  "eval_every": 0, "save_every": 0, "mixed_precision": "no"},
        "output": {"dir": str(tmp_path / "unused")}})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}

    def train(*args):
        done = subprocess.run([sys.executable, "-m", "peftcli.cli", "train", str(recipe), *args], capture_output=True,
                              text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    two = train("--num-processes", "2", "--output-dir", str(tmp_path / "two"))
    train("--set", "train.grad_accum=2", "--output-dir", str(tmp_path / "one"))
    assert "2 processes" in two.stderr
    a, b = (load_file(tmp_path / run / "adapter/adapter_model.safetensors") for run in ("two", "one"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert any(a[k].abs().max() > 1e-4 for k in a if "lora_B" in k)
    steps = {run: [e for e in read_events(tmp_path / run / "metrics.jsonl") if e.get("event") == "train"] for run in ("two", "one")}
    for key in ("loss", "rewards/margins", "rewards/accuracy"):
        assert [e[key] for e in steps["two"]] == pytest.approx([e[key] for e in steps["one"]], abs=1e-5), key


def test_generate_sends_a_prompt_the_way_the_pairs_gave_theirs(tmp_path, tok):
    # seen in a trial: a DPO run on chat-message prompts was queried with the raw text (no chat
    # template), a format it never trained on
    from peftcli.data import generation_prompt, prompt_ids
    from peftcli.errors import UserError
    from peftcli.recipe import validate

    def recipe_on(rows):
        data = write_jsonl(tmp_path / f"pairs{len(rows)}-{rows[0]['chosen']}.jsonl", rows)
        return validate({"model": {"name_or_path": "smollm2-135m"}, "method": {"name": "lora"},
                         "data": {"train": {"path": str(data), "format": "preference"}}, "train": {"objective": "dpo"}})

    chat_rows = [r for r in PAIRS if isinstance(r["prompt"], list)]
    text_rows = [r for r in PAIRS if isinstance(r["prompt"], str)]
    asked = "reverse the word cat"
    want_chat = tok.apply_chat_template([{"role": "user", "content": asked}], add_generation_prompt=True, tokenize=False)
    assert tok.decode(generation_prompt(asked, recipe_on(chat_rows), tok)) == want_chat
    assert generation_prompt(asked, recipe_on(text_rows), tok) == prompt_ids({"prompt": asked, "completion": ""}, "completion", tok)
    with pytest.raises(UserError, match="both chat and text prompts; pass --raw"):
        generation_prompt(asked, recipe_on(PAIRS), tok)
    assert generation_prompt(asked, recipe_on(PAIRS), tok, raw=True) == asked
