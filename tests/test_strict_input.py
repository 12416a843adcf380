"""Strict input (issue 16, item 4): duplicate YAML keys, near-miss and other tools' key names,
and command-line usage errors are each one line on stderr with exit 2, never a silent choice or
a usage box."""

import subprocess
import sys

import pytest

from peftcli.errors import UserError
from peftcli.recipe import load_recipe

BASE = "model:\n  name_or_path: tiny\nmethod:\n  name: lora\ndata:\n  train: {path: x.jsonl}\n"


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_duplicate_key_names_both_lines(tmp_path):
    path = write(tmp_path, BASE + "train:\n  lr: 1.0e-4\ntrain:\n  lr: 1.0\n")  # YAML alone keeps the last
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}:9: duplicate key 'train' (first at line 7); keep one"
    nested = write(tmp_path, BASE.replace("  name: lora\n", "  name: lora\n  r: 8\n  r: 16\n"))
    with pytest.raises(UserError, match=r"recipe.yaml:6: duplicate key 'r' \(first at line 5\)"):
        load_recipe(nested)


@pytest.mark.parametrize("section, key, hint", [
    ("method", "lora_alpha", "did you mean method.alpha? lora_alpha is another tool's name for it"),
    ("method", "lora_r", "did you mean method.r?"),
    ("method", "lora_dropout", "did you mean method.dropout?"),
    ("train", "sequence_len", "did you mean data.max_seq_len?"),
    ("train", "learning_rate", "did you mean train.lr?"),
    ("train", "num_epochs", "did you mean train.epochs?"),
    ("train", "gradient_accumulation_steps", "did you mean train.grad_accum?"),
    ("method", "alpah", "did you mean method.alpha?"),  # a near miss of our own key
    ("train", "micro_batch_sise", "did you mean train.micro_batch_size?"),
])
def test_unknown_keys_say_which_key_was_meant(tmp_path, section, key, hint):
    text = BASE.replace("  name: lora\n", f"  name: lora\n  {key}: 3\n") if section == "method" else BASE + f"train:\n  {key}: 3\n"
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, text))
    assert str(e.value).startswith(f"{section}.{key}: unknown key (") and hint in str(e.value)


def test_a_key_nothing_is_close_to_gets_no_guess(tmp_path):
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, BASE + "train:\n  zzqx: 3\n"))
    assert str(e.value) == "train.zzqx: unknown key"


@pytest.mark.parametrize("args, needle", [
    (["validate", "R", "--set", "train.max_steps", "3"], "unexpected extra argument(s) (3); --set takes KEY=VALUE in one argument"),
    (["train", "R", "--bogus"], "No such option: --bogus"),
    (["merge", "somewhere"], "Missing option '-o'"),
])
def test_usage_errors_are_one_line(tmp_path, args, needle):
    recipe = write(tmp_path, BASE)
    args = [str(recipe) if a == "R" else a for a in args]
    p = subprocess.run([sys.executable, "-m", "peftcli.cli", *args], capture_output=True, text=True, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and needle in lines[0] and f"peft {args[0]} --help" in lines[0]


def test_set_reaches_an_item_of_a_source_list_by_the_index_errors_name():
    """``--set data.train[1].columns.output=reply``: the key as errors write it (found by the
    issue-17 trial: no way to set one source of a list)."""
    from peftcli.recipe import apply_overrides

    recipe = {"data": {"train": [{"path": "a.jsonl"}, {"path": "b.csv"}]}, "train": {"lr": 1e-3}}
    apply_overrides(recipe, ["data.train[1].columns.output=reply", "data.train[0].weight=2", "train.max_steps=3"])
    assert recipe == {"data": {"train": [{"path": "a.jsonl", "weight": 2}, {"path": "b.csv", "columns": {"output": "reply"}}]},
                      "train": {"lr": 1e-3, "max_steps": 3}}
    for bad, said in [("data.train[2].weight=2", "data.train has 2 items"), ("data.train.weight=2", "data.train is not a section"),
                      ("train[0]=1", "train is not a list"), ("train.lr.x=1", "train.lr is not a section"),
                      ("a..b=1", "cannot read the key part ''")]:
        with pytest.raises(UserError) as e:
            apply_overrides(recipe, [bad])
        assert str(e.value).startswith(f"--set {bad}: {said}"), str(e.value)
