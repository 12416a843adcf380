"""The bundled recipes (``recipes/*.yaml``): where they are, listing them, and copying one to
start from (``peft recipes``, ``peft init``)."""

from __future__ import annotations

import re
from pathlib import Path

from peftcli.errors import UserError
from peftcli.recipe import read_yaml


def recipes_dir() -> Path:
    """The bundled recipes: ./recipes, else the one beside the installed package."""
    here = Path("recipes")
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


def recipes() -> list[tuple[str, str, Path]]:
    """(name, method, file) of every bundled recipe, by name.

    Raises:
        UserError: a bundled recipe that is not valid YAML (names the file).
    """
    return [(p.stem, (read_yaml(p).get("method") or {}).get("name", "?"), p) for p in sorted(recipes_dir().glob("*.yaml"))]


def absolute_data_paths(text: str, root: Path) -> str:
    """``text`` of a bundled recipe with each ``path: recipes/...`` that names a file under
    ``root`` rewritten to that file's absolute path (comments and layout kept)."""
    def absolute(m: re.Match) -> str:
        target = root / m.group(2)
        return m.group(1) + str(target) if target.is_file() else m.group(0)

    return re.sub(r"(\bpath:\s*)(recipes/[^\s,}]+)", absolute, text)


def copy_recipe(name: str, dest: Path) -> Path:
    """Copy the bundled recipe ``name`` to ``dest`` (a file, or a dir to put it in) with its
    data paths made absolute (:func:`absolute_data_paths`), so the copy works from any
    directory. Returns the file written.

    Raises:
        UserError: no bundled recipe of that name (a name, never a path), ``dest`` exists, or it
        cannot be written.
    """
    bundled = {p.stem: p for p in recipes_dir().glob("*.yaml")}
    src = bundled.get(name.removesuffix(".yaml"))  # a name, never a path: "../x" finds nothing
    if src is None:
        raise UserError(f"no bundled recipe {name!r} (choose from {', '.join(sorted(bundled))})")
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise UserError(f"{dest}: already exists")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(absolute_data_paths(src.read_text(), recipes_dir().resolve().parent))
    except OSError as e:
        raise UserError(f"{dest}: cannot write ({e.strerror})") from None
    return dest
