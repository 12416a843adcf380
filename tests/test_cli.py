"""The command line: user errors exit 2 with one line naming the problem, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PEFT = str(Path(sys.executable).with_name("peft"))
ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT):
    return subprocess.run([PEFT, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def write(tmp_path, text, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


GOOD = """\
model: {{name_or_path: {model}, dtype: float32}}
method: {{name: lora, r: 4, alpha: 8}}
data:
  train: {{path: {data}, format: alpaca}}
train: {{max_steps: 1}}
output: {{dir: {out}}}
"""


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps({"instruction": "Add.", "input": "1 + 1", "output": "2"}) + "\n")
    return str(p)


@pytest.mark.parametrize("edit, expect", [
    (lambda r: r.replace("alpha: 8", "lorra_alpha: 8"), "method.lorra_alpha: unknown key (did you mean method.alpha?)"),
    (lambda r: r.replace("r: 4", "r: -4"), "method.r:"),
    (lambda r: r.replace("max_steps: 1", "max_steps: many"), "train.max_steps:"),
    (lambda r: r.replace("name: lora", "name: loraa"), "method.name: unknown method 'loraa'"),
    (lambda r: r + "trainer: {}\n", "trainer: unknown key"),
    (lambda r: r.replace("format: alpaca", "format: vicuna"), "data.train.format:"),
])
def test_bad_recipe_exits_2_with_one_line(tmp_path, data_file, edit, expect):
    recipe = write(tmp_path, edit(GOOD.format(model="smollm2-135m", data=data_file, out=tmp_path / "run")))
    p = run("train", recipe)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_malformed_yaml_names_file_and_line(tmp_path):
    recipe = write(tmp_path, "model:\n  name_or_path: x\nmethod: [lora\ndata: {}\n")
    p = run("train", recipe)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and f"{recipe}:4" in p.stderr and "malformed YAML" in p.stderr


def test_missing_files_exit_2(tmp_path, tiny_dir, data_file):
    p = run("train", str(tmp_path / "nope.yaml"))
    assert p.returncode == 2 and "nope.yaml: recipe file not found" in p.stderr
    recipe = write(tmp_path, GOOD.format(model=tiny_dir, data=tmp_path / "missing.jsonl", out=tmp_path / "run"))
    p = run("train", recipe)
    assert p.returncode == 2 and "missing.jsonl" in p.stderr and "Traceback" not in p.stderr
    recipe = write(tmp_path, GOOD.format(model=tmp_path / "no-model", data=data_file, out=tmp_path / "run"), "r2.yaml")
    p = run("train", recipe)
    assert p.returncode == 2 and "no-model" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_set_override_is_applied_and_validated(tmp_path, data_file, tiny_dir):
    recipe = write(tmp_path, GOOD.format(model=tiny_dir, data=data_file, out=tmp_path / "run"))
    p = run("train", recipe, "--set", "method.lorra=3")
    assert p.returncode == 2 and "method.lorra: unknown key" in p.stderr
    p = run("train", recipe, "--set", "train.max_steps=2", "--set", "train.log_every=1", "--set", "train.mixed_precision=no")
    assert p.returncode == 0, p.stderr
    resolved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "max_steps: 2" in resolved and "lr: 0.0002" in resolved
    # the data has 1 row: the default micro-batch of 4 holds it, said and recorded
    assert "note: train.micro_batch_size 4 is more than the 1 train example; micro-batches hold 1" in p.stderr
    assert "micro_batch_size: 1" in resolved
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["examples_per_step"] == 1


def test_methods_recipes_init(tmp_path):
    p = run("methods")
    assert p.returncode == 0 and "lora" in p.stdout and "qlora" in p.stdout and "Hu et al. 2021" in p.stdout
    p = run("recipes")
    assert p.returncode == 0 and "qlora-llama" in p.stdout and "lora-llama" in p.stdout
    p = run("init", "qlora-llama", str(tmp_path / "mine.yaml"))
    # the copy is the bundled recipe with its data paths absolute, so it works from any directory
    bundled, copied = (ROOT / "peftcli" / "recipes" / "qlora-llama.yaml").read_text(), (tmp_path / "mine.yaml").read_text()
    assert p.returncode == 0 and copied == bundled.replace("path: peftcli/recipes/", f"path: {ROOT.resolve()}/peftcli/recipes/")
    data = yaml.safe_load(copied)["data"]
    assert all(Path(data[k]["path"]).is_absolute() and Path(data[k]["path"]).is_file() for k in ("train", "eval"))
    p = run("init", "nope", str(tmp_path / "x.yaml"))
    assert p.returncode == 2 and "nope" in p.stderr
    p = run("init", "lora-llama", str(tmp_path / "new" / "dir" / "mine.yaml"))  # parents are made
    assert p.returncode == 0 and (tmp_path / "new" / "dir" / "mine.yaml").is_file()
    (tmp_path / "file").write_text("")
    p = run("init", "lora-llama", str(tmp_path / "file" / "mine.yaml"))  # a parent that is a file
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "cannot write" in p.stderr


def test_hub_id_without_hub_access_exits_2(tmp_path, data_file):
    # no network here (CI): one line saying so, quickly, not the hub client's retries and traceback
    recipe = write(tmp_path, GOOD.format(model="someorg/some-model", data=data_file, out=tmp_path / "run"))
    p = run("train", recipe)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.name_or_path: 'someorg/some-model'" in lines[0]


def test_missing_local_model_dir_is_named(tmp_path, data_file):
    recipe = write(tmp_path, GOOD.format(model=tmp_path / "nomodel", data=data_file, out=tmp_path / "run"))
    p = run("train", recipe)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: model.name_or_path: {tmp_path / 'nomodel'}: no such dir (aliases: smollm2-135m)"]


def test_data_errors_are_reported_before_the_model_loads(tmp_path, tiny_dir):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    # only the tokenizer is needed to check the data: the error comes alone, before any model output
    recipe = write(tmp_path, GOOD.format(model=tiny_dir, data=bad, out=tmp_path / "run"))
    p = run("train", recipe)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"error: {bad}:2: malformed JSON: Expecting value (column 32)"]
