"""The bundled recipes and their task data, inside the package (``peftcli/recipes/*.yaml`` and
``peftcli/recipes/data/``, shipped in the wheel): listing them, listing a folder of one's own,
and copying one to start from (``peft recipes [--dir DIR]``, ``peft init``)."""

from __future__ import annotations

import re
from pathlib import Path

from peftcli.errors import UserError
from peftcli.recipe import read_yaml

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the dir that holds peftcli/: a checkout or site-packages
DATA_PREFIX = "peftcli/recipes/"  # how a bundled recipe names its data: relative to PACKAGE_ROOT


def recipes_dir() -> Path:
    """The bundled recipes: ``recipes/`` inside the installed package (never the cwd's)."""
    return PACKAGE_ROOT / "peftcli" / "recipes"


def recipes(folder: Path | None = None) -> list[tuple[str, str, Path]]:
    """(name, method, file) of every recipe in ``folder`` (default: the bundled ones), by name.

    Raises:
        UserError: ``folder`` is not a dir; a recipe that is not valid YAML (names the file).
    """
    folder = recipes_dir() if folder is None else Path(folder)
    if not folder.is_dir():
        raise UserError(f"--dir {folder}: not a directory")
    return [(p.stem, (read_yaml(p).get("method") or {}).get("name", "?"), p) for p in sorted(folder.glob("*.yaml"))]


def absolute_data_paths(text: str, root: Path = PACKAGE_ROOT) -> str:
    """``text`` of a bundled recipe with each ``path: peftcli/recipes/...`` that names a file
    under ``root`` rewritten to that file's absolute path (comments and layout kept)."""
    def absolute(m: re.Match) -> str:
        target = root / m.group(2)
        return m.group(1) + str(target) if target.is_file() else m.group(0)

    return re.sub(rf"(\bpath:\s*)({re.escape(DATA_PREFIX)}[^\s,}}]+)", absolute, text)


def copy_recipe(name: str, dest: Path) -> Path:
    """Copy the bundled recipe ``name`` to ``dest`` (a file, or a dir to put it in) with its
    data paths made absolute (:func:`absolute_data_paths`: the task data inside the installed
    package), so the copy works from any directory. Returns the file written.

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
        dest.write_text(absolute_data_paths(src.read_text()))
    except OSError as e:
        raise UserError(f"{dest}: cannot write ({e.strerror})") from None
    return dest
