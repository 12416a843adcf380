"""The module graph is the one docs/architecture.md draws: every peftcli module imports only
modules of lower layers (top-level and function-level imports alike), and no module reaches
for another module's private (_underscore) names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "peftcli"
DOC = ROOT / "docs" / "architecture.md"


def layers() -> dict[str, int]:
    """``{"trainer": 8, "methods": 2, ...}`` from the doc's ```layers block."""
    block = re.search(r"```layers\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert block, f"{DOC}: no ```layers block"
    found = {}
    for line in block.group(1).splitlines():
        m = re.match(r"\s*(\d+)\s+(.+)", line)
        if m:
            for name in re.split(r"[,\s]+", m.group(2).split("#")[0].strip()):
                if name:
                    found[name.rstrip("/")] = int(m.group(1))
    return found


def unit(module: str) -> str:
    """The unit of the graph a dotted module belongs to: ``peftcli.methods.lora`` -> ``methods``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the package (a package by its own name:
    ``peftcli.methods`` is ``peftcli/methods/__init__.py``)."""
    found = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return found


def imports(path: Path, name: str) -> list[tuple[str, list[str], int]]:
    """Every peftcli import in a file: (module, imported names, line)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("peftcli")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.startswith("peftcli"):
                found.append((module, [a.name for a in node.names], node.lineno))
    return found


def test_the_doc_names_every_module():
    known = layers()
    missing = sorted({unit(m) for m in modules()} - set(known) - {"__init__"})
    assert not missing, f"docs/architecture.md's layers block does not place: {missing}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_point_down(name):
    known = layers()
    mine = unit(name)
    for module, names, line in imports(modules()[name], name):
        # "from peftcli import data" names modules; "from peftcli import __version__" the package
        targets = [module] if module != "peftcli" else [f"peftcli.{n}" for n in names if f"peftcli.{n}" in modules()]
        for target in targets:
            theirs = unit(target)
            if theirs in ("__init__", mine):  # the version string; a unit's own files
                continue
            assert known[theirs] < known[mine], (
                f"{name}:{line} imports {target} (layer {known[theirs]}), not below {mine} (layer {known[mine]})")


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_private_names_across_modules(name):
    path = modules()[name]
    for module, names, line in imports(path, name):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{name}:{line} imports private {private} from {module}"
    known = modules()
    aliases = {}  # local name -> the peftcli module it is bound to
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peftcli"):
            for a in node.names:
                if f"{node.module}.{a.name}" in known:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                pytest.fail(f"{name}:{node.lineno} uses private {aliases[node.value.id]}.{node.attr}")


def test_no_script_shadows_a_standard_library_module():
    """A script runs with its own dir first on sys.path, so ``bench/tokenize.py`` would replace
    the standard library's ``tokenize`` for every other script there (torch's import then fails)."""
    import sys

    scripts = {p.stem: p for folder in ("bench", "docs", "tests") for p in (ROOT / folder).glob("*.py")}
    shadowing = sorted(str(scripts[name].relative_to(ROOT)) for name in set(scripts) & set(sys.stdlib_module_names))
    assert not shadowing, f"rename {shadowing}: they shadow standard library modules"
