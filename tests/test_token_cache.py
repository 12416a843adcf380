"""The token cache (peftcli.token_cache) and its use in data.tokenize_rows: a second call reads
what the first tokenised, the key changes with anything the examples depend on, a corrupt entry
is tokenised again, an unwritable home only costs the cache; parallel tokenisation gives the
serial examples in row order.

Reference: the examples of tokenize_row called row by row (no cache, no workers).
"""

from __future__ import annotations

import contextlib
import inspect
import json

import pytest
from helpers import write_jsonl
from tiny import CHATML, tiny_tokenizer

from peftcli import data, models, parallel, token_cache
from peftcli.errors import UserError
from peftcli.recipe import DataConfig, DataSource

ROWS = [{"instruction": f"sort the letters {i}", "input": "dog" if i % 3 else "", "output": f"the answer is {i}"}
        for i in range(40)]
ROWS[7]["output"] = " "  # dropped: empty answer


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """The cache on, under a fresh peft home; the "cannot write" note not yet said."""
    monkeypatch.setenv("PEFTCLI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(token_cache.ENV, "1")
    monkeypatch.setattr(data, "_cache_unwritable_said", False)
    return tmp_path / "home"


@pytest.fixture
def calls(monkeypatch):
    """Counts the rows data._tokenize is called on."""
    count = {"rows": 0}
    real = data._tokenize

    def counting(row, *args):
        count["rows"] += 1
        return real(row, *args)

    monkeypatch.setattr(data, "_tokenize", counting)
    return count


def by_row(rows, tok, max_seq_len=512, train_on_prompt=False):
    """The reference: tokenize_row of each row, the dropped ones left out."""
    examples = [data.tokenize_row(r, "alpaca", tok, max_seq_len, train_on_prompt) for r in rows]
    return [e for e in examples if e is not None]


def test_second_call_reads_the_cache(tok, cache_home, calls, capsys):
    first, stats = data.tokenize_rows(ROWS, "alpaca", tok, 512, False, "rows")
    assert calls["rows"] == len(ROWS)
    assert first == by_row(ROWS, tok)
    assert (stats.rows, stats.kept, stats.dropped_empty_answer) == (40, 39, 1)
    assert capsys.readouterr().err == "rows: tokenised 40 rows (cached for next time)\n"
    [entry] = (cache_home / "cache" / "tokens").iterdir()

    calls["rows"] = 0
    again, again_stats = data.tokenize_rows(ROWS, "alpaca", tok, 512, False, "rows")
    assert calls["rows"] == 0  # not tokenised again
    assert again == first and again_stats == stats
    assert type(again[0]["input_ids"]) is list and type(again[0]["input_ids"][0]) is int
    assert capsys.readouterr().err == f"rows: tokens from cache (key {entry.name[:12]}…)\n"


def test_validate_then_train_tokenise_once(tok, cache_home, calls, tmp_path):
    # data.build is what peft validate and peft train both run (prepare.load)
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = DataConfig(train=DataSource(path=str(path), format="alpaca"), eval_split=0.25, max_seq_len=512)
    first = data.build(cfg, tok, seed=3)
    n = calls["rows"]
    assert n == len(ROWS)  # train and eval parts
    second = data.build(cfg, tok, seed=3)
    assert calls["rows"] == n
    assert (second.train, second.eval, second.train_stats, second.eval_stats) == (
        first.train, first.eval, first.train_stats, first.eval_stats)


def test_the_entry_opens_with_datasets(tok, cache_home):
    import datasets

    examples, _ = data.tokenize_rows(ROWS, "alpaca", tok, 512, False, "rows")
    [entry] = (cache_home / "cache" / "tokens").iterdir()
    ds = datasets.Dataset.from_file(str(entry / "data.arrow"))
    assert ds.column_names == ["input_ids", "labels"] and ds.to_list() == examples
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["stats"]["kept"] == 39 and meta["key"] == entry.name


def test_cache_root_is_under_the_peft_home(cache_home):
    assert token_cache.cache_root() == models.peftcli_home() / "cache" / "tokens" == cache_home / "cache" / "tokens"


def key(rows=ROWS, tok=None, **settings):
    return token_cache.fingerprint(rows, tok or tiny_tokenizer(), {"format": "alpaca", **settings})


def test_key_changes_with_rows_settings_template_and_vocab():
    tok = tiny_tokenizer()
    base = key(tok=tok, max_seq_len=512)
    assert key(tok=tok, max_seq_len=512) == base == key(tok=tiny_tokenizer(), max_seq_len=512)  # same inputs
    changed_row = [dict(r) for r in ROWS]
    changed_row[5]["output"] += "!"
    assert key(changed_row, tok, max_seq_len=512) != base
    assert key(ROWS[:-1], tok, max_seq_len=512) != base
    assert key(ROWS[::-1], tok, max_seq_len=512) != base  # order
    assert key(tok=tok, max_seq_len=256) != base
    assert key(tok=tok, max_seq_len=512, train_on_prompt=True) != base
    assert key(tok=tok, max_seq_len=512, overlap=32) != base  # a setting other parts add
    other_template = tiny_tokenizer()
    other_template.chat_template = CHATML.replace("\n", " \n")
    assert key(tok=other_template, max_seq_len=512) != base
    assert key(tok=tiny_tokenizer(vocab_size=300), max_seq_len=512) != base
    assert key(tok=tiny_tokenizer(extra_specials=("<tool>",)), max_seq_len=512) != base
    assert key(tok=tiny_tokenizer(pad="own"), max_seq_len=512) != base


def test_every_argument_of_tokenize_rows_is_in_the_key(tok, cache_home, monkeypatch):
    seen = {}
    real = token_cache.fingerprint

    def spy(rows, tokenizer, settings):
        seen.update(settings)
        return real(rows, tokenizer, settings)

    monkeypatch.setattr(token_cache, "fingerprint", spy)
    data.tokenize_rows(ROWS, "alpaca", tok, 100, True, "rows")
    arguments = set(inspect.signature(data.tokenize_rows).parameters) - {"rows", "tokenizer", "name"}
    assert set(seen) == arguments | {"code"}
    assert (seen["fmt"], seen["max_seq_len"], seen["train_on_prompt"]) == ("alpaca", 100, True)
    # data.tokenize_rows's own source is part of the key: an edit of the masking gives new keys
    assert seen["code"] == token_cache.source_digest(data.__file__, data.tokens.__file__)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "garbage meta", "no meta"])
def test_a_corrupt_entry_is_tokenised_again_and_rewritten(tok, cache_home, calls, damage):
    first, stats = data.tokenize_rows(ROWS, "alpaca", tok, 512, False, "rows")
    [entry] = (cache_home / "cache" / "tokens").iterdir()
    arrow, meta = entry / "data.arrow", entry / "meta.json"
    blob = bytearray(arrow.read_bytes())
    if damage == "flip a byte":
        blob[len(blob) // 2] ^= 0x01
        arrow.write_bytes(bytes(blob))
    elif damage == "truncate":
        arrow.write_bytes(bytes(blob[: len(blob) // 2]))
    elif damage == "garbage meta":
        meta.write_text("{not json")
    else:
        meta.unlink()
    assert token_cache.load(entry.name) is None
    again, again_stats = data.tokenize_rows(ROWS, "alpaca", tok, 512, False, "rows")
    assert calls["rows"] == 2 * len(ROWS)  # tokenised again
    assert (again, again_stats) == (first, stats) and again == by_row(ROWS, tok)
    calls["rows"] = 2 * len(ROWS)
    assert token_cache.load(entry.name) == (first, vars(stats))  # rewritten whole
    data.tokenize_rows(ROWS, "alpaca", tok, 512, False, "rows")
    assert calls["rows"] == 2 * len(ROWS)


def test_unwritable_home_tokenises_without_cache_and_says_so_once(tok, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "home-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("PEFTCLI_HOME", str(blocker))  # nothing can be created under it (even as root)
    monkeypatch.setenv(token_cache.ENV, "1")
    monkeypatch.setattr(data, "_cache_unwritable_said", False)
    for _ in range(2):
        examples, stats = data.tokenize_rows(ROWS, "alpaca", tok, 512, False, "rows")
        assert examples == by_row(ROWS, tok) and stats.kept == 39
    err = capsys.readouterr().err
    assert err.count("note: cannot write the token cache") == 1 and "tokenising without it" in err
    assert "cached for next time" not in err


def test_cache_off_writes_and_says_nothing(tok, cache_home, monkeypatch, capsys):
    monkeypatch.setenv(token_cache.ENV, "0")
    assert data.tokenize_rows(ROWS, "alpaca", tok, 512, False, "rows")[0] == by_row(ROWS, tok)
    assert not cache_home.exists() and capsys.readouterr().err == ""


MANY = [{"instruction": f"count {i}", "input": str(i % 7), "output": "" if i % 97 == 0 else f"{i} and {i + 1}"}
        for i in range(2_500)]


def test_parallel_tokenisation_equals_serial_in_row_order(tok, monkeypatch):
    monkeypatch.setenv(token_cache.ENV, "0")
    serial, serial_stats = data.tokenize_rows(MANY, "alpaca", tok, 512, False, "rows")
    monkeypatch.setattr(parallel, "PARALLEL_MIN_ROWS", 100)
    monkeypatch.setattr(parallel, "workers", lambda n: 2)  # two processes even on a one-core machine
    used = []
    real_pool = parallel.multiprocessing.get_context("fork").Pool

    def pool(*args, **kwargs):
        used.append(args)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(parallel.multiprocessing.get_context("fork"), "Pool", pool)
    par, par_stats = data.tokenize_rows(MANY, "alpaca", tok, 512, False, "rows")
    assert used == [(2,)]
    assert par == serial and par_stats == serial_stats
    assert par_stats.dropped_empty_answer == 26  # rows 0, 97, ..., 2425
    assert par[:2] == by_row(MANY[:3], tok) and par[-5:] == by_row(MANY[-5:], tok)  # row 0 dropped


def test_a_bad_row_in_a_worker_is_named_by_its_row_number(tok, monkeypatch):
    monkeypatch.setenv(token_cache.ENV, "0")
    monkeypatch.setattr(parallel, "PARALLEL_MIN_ROWS", 100)
    monkeypatch.setattr(parallel, "workers", lambda n: 2)
    real = data._tokenize

    def refuse(row, *args):  # inherited by the forked workers
        if row["instruction"] == "count 1700":
            raise UserError("cannot render this row")
        return real(row, *args)

    monkeypatch.setattr(data, "_tokenize", refuse)
    with pytest.raises(UserError, match=r"^rows \(row 1701\): cannot render this row$"):
        data.tokenize_rows(MANY, "alpaca", tok, 512, False, "rows")


def test_progress_bar_on_a_terminal_for_large_sets_only(monkeypatch):
    import io

    from rich.console import Console

    def run(total):
        buf = io.StringIO()
        with parallel.progress(total, "tokenising data/[big].jsonl", Console(file=buf, force_terminal=True, width=120)) as advance:
            for _ in range(total // 1000):
                advance(1000)
        return buf.getvalue()

    assert "tokenising data/[big].jsonl" in run(parallel.PROGRESS_MIN_ROWS) and "/10000" in run(parallel.PROGRESS_MIN_ROWS)
    assert run(parallel.PROGRESS_MIN_ROWS - 1) == ""
    plain = io.StringIO()
    with parallel.progress(10 * parallel.PROGRESS_MIN_ROWS, "rows", Console(file=plain)) as advance:  # not a terminal
        advance(5)
    assert plain.getvalue() == ""


@pytest.mark.parametrize("workers", [1, 2])
def test_every_row_advances_the_progress(tok, monkeypatch, workers):
    monkeypatch.setattr(parallel, "PARALLEL_MIN_ROWS", 100)
    monkeypatch.setattr(parallel, "workers", lambda n: workers)
    steps = []

    @contextlib.contextmanager
    def progress(total, label):
        steps.append((total, label))
        yield steps.append

    monkeypatch.setattr(parallel, "progress", progress)
    monkeypatch.setenv(token_cache.ENV, "0")
    assert data.tokenize_rows(MANY, "alpaca", tok, 512, False, "rows")[1].rows == len(MANY)
    assert steps == [(2500, "tokenising rows"), 1000, 1000, 500]


@pytest.mark.parametrize("v2, v1, cores", [("150000 100000", None, 2), ("50000 100000", None, 1),
                                            ("max 100000", None, None), (None, ("100000", "100000"), 1),
                                            (None, ("-1", "100000"), None), ("garbled", None, None)])
def test_usable_cores_follow_a_container_cpu_quota(tmp_path, monkeypatch, v2, v1, cores):
    import os

    files = []
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    files.append((str(tmp_path / "cpu.max"), None))
    if v1 is not None:
        (tmp_path / "quota").write_text(v1[0] + "\n")
        (tmp_path / "period").write_text(v1[1] + "\n")
    files.append((str(tmp_path / "quota"), str(tmp_path / "period")))
    monkeypatch.setattr(parallel, "CGROUP_CPU_FILES", tuple(files))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    assert parallel.usable_cores() == (cores or 4)


def test_workers_env_and_threshold(monkeypatch):
    monkeypatch.setattr(parallel, "usable_cores", lambda: 16)
    monkeypatch.delenv(parallel.WORKERS_ENV, raising=False)
    linux = parallel.sys.platform.startswith("linux")
    assert parallel.workers(parallel.PARALLEL_MIN_ROWS - 1) == 1
    assert parallel.workers(parallel.PARALLEL_MIN_ROWS) == (parallel.MAX_WORKERS if linux else 1)
    monkeypatch.setenv(parallel.WORKERS_ENV, "1")
    assert parallel.workers(10 * parallel.PARALLEL_MIN_ROWS) == 1
    monkeypatch.setenv(parallel.WORKERS_ENV, "3")
    assert parallel.workers(10) == (3 if linux else 1)


@pytest.mark.parametrize("examples", [[{"input_ids": [1, 2], "weights": [0.5, 1.0]}],
                                      [{"input_ids": [1]}, {"labels": [1]}],
                                      [{"input_ids": [2**40]}]])
def test_save_refuses_what_it_cannot_store_exactly(cache_home, examples):
    with pytest.raises((ValueError, OverflowError)):
        token_cache.save("k" * 64, examples, {})
    assert token_cache.load("k" * 64) is None
