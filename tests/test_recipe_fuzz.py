"""Recipe loading under random input (hypothesis) and the published JSON Schema (`peft schema`)."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.errors import UserError
from peftcli.methods import METHODS
from peftcli.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "peftcli" / "recipes").glob("*.yaml"))
BASE = yaml.safe_load(RECIPES[0].read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["lora", "qlora", "ia3", "adapter", "prompt_tuning", "p_tuning",
                                                           "prefix_tuning", "nf4", "fp4", "all-linear", "auto", "no"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
KEYS = [(section, key) for section, body in BASE.items() for key in body] + [
    ("method", k) for k in ("r", "alpha", "dropout", "variant", "num_virtual_tokens", "init", "dora", "rslora", "layers",
                            "reduction_factor", "encoder", "projection", "target_modules", "feedforward_modules")] + [
    ("train", k) for k in ("epochs", "grad_accum", "keep_checkpoints", "report_to", "mixed_precision", "seed")] + [
    ("data", k) for k in ("eval_split", "padding_free", "packing", "train_on_prompt", "max_samples")]


@st.composite
def recipes(draw):
    """A bundled recipe with some keys replaced, removed or added, or sections replaced wholesale."""
    recipe = json.loads(json.dumps(BASE))
    for section, key in draw(st.lists(st.sampled_from(KEYS), max_size=4)):
        action = draw(st.sampled_from(["set", "delete", "section"]))
        if action == "set" and isinstance(recipe.get(section), dict):
            recipe[section][key] = draw(values)
        elif action == "delete" and isinstance(recipe.get(section), dict):
            recipe[section].pop(key, None)
        else:
            recipe[section] = draw(values)
    if draw(st.booleans()):
        recipe[draw(st.text(max_size=6))] = draw(values)
    return recipe


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=recipes(), overrides=st.lists(st.text(max_size=20), max_size=2))
def test_random_recipes_load_or_raise_a_user_error(tmp_path, recipe, overrides):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    try:
        load_recipe(path, overrides)
    except UserError as e:
        assert "\n" not in str(e).strip() or str(e).count("\n") < 3  # one short message, no traceback text
    # anything else (KeyError, TypeError, pydantic's ValidationError, ...) fails the test


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_random_yaml_text_loads_or_raises_a_user_error(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_recipe(path)
    except UserError:
        pass


def test_schema_validates_every_bundled_recipe_and_rejects_unknown_keys():
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert set(schema["properties"]) == {"model", "method", "data", "train", "output"}
    assert set(schema["properties"]["method"]["discriminator"]["mapping"]) == set(METHODS)  # every registered method
    for path in RECIPES:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)  # the independent validator agrees
    bad = json.loads(json.dumps(BASE))
    bad["method"]["lorra_alpha"] = 16
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
