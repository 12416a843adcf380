"""Start-up: the commands that only read recipes (``--help``, ``methods``, ``recipes``, ``schema``,
``init``, and a ``train``/``validate`` that fails on its recipe) never import torch, transformers,
datasets or accelerate — they answer in a fraction of a second (times in docs/ci.md). Checked by
what is imported, not by a clock."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import peft_in_process

HEAVY = ("torch", "transformers", "datasets", "accelerate")
# the peftcli modules a command that only reads recipes may import (all torch-free at import)
LIGHT = {"peftcli", "peftcli.cli", "peftcli.errors", "peftcli.tokens", "peftcli.recipe", "peftcli.bundled",
         "peftcli.sources", "peftcli.smoke", "peftcli.launch", "peftcli.methods", "peftcli.methods.cards"}

BAD_RECIPES = {  # file text -> what the one-line error names
    "unknown key": ("method: {name: lora, lorra_alpha: 3}\ndata: {train: {path: x.jsonl}}\n", "method.lorra_alpha"),
    "bad value": ("method: {name: lora, r: -1}\ndata: {train: {path: x.jsonl}}\n", "method.r"),
    "bad YAML": ("method: {name: lora\n", "malformed YAML"),
    "unknown method": ("method: {name: lorax}\ndata: {train: {path: x.jsonl}}\n", "unknown method 'lorax'"),
    "missing data file": ("method: {name: lora}\ndata: {train: [{path: x.jsonl}], eval: {path: y.csv}}\n",
                          "x.jsonl: data file not found"),
    "not a path or hub id": ("method: {name: lora}\ndata: {train: {path: 'my data/'}}\n",
                             "data.train.path my data/: not a file or dir, and not a hub dataset id"),
}


def test_light_commands_import_no_torch_in_a_fresh_process(tmp_path):
    for name, (text, _) in BAD_RECIPES.items():
        (tmp_path / f"{name.replace(' ', '_')}.yaml").write_text(text)
    script = textwrap.dedent(f"""
        import json, sys
        from peftcli import cli
        codes = []
        for args in {[["--help"], ["methods"], ["recipes"], ["schema"], ["init", "lora-llama", str(tmp_path / "mine.yaml")],
                      ["train", str(tmp_path / "missing.yaml")], ["validate", str(tmp_path / "missing.yaml")]]
                     + [[cmd, str(tmp_path / f"{n.replace(' ', '_')}.yaml")] for n in BAD_RECIPES for cmd in ("train", "validate")]
                     + [["train", str(tmp_path / "unknown_key.yaml"), "--smoke"]]!r}:
            sys.argv = ["peft", *args]
            try:
                cli.run()
            except SystemExit as e:
                codes.append(e.code)
        print(json.dumps({{"codes": codes, "modules": sorted(sys.modules)}}))
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    found = json.loads(p.stdout.strip().splitlines()[-1])
    assert found["codes"] == [0] * 5 + [2] * (2 + 2 * len(BAD_RECIPES) + 1), p.stderr
    heavy = [m for m in found["modules"] if m.split(".")[0] in HEAVY]
    assert not heavy, f"imported on a path that only reads recipes: {heavy[:5]}"
    peftcli = {m for m in found["modules"] if m.startswith("peftcli")}
    assert {m for m in peftcli if not m.startswith("peftcli.methods.cards.")} <= LIGHT, sorted(peftcli - LIGHT)


@pytest.fixture
def no_heavy_imports(monkeypatch):
    """Every import of torch & co, or of a peftcli module outside :data:`LIGHT`, raises
    ImportError from here on (those loaded already by other tests included): what a command
    imports late shows up even in this process."""
    import peftcli

    for name in list(sys.modules):
        if name.split(".")[0] in HEAVY or (name.startswith("peftcli.") and name not in LIGHT
                                           and not name.startswith("peftcli.methods.cards.")):
            monkeypatch.setitem(sys.modules, name, None)
            parent, _, child = name.rpartition(".")
            if parent in ("peftcli", "peftcli.methods"):  # `from peftcli import trainer` reads the attribute first
                monkeypatch.delattr(sys.modules[parent] if parent != "peftcli" else peftcli, child, raising=False)
    for name in HEAVY:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_a_recipe_error_in_process_imports_nothing_heavy(tmp_path, capsys, no_heavy_imports, case):
    text, named = BAD_RECIPES[case]
    (tmp_path / "bad.yaml").write_text(text)
    for command in (["train"], ["validate"], ["train", "--smoke"]):
        code, err = peft_in_process([command[0], tmp_path / "bad.yaml", *command[1:]], capsys)
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, (command, err)


def test_methods_and_schema_in_process_import_nothing_heavy(capsys, no_heavy_imports):
    from peftcli.methods import CARDS

    for command in (["methods"], ["schema"], ["recipes"]):
        code, err = peft_in_process(command, capsys)
        assert code == 0, (command, err)
    assert set(CARDS) == {"lora", "qlora", "adapter", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning"}


def test_the_first_use_of_the_embedded_model_says_it_converts_once(tmp_path, monkeypatch, capsys):
    from peftcli import models

    said_before = []

    def convert(gguf, out):  # stands in for the ~30 s conversion: what stderr held when it began
        said_before.append(capsys.readouterr().err)
        (out / "config.json").parent.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setenv("PEFTCLI_HOME", str(tmp_path))
    monkeypatch.setattr(models, "package_file", lambda package, filename: tmp_path / filename)
    monkeypatch.setattr(models, "convert_gguf", convert)
    capsys.readouterr()
    first = models.resolve("smollm2-135m")
    again = models.resolve("smollm2-135m")
    out = tmp_path / "models" / "smollm2-135m-instruct"
    assert first == again == str(out) and len(said_before) == 1
    assert said_before[0] == f"converting the embedded model once ({models.CONVERT_TIME}; cached in {out})\n"
    assert capsys.readouterr().err == ""  # nothing on later runs
