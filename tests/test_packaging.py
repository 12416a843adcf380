"""Packaging: the bundled recipes and their task data are inside the package, so a wheel ships
them; ``peft recipes`` lists those (a ``recipes/`` folder in the cwd only with ``--dir``) and
``peft init`` writes a recipe whose data paths work from any directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml
from helpers import peft_in_process

from peftcli import bundled
from peftcli.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted((ROOT / "peftcli" / "recipes").glob("*.yaml"))


def data_paths(recipe: Path) -> list[str]:
    """The ``data.train`` / ``data.eval`` paths a recipe file names."""
    data = yaml.safe_load(recipe.read_text())["data"]
    return [data[k]["path"] for k in ("train", "eval") if data.get(k)]


def test_the_wheel_ships_every_bundled_recipe_and_its_data(tmp_path):
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "peftcli", src / "peftcli", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (wheel,) = (tmp_path / "dist").glob("peftcli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert BUNDLED and {f"peftcli/recipes/{r.name}" for r in BUNDLED} <= names
    wanted = {path for r in BUNDLED for path in data_paths(r)}
    assert wanted and all(path.startswith(bundled.DATA_PREFIX) for path in wanted)  # how init finds them
    assert wanted <= names, sorted(wanted - names)
    assert "peftcli/recipes/data/README.md" in names and "peftcli/methods/cards/lora.py" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "recipes/"))]


def test_recipes_lists_the_bundled_ones_not_a_recipes_folder_here(tmp_path, monkeypatch, capsys):
    from peftcli import cli

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("method: {name: ia3}\ndata: {train: {path: x.jsonl}}\n")
    monkeypatch.chdir(tmp_path)
    for args, want in ((["recipes"], [(r.stem, r) for r in BUNDLED]),
                       (["recipes", "--dir", "recipes"], [("mine", Path("recipes") / "mine.yaml")])):
        capsys.readouterr()
        cli.app(args, standalone_mode=False, prog_name="peft")
        listed = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert [(name, Path(path)) for name, _, path in listed] == want
    code, err = peft_in_process(["recipes", "--dir", tmp_path / "nope"], capsys)
    assert code == 2 and "--dir" in err and "not a directory" in err


def test_init_writes_a_recipe_that_runs_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no recipes/ here, and not the project root
    code, err = peft_in_process(["init", "lora-llama", "mine.yaml"], capsys)
    assert code == 0, err
    copied = (tmp_path / "mine.yaml").read_text()
    source = (ROOT / "peftcli" / "recipes" / "lora-llama.yaml").read_text()
    assert copied == source.replace(f"path: {bundled.DATA_PREFIX}", f"path: {ROOT}/{bundled.DATA_PREFIX}")
    load_recipe(tmp_path / "mine.yaml")  # valid as written
    paths = data_paths(tmp_path / "mine.yaml")
    assert len(paths) == 2 and all(Path(path).is_absolute() and Path(path).is_file() for path in paths)
