"""Data formats beyond alpaca/completion (peftcli.data): sharegpt, chat role names and content
lists, text windows, tokenized rows, and the counts by reason of every dropped or cut row.

References: the tokenizer's own ``apply_chat_template(tokenize=True)`` for conversations; lists
built by hand for text windows and tokenized rows.
"""

from __future__ import annotations

import io
import json

import pytest
from helpers import write_jsonl
from rich.console import Console
from tiny import tiny_run_recipe, tiny_tokenizer

from peftcli import data
from peftcli.data import IGNORE_INDEX, DataStats, build, tokenize_examples, tokenize_row, tokenize_rows
from peftcli.errors import UserError
from peftcli.recipe import DataConfig, DataSource, validate

MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "add 1 2"},
            {"role": "assistant", "content": "3"}]
SHAREGPT = {"conversations": [{"from": "system", "value": "be brief"},
                              {"from": "human", "value": "hello"},
                              {"from": "gpt", "value": "hi there"},
                              {"from": "human", "value": "add 1 2"},
                              {"from": "gpt", "value": "3"}]}
LONG_TEXT = " ".join(f"the quick brown fox {n} jumps over the lazy dog." for n in range(400))  # ~19 KB


@pytest.fixture(scope="module")
def bos_tok():
    """tiny's tokenizer set to add its BOS, so "BOS once at the start" is visible."""
    tok = tiny_tokenizer()
    tok.add_bos_token = True
    return tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def chat_reference(tok, messages):
    """(ids, labels) by hand: ``apply_chat_template(tokenize=True)``'s ids; labels are the ids of
    each assistant content + <|im_end|> (found by rendering the prefixes) and -100 elsewhere."""
    full = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True)["input_ids"])
            n = len(ids(tok, m["content"] + "<|im_end|>"))
            labels[start:start + n] = full[start:start + n]
    return full, labels


def load(tmp_path, rows, fmt, **cfg):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    return path, DataConfig(train=DataSource(path=str(path), format=fmt), **cfg)


# ---------------------------------------------------------------------------------------------
# sharegpt and chat role names


def test_sharegpt_row_is_the_chat_conversation(tok):
    want_ids, want_labels = chat_reference(tok, MESSAGES)
    assert [x for x in want_labels if x != IGNORE_INDEX] == ids(tok, "hi there<|im_end|>") + ids(tok, "3<|im_end|>")
    e = tokenize_row(SHAREGPT, "sharegpt", tok, 512, False)
    assert e == {"input_ids": want_ids, "labels": want_labels}
    assert e == tokenize_row({"messages": MESSAGES}, "chat", tok, 512, False)
    # role/content keys inside conversations, and role names in any case, read the same
    as_roles = {"conversations": [{"role": m["from"].upper(), "content": m["value"]} for m in SHAREGPT["conversations"]]}
    assert tokenize_row(as_roles, "sharegpt", tok, 512, False) == e
    # prompt, reference, with_answer and generation behave as chat
    assert data.render_prompt(SHAREGPT, "sharegpt", tok) == tok.apply_chat_template(
        MESSAGES[:4], add_generation_prompt=True, tokenize=False)
    assert data.prompt_ids(SHAREGPT, "sharegpt", tok) == data.prompt_ids({"messages": MESSAGES}, "chat", tok)
    assert data.reference(SHAREGPT, "sharegpt") == "3"
    assert data.chat_messages(data.with_answer(SHAREGPT, "sharegpt", "4"), "sharegpt")[-1] == \
        {"role": "assistant", "content": "4"}


def test_sharegpt_rows_load_and_take_the_system_prompt(tok, tmp_path):
    no_system = {"conversations": SHAREGPT["conversations"][1:]}
    _, cfg = load(tmp_path, [no_system, SHAREGPT], "sharegpt", system_prompt="be brief")
    got = build(cfg, tok, seed=0)
    want = chat_reference(tok, MESSAGES)
    assert [(e["input_ids"], e["labels"]) for e in got.train] == [want, want]  # the system prompt put first in row 1
    recipe = validate({"method": {"name": "lora"}, "data": {"train": {"path": "x.jsonl", "format": "sharegpt"},
                                                            "system_prompt": "be brief"}})
    assert data.generation_prompt("hello", recipe, tok) == tok.apply_chat_template(
        MESSAGES[:2], add_generation_prompt=True, tokenize=True)["input_ids"]


def test_chat_human_gpt_roles_are_mapped_never_dropped(tok):
    renamed = [{"role": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "content": m["content"]}
               for m in MESSAGES]
    rows = [{"messages": renamed}, {"messages": MESSAGES}]
    examples, stats = tokenize_rows(rows, "chat", tok, 512, False, "rows")
    assert examples[0] == examples[1] == dict(zip(("input_ids", "labels"), chat_reference(tok, MESSAGES)))
    assert (stats.kept, stats.dropped) == (2, {})


def test_unknown_role_is_one_line_naming_row_and_known_roles(tok, tmp_path):
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "..."}]}
    path, cfg = load(tmp_path, [SHAREGPT, bad], "sharegpt")
    with pytest.raises(UserError) as err:
        build(cfg, tok, seed=0)
    assert str(err.value) == (f"{path}:2 (row 2): conversations[1] has unknown role 'narrator' "
                              "(known: system, user, human, assistant, gpt, chatgpt, bing, bard, model, tool)")


# ---------------------------------------------------------------------------------------------
# chat content lists


def test_content_list_of_text_parts_is_the_string_content(tok):
    parts = [dict(m, content=[{"type": "text", "text": m["content"][:2]}, {"type": "text", "text": m["content"][2:]}])
             for m in MESSAGES]
    assert tokenize_row({"messages": parts}, "chat", tok, 512, False) == \
        dict(zip(("input_ids", "labels"), chat_reference(tok, MESSAGES)))


def test_non_text_part_is_one_line_naming_row_and_part_type(tok, tmp_path):
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                       {"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "a cat"}]}
    path, cfg = load(tmp_path, [{"messages": MESSAGES}, image], "chat")
    with pytest.raises(UserError) as err:
        build(cfg, tok, seed=0)
    assert str(err.value).startswith(f"{path}:2 (row 2): messages[0].content[1] is of type 'image_url'; only text parts")


# ---------------------------------------------------------------------------------------------
# text windows


def test_text_windows_use_every_token_once(bos_tok, tmp_path):
    doc = [bos_tok.bos_token_id] + ids(bos_tok, LONG_TEXT) + [bos_tok.eos_token_id]  # BOS once, EOS at the end
    L = 256
    _, cfg = load(tmp_path, [{"text": LONG_TEXT}], "text", max_seq_len=L)
    got = build(cfg, bos_tok, seed=0)
    n = -(-len(doc) // L)
    assert len(LONG_TEXT.encode()) > 19_000 and n > 10
    assert [e["input_ids"] for e in got.train] == [doc[k * L:(k + 1) * L] for k in range(n)]  # hand-cut windows
    assert all(e["labels"] == e["input_ids"] for e in got.train)
    assert sum(len(e["input_ids"]) for e in got.train) == len(doc)  # no token dropped
    s = got.train_stats
    assert (s.rows, s.kept, s.examples, s.documents, s.windows, s.truncated, s.dropped) == (1, 1, n, 1, n, 0, {})
    assert s.describe() == f"1 of 1 train row kept -> {n} examples (1 document -> {n} windows of max_seq_len {L}; none dropped)"


@pytest.mark.parametrize("overlap", [1, 5])
def test_text_window_overlap_is_context_only(bos_tok, overlap):
    doc = [bos_tok.bos_token_id] + ids(bos_tok, LONG_TEXT[:2000]) + [bos_tok.eos_token_id]
    L, stride = 64, 64 - overlap
    windows = tokenize_examples({"text": LONG_TEXT[:2000]}, "text", bos_tok, L, False, text_overlap=overlap)
    starts = list(range(0, len(doc) - overlap, stride))  # by hand: a window while new tokens remain
    assert [w["input_ids"] for w in windows] == [doc[s:s + L] for s in starts]
    for k, w in enumerate(windows):
        repeated = overlap if k else 0
        assert w["labels"] == [IGNORE_INDEX] * repeated + w["input_ids"][repeated:]
    learned = [x for w in windows for x in w["labels"] if x != IGNORE_INDEX]
    assert learned == doc  # every token a label exactly once


def test_text_windows_edges():
    doc = list(range(10))
    assert [w["input_ids"] for w in data.text_windows(doc, 10)] == [doc]
    assert [w["input_ids"] for w in data.text_windows(doc, 9)] == [doc[:9], doc[9:]]
    assert [w["input_ids"] for w in data.text_windows(doc, 9, overlap=2)] == [doc[:9], doc[7:]]
    assert data.text_windows(doc, 9, overlap=2)[1]["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 9]
    with pytest.raises(UserError, match="text_overlap 8 must be less than max_seq_len 8"):
        validate({"method": {"name": "lora"}, "data": {"train": {"path": "x.jsonl", "format": "text"},
                                                       "max_seq_len": 8, "text_overlap": 8}})


# ---------------------------------------------------------------------------------------------
# tokenized


def test_tokenized_rows_as_given_cut_and_counted(tok, tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
            {"input_ids": [9, 10, 11]},                                         # labels default to the ids
            {"input_ids": list(range(20, 30)), "labels": [-100] * 3 + list(range(23, 30))},  # cut at 6
            {"input_ids": [1, 2, 3], "labels": [-100, -100, -100]},             # nothing to learn
            {"input_ids": list(range(40, 50)), "labels": [-100] * 8 + [48, 49]}]  # labels only past max_seq_len
    _, cfg = load(tmp_path, rows, "tokenized", max_seq_len=6)
    got = build(cfg, tok, seed=0)
    assert got.train == [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
                         {"input_ids": [9, 10, 11], "labels": [9, 10, 11]},
                         {"input_ids": list(range(20, 26)), "labels": [-100] * 3 + [23, 24, 25]}]
    s = got.train_stats
    assert s.dropped == {"no_labels": 1, "prompt_over_max_seq_len": 1} and (s.kept, s.truncated) == (3, 1)
    assert s.describe() == ("3 of 5 train rows kept -> 3 examples (dropped 1 tokenized row with every label -100, "
                            "1 prompt over max_seq_len 6; 1 kept row cut at max_seq_len 6)")
    assert tokenize_row(rows[0], "tokenized", tok, 6, True)["labels"] == [5, 6, 7, 8]  # train_on_prompt
    assert data.render_prompt(rows[0], "tokenized", tok) == "" and data.reference(rows[0], "tokenized") is None
    with pytest.raises(ValueError):
        data.with_answer(rows[0], "tokenized", "x")
    recipe = validate({"method": {"name": "lora"}, "data": {"train": {"path": "x.jsonl", "format": "tokenized"}}})
    assert data.generation_prompt("hello", recipe, tok) == "hello"  # no prompt format: sent as typed


@pytest.mark.parametrize("row, message", [
    ({"input_ids": [1, "2"]}, "input_ids[1] is '2'; expected a token id (an int >= 0)"),
    ({"input_ids": [1, True]}, "input_ids[1] is True; expected a token id (an int >= 0)"),
    ({"input_ids": [1, -100]}, "input_ids[1] is -100; expected a token id (an int >= 0)"),
    ({"input_ids": []}, "field 'input_ids' must be a non-empty list of token ids"),
    ({"input_ids": [1, 2], "labels": [1]}, "field 'labels' must be a list as long as input_ids (2), got 1 labels"),
    ({"input_ids": [1, 2], "labels": [1, -5]}, "labels[1] is -5; expected a token id (an int >= 0 or -100)"),
])
def test_tokenized_row_errors_name_the_row(tok, tmp_path, row, message):
    path, cfg = load(tmp_path, [{"input_ids": [1, 2]}, row], "tokenized")
    with pytest.raises(UserError) as err:
        build(cfg, tok, seed=0)
    assert str(err.value) == f"{path}:2 (row 2): {message}"


def test_tokenized_id_outside_the_vocabulary(tok, tmp_path):
    path, cfg = load(tmp_path, [{"input_ids": [1, 2]}, {"input_ids": [1, len(tok)]}], "tokenized")
    with pytest.raises(UserError) as err:
        build(cfg, tok, seed=0)
    assert str(err.value) == (f"{path} (row 2): input_ids[1] = {len(tok)} is outside the tokenizer's vocabulary "
                              f"(ids 0..{len(tok) - 1}); tokenize the data with this model's tokenizer")


# ---------------------------------------------------------------------------------------------
# counts by reason


def test_every_dropped_or_cut_row_is_counted_by_reason(tok):
    ok = {"instruction": "reverse the word", "input": "", "output": "dog"}
    max_len = len(tokenize_row(ok, "alpaca", tok, 10_000, False)["input_ids"]) + 1
    rows = [ok, {**ok, "output": " "}, {**ok, "instruction": "the quick brown fox " * 40},
            {**ok, "output": "the quick brown fox jumps"}, {**ok, "output": ""}]
    _, s = tokenize_rows(rows, "alpaca", tok, max_len, False, "rows")
    assert s.dropped == {"empty_answer": 2, "prompt_over_max_seq_len": 1}
    assert (s.rows, s.kept, s.examples, s.truncated, s.dropped_empty_answer, s.dropped_truncated) == (5, 2, 2, 1, 2, 1)
    assert s.dropped_rows() == 3
    chats = [{"messages": MESSAGES}, {"messages": MESSAGES[:2]}, {"messages": MESSAGES[:2] + [{"role": "gpt", "content": ""}]}]
    _, c = tokenize_rows(chats, "chat", tok, 512, False, "chats")
    assert c.dropped == {"no_assistant_turn": 1, "empty_answer": 1}
    texts = [{"text": LONG_TEXT[:600]}, {"text": "  "}]
    _, t = tokenize_rows(texts, "text", tok, 32, False, "texts", text_overlap=4)
    assert t.dropped == {"empty_text": 1} and t.documents == 1 and t.windows == t.examples > 1
    assert t.describe() == (f"1 of 2 train rows kept -> {t.windows} examples (1 document -> {t.windows} windows of "
                            "max_seq_len 32, each repeating 4 tokens of the one before; dropped 1 empty text)")
    both = s + t  # two sources together
    assert both.dropped == {"empty_answer": 2, "empty_text": 1, "prompt_over_max_seq_len": 1}
    assert (both.rows, both.kept, both.examples, both.windows) == (7, 3, 2 + t.windows, t.windows)
    with pytest.raises(UserError) as err:
        tokenize_rows(rows[1:3], "alpaca", tok, max_len, False, "bad.jsonl")
    assert str(err.value) == (f"bad.jsonl: no row has anything to learn (2 rows: 1 empty answer (row 1), "
                              f"1 prompt over max_seq_len {max_len} (row 2))")


def test_train_banner_and_summary_count_windows_and_drops(tmp_path, tiny_dir):
    from peftcli.trainer import train

    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora", "r": 2, "alpha": 4}, max_seq_len=64, max_steps=1)
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": LONG_TEXT[:1500]}, {"text": ""}])
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"train": DataSource(path=str(path), format="text")})})

    buf = io.StringIO()
    result = train(recipe, console=Console(file=buf, width=200))
    s = result.datasets.train_stats
    assert s.windows > 1 and s.dropped == {"empty_text": 1}
    assert (f"data: 1 of 2 train rows kept -> {s.windows} examples (1 document -> {s.windows} windows of "
            "max_seq_len 64; dropped 1 empty text), eval on 0 examples") in buf.getvalue()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["dropped_rows"] == 1 and summary["train_examples"] == s.windows
    assert summary["train_data"]["dropped"] == {"empty_text": 1} and summary["train_data"]["windows"] == s.windows


def test_datastats_add_keeps_reason_order():
    a = DataStats(rows=1, kept=0, dropped_empty_answer=0, dropped_truncated=1, supervised_tokens=0,
                  dropped={"prompt_over_max_seq_len": 1}, max_seq_len=8)
    b = DataStats(rows=2, kept=1, dropped_empty_answer=1, dropped_truncated=0, supervised_tokens=3, examples=1,
                  dropped={"empty_answer": 1}, max_seq_len=8)
    assert list((a + b).dropped) == ["empty_answer", "prompt_over_max_seq_len"]
    assert (a + b).describe() == ("1 of 3 train rows kept -> 1 example (dropped 1 empty answer, "
                                  "1 prompt over max_seq_len 8)")
