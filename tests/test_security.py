"""Security rules (issue 5): weights only from safetensors, torch.load with weights_only, YAML with
safe_load, no remote code unless the recipe asks, no reading or writing outside the named places."""

import ast
from pathlib import Path

import yaml
from helpers import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.recipe import load_recipe

SOURCES = sorted((Path(__file__).parent.parent / "peftcli").rglob("*.py"))


def _calls(name: str):
    """(file, line, call) for every call of ``a.b`` spelled ``name`` in the package."""
    owner, attr = name.split(".")
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            f = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(f, ast.Attribute) and f.attr == attr and \
                    isinstance(f.value, ast.Name) and f.value.id == owner:
                yield path.name, node.lineno, node


def test_torch_load_always_weights_only():
    calls = list(_calls("torch.load"))
    assert calls  # optimizer / scheduler / RNG state of checkpoints
    for file, line, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, f"{file}:{line}"


def test_yaml_only_through_safe_load():
    assert not list(_calls("yaml.load")) and not list(_calls("yaml.unsafe_load")) and not list(_calls("yaml.full_load"))
    assert list(_calls("yaml.safe_load"))


def test_pickle_is_never_imported():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "pickle" not in names | modules and "dill" not in names | modules, path.name


def test_remote_code_is_off_unless_the_recipe_sets_it(tmp_path):
    recipe = yaml.safe_load((Path(__file__).parent.parent / "peftcli" / "recipes" / "lora-llama.yaml").read_text())
    assert load_recipe(write_recipe(tmp_path / "r.yaml", recipe)).model.trust_remote_code is False
    recipe["model"]["trust_remote_code"] = True
    assert load_recipe(write_recipe(tmp_path / "r.yaml", recipe)).model.trust_remote_code is True


def test_init_takes_a_recipe_name_not_a_path(tmp_path):
    outside = tmp_path / "secret.yaml"
    outside.write_text("model: {}\n")
    for name in (f"../../../../../../{outside.with_suffix('')}", str(outside), "../recipes/lora-llama"):
        result = CliRunner().invoke(app, ["init", name, str(tmp_path / "copy.yaml")])
        assert result.exit_code == 2 and "no bundled recipe" in result.output, name
        assert not (tmp_path / "copy.yaml").exists()
