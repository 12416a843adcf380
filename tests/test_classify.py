"""`peft eval --labels`: classification by label likelihood and by greedy answer."""

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from peftcli import data
from peftcli.errors import UserError
from peftcli.evaluate import answer_logprobs, classify, match_label
from peftcli.methods import lora, prompt_tuning

ROWS = [{"instruction": "Is this review positive or negative?", "input": text, "output": label}
        for text, label in [("a charming journey", "positive"), ("labored gags", "negative"),
                            ("rather beautiful", "positive"), ("bleak and desperate", "negative")]]


def test_match_label():
    labels = ["negative", "positive"]
    assert match_label(" Positive.", labels) == "positive"
    assert match_label("negative sentiment", labels) == "negative"
    assert match_label("It is positive", labels) is None  # must start with the label
    assert match_label("positively", labels) is None
    assert match_label("", labels) is None


@pytest.mark.parametrize("fmt,row,key", [("alpaca", ROWS[0], None), ("completion", {"prompt": "p", "completion": "x"}, None),
                                         ("chat", {"messages": [{"role": "user", "content": "q"}]}, None)])
def test_with_answer_sets_the_reference(fmt, row, key):
    assert data.reference(data.with_answer(row, fmt, "negative"), fmt) == "negative"
    assert data.reference(row, fmt) != "negative"  # the row itself is not changed


def _models():
    tok = tiny_tokenizer()
    a = tiny_llama(tok, seed=1)
    lora.apply(a, lora.Config(r=4, alpha=8, target_modules="all-linear"))
    for layer in lora.lora_layers(a).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    b = tiny_llama(tok, seed=2)
    b.config.name_or_path = ""
    prompt_tuning.apply(b, prompt_tuning.Config(num_virtual_tokens=3, init="random"))
    return tok, [a.eval(), b.eval()]


def test_answer_logprobs_equal_a_full_logits_computation():
    tok, models = _models()
    examples = [data.tokenize_row(data.with_answer(r, "alpaca", label), "alpaca", tok, 240, False)
                for r in ROWS for label in ("negative", "positive")]
    for model in models:
        got = answer_logprobs(model, examples, tok.pad_token_id, micro_batch_size=3)
        for e, value in zip(examples, got):  # reference: each example alone, log_softmax over full logits
            ids = torch.tensor([e["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].double(), -1)
            targets = torch.tensor(e["labels"][1:])
            keep = targets != -100
            assert value == pytest.approx(float(logp[keep.nonzero()[:, 0], targets[keep]].sum()), abs=1e-4)


def test_classify_picks_the_likeliest_label_and_parses_greedy_answers():
    tok, models = _models()
    for model in models:
        result = classify(model, tok, ROWS, "alpaca", ["negative", "positive"], max_seq_len=240)
        examples = [data.tokenize_row(data.with_answer(r, "alpaca", label), "alpaca", tok, 240, False)
                    for r in ROWS for label in ("negative", "positive")]
        scores = answer_logprobs(model, examples, tok.pad_token_id)
        picks = ["negative" if scores[2 * i] > scores[2 * i + 1] else "positive" for i in range(len(ROWS))]
        assert result["label_accuracy"] == sum(p == r["output"] for p, r in zip(picks, ROWS)) / len(ROWS)
        assert result["predicted"] == {"negative": picks.count("negative"), "positive": picks.count("positive")}
        # a random tiny model names no label: every greedy answer is unmatched, so none is right
        assert result["unmatched"] == len(ROWS) and result["generation_accuracy"] == 0.0


def test_a_reference_outside_the_labels_is_a_user_error():
    tok, models = _models()
    with pytest.raises(UserError, match="eval row 2: answer 'neutral' is not one of the labels"):
        classify(models[0], tok, [ROWS[0], {**ROWS[1], "output": "neutral"}], "alpaca", ["negative", "positive"])
