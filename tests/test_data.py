"""Data loading, prompt rendering, label masks, collation and batching (peftcli.data).

Reference values are built by hand from the tokenizer's own pieces: the prompt text written out
literally, tokenised on its own, then the answer, then the EOS.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_jsonl
from tiny import tiny_llama, tiny_tokenizer

from peftcli import data
from peftcli.data import IGNORE_INDEX, DataStats, build, collate, load_rows, reference, render_prompt, tokenize_row, tokenize_rows
from peftcli.errors import UserError
from peftcli.models import load_tokenizer
from peftcli.recipe import DataConfig, DataSource

ALPACA_HEAD = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.\n\n")
ALPACA_HEAD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n")


def ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


# ---------------------------------------------------------------------------------------------
# prompts


def test_alpaca_prompt_is_the_stanford_template(tok):
    # Taori et al. 2023 template, written out by hand
    no_input = {"instruction": "sort the letters", "input": "", "output": "x"}
    with_input = {"instruction": "add the numbers", "input": "1 + 2", "output": "3"}
    assert render_prompt(no_input, "alpaca", tok) == ALPACA_HEAD + "### Instruction:\nsort the letters\n\n### Response:\n"
    assert render_prompt(with_input, "alpaca", tok) == (
        ALPACA_HEAD_INPUT + "### Instruction:\nadd the numbers\n\n### Input:\n1 + 2\n\n### Response:\n")
    assert reference(with_input, "alpaca") == "3"
    assert render_prompt({"prompt": "2 + 2 =", "completion": " 4"}, "completion", tok) == "2 + 2 ="
    assert reference({"prompt": "2 + 2 =", "completion": " 4"}, "completion") == " 4"
    assert render_prompt({"text": "hello"}, "text", tok) == ""
    assert reference({"text": "hello"}, "text") is None


# ---------------------------------------------------------------------------------------------
# C7, C8c: label masks and padding


def test_C7_eos_kept_when_pad_is_eos(tok):
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    rows = [{"instruction": "reverse the word", "input": "", "output": "dog"},
            {"instruction": "add the numbers", "input": "1 + 2 + 3", "output": "the answer is 6"}]
    examples = [tokenize_row(r, "alpaca", tok, 512, False) for r in rows]
    # hand computation: prompt ids (masked) + answer ids + EOS
    prompts = [ids(tok, render_prompt(r, "alpaca", tok), special=True) for r in rows]
    answers = [ids(tok, r["output"]) + [eos] for r in rows]
    for e, p, a in zip(examples, prompts, answers):
        assert e["input_ids"] == p + a
        assert e["labels"] == [IGNORE_INDEX] * len(p) + a
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    assert lengths[0] != lengths[1]

    batch = collate(examples, pad_id=tok.pad_token_id)
    T = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, T)
    for b, (p, a, n) in enumerate(zip(prompts, answers, lengths)):
        labels, mask = batch["labels"][b].tolist(), batch["attention_mask"][b].tolist()
        assert mask == [1] * n + [0] * (T - n)
        assert batch["input_ids"][b].tolist() == p + a + [eos] * (T - n)  # the padding is EOS ids too
        assert labels[n - 1] == eos  # the real EOS is learned
        assert labels == [IGNORE_INDEX] * len(p) + a + [IGNORE_INDEX] * (T - n)
        assert IGNORE_INDEX not in labels[len(p):n]  # nothing in the answer span is ignored
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long


@pytest.mark.parametrize("fmt,row,answer", [
    ("alpaca", {"instruction": "count the letters", "input": "hello", "output": "5"}, "5"),
    ("completion", {"prompt": "the quick brown fox", "completion": " jumps over"}, " jumps over"),
])
def test_C8c_prompt_boundary(tok, fmt, row, answer):
    prompt_ids = ids(tok, render_prompt(row, fmt, tok), special=True)
    answer_ids = ids(tok, answer)

    masked = tokenize_row(row, fmt, tok, 512, train_on_prompt=False)
    k = len(prompt_ids)
    assert masked["labels"][:k] == [IGNORE_INDEX] * k  # every prompt position ignored
    assert masked["labels"][k] == answer_ids[0]  # the first response token is supervised
    assert masked["labels"][k:] == answer_ids + [tok.eos_token_id]
    assert masked["input_ids"][k] == answer_ids[0]  # labels unshifted: label i is token i

    full = tokenize_row(row, fmt, tok, 512, train_on_prompt=True)
    assert full["input_ids"] == masked["input_ids"]
    assert full["labels"] == full["input_ids"]  # no -100 at all
    batch = collate([full, tokenize_row(row | {answer_key(fmt): answer + " and more"}, fmt, tok, 512, True)], tok.pad_token_id)
    n = len(full["input_ids"])
    assert IGNORE_INDEX not in batch["labels"][0, :n].tolist()
    assert batch["labels"][0, n:].tolist() == [IGNORE_INDEX] * (batch["labels"].shape[1] - n)


def answer_key(fmt):
    return {"alpaca": "output", "completion": "completion"}[fmt]


def test_text_format_supervises_everything_and_eos(tok):
    e = tokenize_row({"text": "hello world"}, "text", tok, 512, False)
    assert e["input_ids"] == ids(tok, "hello world", special=True) + [tok.eos_token_id]
    assert e["labels"] == e["input_ids"]


def test_truncation_from_the_right(tok):
    row = {"instruction": "reverse the word", "input": "", "output": "the quick brown fox jumps over the lazy dog"}
    full = tokenize_row(row, "alpaca", tok, 512, False)
    k = len(ids(tok, render_prompt(row, "alpaca", tok), special=True))
    cut = tokenize_row(row, "alpaca", tok, k + 3, False)
    assert cut["input_ids"] == full["input_ids"][: k + 3]
    assert cut["labels"] == [IGNORE_INDEX] * k + full["input_ids"][k : k + 3]
    _, stats = tokenize_rows([row, {**row, "output": "x"}], "alpaca", tok, k + 3, False, "rows")
    assert len(ids(tok, "x")) == 1  # "x" + EOS fits: only the first row is cut
    assert (stats.kept, stats.truncated, stats.supervised_tokens) == (2, 1, 3 + 2)


# ---------------------------------------------------------------------------------------------
# chat


CHAT = {"messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "add the numbers 1 2"},
    {"role": "assistant", "content": "3"},
]}


def test_chat_supervises_assistant_turns_only(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # the ChatML rendering cut by hand into (text, supervised) pieces
    pieces = [("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", False),
              ("hi<|im_end|>", True),
              ("\n<|im_start|>user\nadd the numbers 1 2<|im_end|>\n<|im_start|>assistant\n", False),
              ("3<|im_end|>", True),
              ("\n", False)]
    assert tok.apply_chat_template(CHAT["messages"], tokenize=False) == "".join(t for t, _ in pieces)
    want_ids = [i for t, _ in pieces for i in ids(tok, t)]
    want_labels = [i if sup else IGNORE_INDEX for t, sup in pieces for i in ids(tok, t)]

    e = tokenize_row(CHAT, "chat", tok, 512, False)
    assert e["input_ids"] == want_ids
    assert e["labels"] == want_labels
    supervised = [i for i in e["labels"] if i != IGNORE_INDEX]
    assert supervised == ids(tok, "hi") + [im_end] + ids(tok, "3") + [im_end]
    # the assistant header right before each reply is not supervised
    header = ids(tok, "<|im_start|>assistant\n")
    first = len(ids(tok, pieces[0][0]))  # where "hi" starts
    assert e["labels"][first] == ids(tok, "hi")[0]
    assert e["input_ids"][first - len(header):first] == header
    assert e["labels"][first - len(header):first] == [IGNORE_INDEX] * len(header)

    assert render_prompt(CHAT, "chat", tok) == "".join(t for t, _ in pieces[:3])
    assert reference(CHAT, "chat") == "3"
    assert tokenize_row(CHAT, "chat", tok, 512, True)["labels"] == want_ids


def test_chat_without_assistant_text_has_nothing_to_learn(tok):
    row = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " "}]}
    assert tokenize_row(row, "chat", tok, 512, False) is None


# ---------------------------------------------------------------------------------------------
# C10, C11


def test_C10_rows_with_nothing_to_learn(tok, tmp_path):
    normal = {"instruction": "reverse the word", "input": "", "output": "dog"}
    max_len = len(tokenize_row(normal, "alpaca", tok, 10_000, False)["input_ids"]) + 2
    long_prompt = {"instruction": "the quick brown fox " * 40, "input": "", "output": "yes"}
    assert len(ids(tok, render_prompt(long_prompt, "alpaca", tok), special=True)) > max_len
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": "count", "input": "", "output": "  "}, long_prompt, normal])

    got = build(DataConfig(train=DataSource(path=str(path)), max_seq_len=max_len), tok, seed=0)
    assert len(got.train) == 1
    assert got.train[0] == tokenize_row(normal, "alpaca", tok, max_len, False)
    assert got.train_stats == DataStats(rows=3, kept=1, dropped_empty_answer=1, dropped_truncated=1,
                                        supervised_tokens=len(ids(tok, "dog")) + 1, truncated=0, examples=1,
                                        dropped={"empty_answer": 1, "prompt_over_max_seq_len": 1}, max_seq_len=max_len)
    assert got.train_stats.describe() == (f"1 of 3 train rows kept -> 1 example (dropped 1 empty answer, "
                                          f"1 prompt over max_seq_len {max_len})")

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "count", "input": "", "output": ""}, long_prompt])
    with pytest.raises(UserError, match=r"bad\.jsonl: no row has anything to learn \(2 rows: 1 empty answer \(row 1\), "
                                        rf"1 prompt over max_seq_len {max_len} \(row 2\)\)"):
        build(DataConfig(train=DataSource(path=str(bad)), max_seq_len=max_len), tok, seed=0)


def test_C11_tokenizer_without_pad(tmp_path):
    raw = tiny_tokenizer(pad=None)
    assert raw.pad_token_id is None
    raw.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.pad_token_id == tok.eos_token_id  # falls back to EOS: no new token
    assert tok.padding_side == "right"
    model = tiny_llama(tok)
    rows_ = model.get_input_embeddings().num_embeddings
    assert len(tok) == rows_ == 320

    rows = [{"instruction": "add the numbers", "input": "1 2 " * n, "output": "3" * n} for n in range(1, 8)]
    examples, stats = tokenize_rows(rows, "alpaca", tok, 512, False, "rows")
    assert stats.kept == 7
    for idx in data.batches(examples, 3, seed=0, epoch=0):
        batch = collate([examples[i] for i in idx], tok.pad_token_id)
        assert int(batch["input_ids"].max()) < rows_
        assert int(batch["labels"].max()) < rows_
        with torch.no_grad():  # and the model really takes the batch
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


# ---------------------------------------------------------------------------------------------
# loading


ROWS = [{"instruction": "reverse the word", "input": "dog", "output": "god"},
        {"instruction": "add the numbers", "input": "1, 2", "output": "3"}]


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + '\n{"instruction": "x", "output": \n')
    with pytest.raises(UserError, match=r"file\.jsonl:3: malformed JSON"):
        load_rows(DataSource(path=str(path)))
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(UserError, match=r"file\.jsonl:2: expected a JSON object"):
        load_rows(DataSource(path=str(path)))


def test_missing_field_names_field_and_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    # a blank line: row 2 is on line 3
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"instruction": "x", "input": ""}) + "\n")
    with pytest.raises(UserError, match=r"rows\.jsonl:3 \(row 2\): missing field 'output' for format alpaca"):
        load_rows(DataSource(path=str(path)))
    with pytest.raises(UserError, match=r"rows\.jsonl:1 \(row 1\): missing field 'messages' for format chat"):
        load_rows(DataSource(path=str(path), format="chat"))
    write_jsonl(path, [{"messages": [{"role": "user"}]}])
    with pytest.raises(UserError, match=r"row 1\): messages\[0\] needs a 'role' and a 'content'"):
        load_rows(DataSource(path=str(path), format="chat"))


def test_missing_empty_and_undecodable_files(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: data file not found"):
        load_rows(DataSource(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=r"empty\.jsonl: no rows"):
        load_rows(DataSource(path=str(tmp_path / "empty.jsonl")))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match=r"empty\.csv: no rows"):
        load_rows(DataSource(path=str(tmp_path / "empty.csv")))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(UserError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_rows(DataSource(path=str(tmp_path / "latin1.jsonl")))
    (tmp_path / "rows.xml").write_text("hello")
    with pytest.raises(UserError, match=r"rows\.xml: unknown data file type '\.xml'"):
        load_rows(DataSource(path=str(tmp_path / "rows.xml"), format="text"))


def test_json_csv_parquet_load_the_same_rows(tmp_path):
    import pandas as pd

    want = ROWS + [{"instruction": "what comes next", "input": "", "output": "15"}]
    (tmp_path / "rows.json").write_text(json.dumps(want, indent=2))
    pd.DataFrame(want).to_csv(tmp_path / "rows.csv", index=False)
    pd.DataFrame(want).to_parquet(tmp_path / "rows.parquet")
    write_jsonl(tmp_path / "rows.jsonl", want)
    for name in ("rows.jsonl", "rows.json", "rows.csv", "rows.parquet"):
        assert load_rows(DataSource(path=str(tmp_path / name))) == want, name  # "15" stays text, "" stays ""
    bad = [{"instruction": "x", "output": "y"}, {"instruction": "x"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"bad\.json \(row 2\): missing field 'output'"):
        load_rows(DataSource(path=str(tmp_path / "bad.json")))
    (tmp_path / "broken.json").write_text('[\n{"instruction": "x",\n "output": }\n]')
    with pytest.raises(UserError, match=r"broken\.json:3: malformed JSON"):
        load_rows(DataSource(path=str(tmp_path / "broken.json")))


def test_numbers_in_text_fields_become_text(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"instruction": "add", "input": None, "output": 15}])
    assert load_rows(DataSource(path=str(path))) == [{"instruction": "add", "input": "", "output": "15"}]


# ---------------------------------------------------------------------------------------------
# batching and build


def test_batches_are_a_seeded_permutation():
    examples = list(range(10))
    order = data.batches(examples, 4, seed=3, epoch=1)
    assert [len(b) for b in order] == [4, 4, 2]  # last partial chunk kept
    assert sorted(i for b in order for i in b) == examples
    want = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert [i for b in order for i in b] == want
    assert data.batches(examples, 4, seed=3, epoch=1) == order
    assert data.batches(examples, 4, seed=3, epoch=2) != order


def test_build_eval_file_split_and_max_samples(tok, tmp_path):
    rows = [{"instruction": "count", "input": str(i), "output": str(i)} for i in range(20)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", rows[:3] + [{"instruction": "count", "input": "", "output": ""}])

    got = build(DataConfig(train=DataSource(path=str(train)), eval=DataSource(path=str(held)), max_samples=5), tok, seed=0)
    assert len(got.train) == 5 and got.train_stats.rows == 5
    assert got.train[4] == tokenize_row(rows[4], "alpaca", tok, 512, False)
    assert len(got.eval_rows) == 4 and len(got.eval) == 3  # every raw eval row kept for exact match
    assert got.eval_stats.dropped_empty_answer == 1 and got.eval_format == "alpaca"

    split = build(DataConfig(train=DataSource(path=str(train)), eval_split=0.25), tok, seed=7)
    assert len(split.train) == 15 and len(split.eval_rows) == 5 == len(split.eval)
    train_inputs = {r["input"] for r in rows} - {r["input"] for r in split.eval_rows}
    assert len(train_inputs) == 15  # disjoint
    again = build(DataConfig(train=DataSource(path=str(train)), eval_split=0.25), tok, seed=7)
    assert again.eval_rows == split.eval_rows  # seeded

    none = build(DataConfig(train=DataSource(path=str(train))), tok, seed=0)
    assert none.eval == [] and none.eval_rows == [] and none.eval_stats is None
