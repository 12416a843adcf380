"""Data sources (peftcli.sources): every kind of path read into the exact rows the file holds,
``columns`` and ``split`` applied, several sources mixed by weight, and each error one line.

References: the rows the test itself wrote; token ids written out by hand from the tokenizer's
own pieces (the prompt's ids masked, then the answer's ids and EOS supervised); mixing counts
from the weight rule (``floor(w)`` copies + ``floor(frac(w) * n)`` drawn).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from helpers import peft_in_process, write_jsonl, write_recipe

from peftcli import data, sources
from peftcli.data import IGNORE_INDEX, tokenize_row
from peftcli.errors import UserError
from peftcli.recipe import DataConfig, DataSource, validate

ROWS = [{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "the quick brown", "completion": " fox"},
        {"prompt": "count 1 2", "completion": " 3"}]
ALPACA_HEAD = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.\n\n")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def assert_tokens(tok, row, fmt):
    """``tokenize_row`` of ``row`` equals the hand computation: prompt ids masked, answer ids +
    EOS supervised (text: every id + EOS supervised). The tiny tokenizer adds no BOS."""
    assert tok("x")["input_ids"] == ids(tok, "x")  # no BOS/EOS added, so the pieces below are all
    eos = tok.eos_token_id
    if fmt == "text":
        want_ids = ids(tok, row["text"]) + [eos]
        want_labels = want_ids
    else:
        prompt = {"completion": lambda r: r["prompt"],
                  "alpaca": lambda r: f"{ALPACA_HEAD}### Instruction:\n{r['instruction']}\n\n### Response:\n"}[fmt](row)
        answer = row["completion"] if fmt == "completion" else row["output"]
        p, a = ids(tok, prompt), ids(tok, answer) + [eos]
        want_ids, want_labels = p + a, [IGNORE_INDEX] * len(p) + a
    got = tokenize_row(row, fmt, tok, 512, False)
    assert got == {"input_ids": want_ids, "labels": want_labels}


def load(path, fmt="completion", **kw):
    return data.load_rows(DataSource(path=str(path), format=fmt, **kw))


def saved_dataset(tmp_path, rows, name="saved"):
    import datasets

    path = tmp_path / name
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# one test per kind of source


def test_jsonl_rows_and_tokens(tok, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    rows = load(path)
    assert rows == ROWS
    assert_tokens(tok, rows[1], "completion")


def test_json_array_rows_and_tokens(tok, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    rows = load(path)
    assert rows == ROWS
    assert_tokens(tok, rows[0], "completion")


def test_csv_with_mapped_columns_rows_and_tokens(tok, tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer,source\nreverse the word dog,god,x\nwhat comes next,15,\n", encoding="utf-8")
    rows = load(path, "alpaca", columns={"instruction": "question", "output": "answer"})
    # every cell text ("15" stays "15", an empty cell ""); the unmapped column keeps its name
    assert rows == [{"instruction": "reverse the word dog", "output": "god", "source": "x"},
                    {"instruction": "what comes next", "output": "15", "source": ""}]
    assert_tokens(tok, rows[0], "alpaca")


def test_a_csv_row_of_the_wrong_width_names_its_line(tmp_path):
    """A row with a cell missing is an error naming its line, never an empty answer dropped
    (found by the issue-17 trial); an extra cell and a stray quote too. A quoted cell may span
    lines: a row is named by the line it starts on, and a missing field after column mapping by
    its line and row."""
    def load_error(text, **kw):
        path = tmp_path / "qa.csv"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(UserError) as e:
            load(path, "alpaca", columns={"instruction": "question", "output": "answer"}, **kw)
        return str(e.value)

    assert load_error('question,answer\n"two\nlines",4\nWhat is 2 plus 2?\n') == (
        f"{tmp_path / 'qa.csv'}:4: 1 cell where the header has 2 (question, answer); quote a cell that holds a comma")
    assert load_error("question,answer\nWhat is 2 plus 2?,4,extra\n").startswith(
        f"{tmp_path / 'qa.csv'}:2: 3 cells where the header has 2")
    assert load_error('question,answer\n"a"b,4\n').startswith(f"{tmp_path / 'qa.csv'}:2: malformed CSV")
    path = tmp_path / "q.csv"
    path.write_text('\nquestion,reply\n"two\nlines",4\n\nok,5\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"q\.csv:3 \(row 1\): missing field 'output' for format alpaca"):
        data.load_rows(DataSource(path=str(path), format="alpaca", columns={"instruction": "question"}))
    rows = sources.load(DataSource(path=str(path), format="alpaca", columns={"instruction": "question", "output": "reply"}))
    assert [rows.where(n) for n in (1, 2)] == [f"{path}:3 (row 1)", f"{path}:6 (row 2)"]


def test_parquet_rows_and_tokens(tok, tmp_path):
    import pandas as pd

    path = tmp_path / "rows.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    rows = load(path)
    assert rows == ROWS
    assert_tokens(tok, rows[2], "completion")


def test_txt_is_one_document(tok, tmp_path):
    text = "hello world\n\nthe quick brown fox\njumps over the lazy dog\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    rows = load(path, "text")
    assert rows == [{"text": text}]  # the whole file, blank lines and all: one document
    assert_tokens(tok, rows[0], "text")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UserError, match=r"blank\.txt: no rows"):
        load(tmp_path / "blank.txt", "text")


def test_arrow_file_rows_and_tokens(tok, tmp_path):
    saved = saved_dataset(tmp_path, ROWS)
    path = tmp_path / "rows.arrow"
    shutil.copy(next(saved.glob("*.arrow")), path)  # a datasets Arrow file
    rows = load(path)
    assert rows == ROWS
    assert_tokens(tok, rows[1], "completion")
    (tmp_path / "bad.arrow").write_bytes(b"not arrow")
    with pytest.raises(UserError, match=r"bad\.arrow: cannot read Arrow file") as e:
        load(tmp_path / "bad.arrow")
    assert "\n" not in str(e.value)


def test_save_to_disk_dataset(tok, tmp_path):
    path = saved_dataset(tmp_path, ROWS)
    rows = load(path)
    assert rows == ROWS
    assert_tokens(tok, rows[0], "completion")
    with pytest.raises(UserError, match=r"data\.train\.split: .*saved is a saved Dataset .*has no splits; remove split"):
        load(path, split="test")


def test_save_to_disk_dataset_dict_and_split(tok, tmp_path):
    import datasets

    path = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(path))
    assert load(path) == ROWS[:2]  # default split: train
    rows = load(path, split="test")
    assert rows == ROWS[2:]
    assert_tokens(tok, rows[0], "completion")
    with pytest.raises(UserError, match=r"^data\.train\.split 'validation': .*dict has the splits train, test$"):
        load(path, split="validation")


def hub_cache(root, repo_id, splits: dict[str, list[dict]]):
    """A local datasets cache holding ``repo_id`` as ``load_dataset(repo_id)`` leaves it
    (``<owner>___<name>/default/0.0.0/<hash>/<name>-<split>.arrow`` + ``dataset_info.json``),
    built offline from the rows."""
    import datasets

    name = repo_id.split("/")[-1]
    entry = root / repo_id.replace("/", "___") / "default" / "0.0.0" / "0123abcd"
    entry.mkdir(parents=True)
    info = None
    for split, rows in splits.items():
        saved = saved_dataset(root.parent, rows, name=f"saved-{split}")
        shutil.copy(next(saved.glob("*.arrow")), entry / f"{name}-{split}.arrow")
        info = info or datasets.Dataset.from_list(rows).info
    info.config_name, info.dataset_name = "default", name
    info.splits = datasets.SplitDict({s: datasets.SplitInfo(s, num_examples=len(r), dataset_name=name) for s, r in splits.items()})
    info.write_to_directory(str(entry))
    return root


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """An empty datasets cache of the test's own (HF_DATASETS_CACHE as datasets read it)."""
    import datasets

    root = tmp_path / "hf" / "datasets"
    root.mkdir(parents=True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", root)
    return root


def test_hub_id_read_from_the_local_cache(tok, datasets_cache):
    import datasets
    import huggingface_hub.constants as hub

    hub_cache(datasets_cache, "tatsu-lab/alpaca", {"train": ROWS[:2], "test": ROWS[2:]})
    online = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    rows = load("tatsu-lab/alpaca")
    assert rows == ROWS[:2]
    assert load("tatsu-lab/alpaca", split="test") == ROWS[2:]
    assert_tokens(tok, rows[1], "completion")
    assert (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE) == online  # offline only for the call
    with sources._offline():  # the reference: datasets' own load_dataset(ID), offline, reads this entry too
        assert datasets.load_dataset("tatsu-lab/alpaca", split="test", cache_dir=str(datasets_cache)).to_list() == ROWS[2:]
    with pytest.raises(UserError, match=r"^data\.train\.split 'dev': tatsu-lab/alpaca has the splits train, test$"):
        load("tatsu-lab/alpaca", split="dev")


def test_hub_id_absent_is_one_line(datasets_cache):
    with pytest.raises(UserError) as e:
        sources.load(DataSource(path="someone/not-cached"), "data.train[1]")
    msg = str(e.value)
    assert msg.startswith("data.train[1].path someone/not-cached: not a file or dir, and not in the local datasets cache ("
                          f"{datasets_cache}; no downloads at run time")
    assert "\n" not in msg


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_kinds_and_missing_columns_are_one_line(tmp_path):
    (tmp_path / "rows.xml").write_text("<rows/>")
    (tmp_path / "adir").mkdir()
    csv = tmp_path / "qa.csv"
    csv.write_text("question,answer\nq,a\n")
    cases = [
        (lambda: load(tmp_path / "rows.xml"), r"rows\.xml: unknown data file type '\.xml'"),
        (lambda: load(tmp_path / "adir"), r"data\.train\.path .*adir: a dir, but not a datasets save_to_disk dir"),
        (lambda: load(tmp_path / "missing.jsonl"), r"missing\.jsonl: data file not found"),
        (lambda: load("a/b/c"), r"data\.train\.path a/b/c: not a file or dir, and not a hub dataset id"),
        (lambda: load(csv, "alpaca", columns={"instruction": "question", "output": "reply"}),
         r"^data\.train\.columns\.output: no column 'reply' in .*qa\.csv \(columns there: question, answer\)$"),
        (lambda: load(csv, split="train"), r"data\.train\.split: .*qa\.csv is a file and has no splits"),
        # the format check still runs on the mapped rows, naming the row
        (lambda: load(csv, "alpaca", columns={"instruction": "question"}), r"qa\.csv:2 \(row 1\): missing field 'output'"),
    ]
    for act, pattern in cases:
        with pytest.raises(UserError, match=pattern) as e:
            act()
        assert "\n" not in str(e.value)


def test_bad_source_exits_2_with_one_line(tmp_path, tiny_dir, capsys, datasets_cache):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"name_or_path": str(tiny_dir)}, "method": {"name": "lora"},
        "data": {"train": [{"path": str(write_jsonl(tmp_path / "a.jsonl", ROWS)), "format": "completion"},
                           {"path": "nobody/absent", "format": "completion", "weight": 2}]}})
    code, err = peft_in_process(["validate", recipe], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: data.train[1].path nobody/absent: not a file or dir, and not in the local datasets cache ({datasets_cache}; "
        "no downloads at run time: load it once with datasets.load_dataset('nobody/absent') where the hub can be reached)"]


def test_recipe_refuses_eval_weight_and_mixed_eval_formats():
    base = {"method": {"name": "lora"}}
    for d, want in [({"train": {"path": "a"}, "eval": [{"path": "b", "weight": 2}]}, "data.eval: weight mixes train sources"),
                    ({"train": {"path": "a"}, "eval": [{"path": "b"}, {"path": "c", "format": "chat"}]},
                     "data.eval: eval sources must share one format"),
                    ({"train": [{"path": "a"}, {"path": "b", "weight": 0}]}, "data.train[1].weight: Input should be greater than 0"),
                    ({"train": [{"path": "a"}, {"path": "b", "wieght": 1}]}, "did you mean data.train[1].weight?")]:
        with pytest.raises(UserError, match=want.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.").replace("?", r"\?")):
            validate({**base, "data": d})
    cfg = validate({**base, "data": {"train": [{"path": "a", "format": "chat"}, {"path": "b"}]}}).data
    assert [s.path for s in cfg.train_sources] == ["a", "b"] and cfg.train_format == "chat" and cfg.eval_sources == []


# ---------------------------------------------------------------------------------------------
# mixing


def test_mix_proportions_are_exact():
    parts = [[("a", i) for i in range(1000)], [("b", i) for i in range(300)], [("c", i) for i in range(999)]]
    mixed = sources.mix(parts, [1, 2, 0.5], seed=3)
    counts = Counter(name for name, _ in mixed)
    assert counts == {"a": 1000, "b": 600, "c": 499}  # 1 x 1000, 2 x 300, floor(0.5 x 999)
    assert [sources.drawn(len(p), w) for p, w in zip(parts, [1, 2, 0.5])] == [1000, 600, 499]
    assert Counter(mixed[1000:1600]) == {("b", i): 2 for i in range(300)}  # every b row twice
    c = [i for name, i in mixed if name == "c"]
    assert len(set(c)) == 499 and c == sorted(c)  # without replacement, in file order
    assert sources.mix(parts, [1, 2, 0.5], seed=3) == mixed  # seeded
    assert [i for name, i in sources.mix(parts, [1, 2, 0.5], seed=4) if name == "c"] != c
    over = sources.mix([list(range(10))], [2.5], seed=0)
    assert len(over) == 25 and Counter(Counter(over).values()) == {3: 5, 2: 5}  # all twice, a drawn half once more
    assert sources.mix_line("c.jsonl", 999, 0.5) == "c.jsonl: 499 of 999 examples drawn (weight 0.5), 500 not used"
    assert sources.mix_line("b.csv", 300, 2) == "b.csv: 300 examples x 2 = 600 (weight 2)"


def test_build_mixes_sources_tokenised_apart(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"count {i}", "completion": f" {i}"} for i in range(40)])
    b = tmp_path / "b.csv"
    b.write_text("question,answer\n" + "".join(f"sort the letters {i},{i}\n" for i in range(10)), encoding="utf-8")
    c = tmp_path / "c.txt"
    c.write_text("the quick brown fox\n", encoding="utf-8")
    cfg = DataConfig(train=[DataSource(path=str(a), format="completion", weight=0.5),
                            DataSource(path=str(b), columns={"instruction": "question", "output": "answer"}, weight=2),
                            DataSource(path=str(c), format="text")],
                     eval=[DataSource(path=str(a), format="completion"), DataSource(path=str(a), format="completion")],
                     max_samples=30)
    got = data.build(cfg, tok, seed=0)
    # a: its first 30 rows (max_samples per source), a seeded half; b: every row twice; c: one document
    want_a = [tokenize_row({"prompt": f"count {i}", "completion": f" {i}"}, "completion", tok, 512, False) for i in range(30)]
    want_b = [tokenize_row({"instruction": f"sort the letters {i}", "output": str(i)}, "alpaca", tok, 512, False)
              for i in range(10)]
    want_c = [tokenize_row({"text": "the quick brown fox\n"}, "text", tok, 512, False)]
    assert got.train == sources.mix([want_a, want_b, want_c], [0.5, 2, 1], seed=0)
    assert len(got.train) == 15 + 20 + 1
    assert got.train_stats.rows == 41 and got.train_stats.kept == 41
    assert got.mixing == ["mixing 3 sources: 36 train examples per epoch",
                          f"  {a}: 15 of 30 examples drawn (weight 0.5), 15 not used",
                          f"  {b}: 10 examples x 2 = 20 (weight 2)", f"  {c}: 1 examples (weight 1)"]
    assert len(got.eval_rows) == 80 and len(got.eval) == 80 and got.eval_stats.rows == 80  # both eval sources, all rows
    assert got.eval_format == "completion"
    one = data.build(DataConfig(train=DataSource(path=str(a), format="completion")), tok, seed=0)
    assert one.mixing == [] and len(one.train) == 40
