"""docs/code-map.md names every module of src/chatforge, and no module that is gone."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_code_map_lists_every_module_and_only_existing_ones():
    src = ROOT / "src" / "chatforge"
    modules = {str(p.relative_to(src)) for p in src.rglob("*.py")}
    listed = set(re.findall(r"^- `([\w/]+\.py)`:", (ROOT / "docs" / "code-map.md").read_text(), re.M))
    # a package's __init__ whose docstring only names the package may be left out
    bare = {
        m
        for m in modules
        if m.endswith("/__init__.py")
        and ast.get_docstring(ast.parse((src / m).read_text())) == "chatforge." + m.split("/")[0]
    }
    assert modules - listed - bare == set(), "modules missing from docs/code-map.md"
    assert listed - modules == set(), "docs/code-map.md lists modules that do not exist"
