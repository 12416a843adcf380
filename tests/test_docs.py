"""The recipe reference in docs/recipes.md is generated from the schema and kept current."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_reference_is_current():
    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert module.updated(text) == text, "run: .venv/bin/python docs/make_reference.py"
    assert "`method.dora`" in text and "`method.num_virtual_tokens`" in text
