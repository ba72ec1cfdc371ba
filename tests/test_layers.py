"""The layer contracts of docs/architecture.md, as pyproject.toml's [tool.importlinter] states them.

`lint-imports` (import-linter) runs in a subprocess against a source tree given by PYTHONPATH: the
repository's `src`, or a copy with an import planted that breaks a contract. Imports inside
functions and under `if TYPE_CHECKING:` count like any other. No TensorFlow is loaded: import-linter
reads the source, it imports nothing of covidtl.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint(src: Path) -> subprocess.CompletedProcess:
    """`lint-imports pyproject.toml` from the repo root, with covidtl imported from `src`."""
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", LINT, str(PYPROJECT), "--no-cache", "--no-logo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def contracts() -> list[dict]:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]


def test_contracts_are_kept():
    done = lint(ROOT / "src")
    assert done.returncode == 0, done.stdout + done.stderr
    for contract in contracts():
        assert f"{contract['name']} KEPT" in done.stdout, done.stdout


PLANTS = {
    # module level, up from the foundation to the command line
    "module level": ("files.py", "\nimport covidtl.cli  # planted\n", "layers", "covidtl.files -> covidtl.cli"),
    # inside a function, up from the data to the training engine
    "in a function": ("data/images.py", "\n\ndef _planted():\n    from covidtl import train  # planted\n",
                      "layers", "covidtl.data.images -> covidtl.train"),
    # under TYPE_CHECKING, up from the records to the report
    "TYPE_CHECKING": ("scores.py", "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                      "    from covidtl.report import build_report  # planted\n",
                      "layers", "covidtl.scores -> covidtl.report"),
    # a step importing another step (inside a function)
    "step to step": ("cv.py", "\n\ndef _planted():\n    from covidtl import tune  # planted\n",
                     "steps", "covidtl.cv -> covidtl.tune"),
}


def planted_copy(tmp_path: Path, module: str, code: str) -> tuple[Path, Path]:
    """A copy of the package under tmp_path/src with `code` appended to covidtl/<module>: (src, that file)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "covidtl", src / "covidtl", ignore=shutil.ignore_patterns("__pycache__"))
    planted = src / "covidtl" / module
    with open(planted, "a") as f:
        f.write(code)
    return src, planted


@pytest.mark.parametrize("plant", PLANTS, ids=list(PLANTS))
def test_a_planted_import_breaks_its_contract(tmp_path, plant):
    module, code, contract_id, edge = PLANTS[plant]
    src, _ = planted_copy(tmp_path, module, code)
    done = lint(src)
    assert done.returncode == 1, done.stdout + done.stderr
    name = {c["id"]: c["name"] for c in contracts()}[contract_id]
    assert f"{name} BROKEN" in done.stdout, done.stdout
    assert re.search(rf"^- {re.escape(edge)} \(l\.\d+\)$", done.stdout, re.M), done.stdout


def test_every_ignored_import_says_why():
    """Each ignore_imports entry has a comment on the line above it (why it is there, what removes it)."""
    lines = PYPROJECT.read_text().splitlines()
    seen, inside = [], False
    for i, line in enumerate(lines):
        text = line.strip()
        if re.match(r"ignore_imports\s*=\s*\[", text):
            inside = True
        elif inside and text.startswith("]"):
            inside = False
        elif inside and text.startswith('"'):
            seen.append(text.split('"')[1])
            assert lines[i - 1].strip().startswith("#"), f"pyproject.toml line {i + 1}: {text} has no comment above"
    # every entry import-linter reads was seen here (none hides on a line with others, or inline)
    parsed = [entry for c in contracts() for entry in c.get("ignore_imports", [])]
    assert seen == parsed


def layer_modules() -> list[list[str]]:
    """The layers contract's layers, top to bottom, each as its module names."""
    (layers,) = [c["layers"] for c in contracts() if c["type"] == "layers"]
    return [[name.strip() for name in re.split(r"[:|]", layer)] for layer in layers]


def test_every_module_has_a_layer():
    """A new module is placed in a layer (else no contract sees it); only the two import-free package
    docstrings (`covidtl`, `covidtl.data`) are outside every layer."""
    placed = [name for layer in layer_modules() for name in layer]
    package = ROOT / "src" / "covidtl"
    outside = set()
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not any(module == p or module.startswith(p + ".") for p in placed):
            outside.add(module)
    assert outside == {"covidtl", "covidtl.data"}


# --------------------------------------------------------------------------- no circles
# The layers contract lets the modules of one ':' layer import each other, so it cannot see a
# circle inside a layer (data.pipeline -> data.cache -> data.pipeline): this looks for any.


def import_circles(src: Path) -> list[list[str]]:
    """The package's import circles (strongly connected modules), TYPE_CHECKING and function-level
    imports included, read from the source under `src` in a subprocess (grimp, import-linter's own)."""
    code = (
        "import json, sys, grimp\n"
        "g = grimp.build_graph('covidtl', exclude_type_checking_imports=False, cache_dir=None)\n"
        "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    return strongly_connected(json.loads(done.stdout))


def strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in edges.get(module, ()):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while component[-1:] != [module]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def test_the_package_has_no_import_circle():
    assert import_circles(ROOT / "src") == []


def test_a_planted_circle_inside_one_layer_is_found(tmp_path):
    # files and locks share the foundation layer, so the layers contract allows both directions
    src, _ = planted_copy(tmp_path, "files.py",
                          "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from covidtl.cells import Cell  # planted\n")
    assert ["covidtl.cells", "covidtl.files"] in import_circles(src)


# --------------------------------------------------------------------------- imports inside functions
# An import inside a function hides a dependency from the top of its module, so there is one only
# where it keeps something slow to load (TensorFlow, pandas ...) out of the CLI's start-up or out of a
# command that needs none, with a comment saying so.


def function_imports(src: Path):
    """(file relative to `src`, import statement, comment lines, lines of the file's function-level
    imports) for every import inside a function of covidtl under `src`."""
    for path in sorted((src / "covidtl").rglob("*.py")):
        text = path.read_text()
        with open(path, "rb") as f:
            comments = {tok.start[0] for tok in tokenize.tokenize(f.readline) if tok.type == tokenize.COMMENT}
        inside = {node for fn in ast.walk(ast.parse(text)) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
        import_lines = {n for node in inside for n in range(node.lineno, node.end_lineno + 1)}
        for node in sorted(inside, key=lambda node: node.lineno):
            yield path.relative_to(src), node, comments, import_lines, text.splitlines()


def uncommented_function_imports(src: Path) -> list[str]:
    """`file:line` of each import inside a function with no comment on its lines, nor on the line
    just above the run of imports (blank lines within it allowed) that it belongs to."""
    found = []
    for file, node, comments, import_lines, lines in function_imports(src):
        if comments & set(range(node.lineno, node.end_lineno + 1)):
            continue
        above = node.lineno - 1
        while above in import_lines or (above >= 1 and not lines[above - 1].strip()):
            above -= 1
        if above not in comments or lines[above - 1].lstrip()[:1] != "#":
            found.append(f"{file}:{node.lineno}")
    return found


def test_every_import_inside_a_function_says_why():
    assert uncommented_function_imports(ROOT / "src") == []


def test_an_uncommented_import_inside_a_function_is_found(tmp_path):
    src, planted = planted_copy(
        tmp_path, "files.py", "\n\ndef _planted():\n    import shlex\n    import json  # planted\n\n\n"
        "def _kept():\n    # here, not above: planted, with its comment\n    import shlex\n\n    import json\n")
    line = planted.read_text().splitlines().index("def _planted():") + 2  # its `import shlex`
    assert uncommented_function_imports(src) == [f"covidtl/files.py:{line}"]


# --------------------------------------------------------------------------- old module names
# Modules renamed so that their names explain them; each old name is a deprecated alias
# for one release, in its new module's layer, and nothing in the package imports it.
ALIASES = {
    "covidtl.pretrained": "covidtl.weight_records",
    "covidtl.server": "covidtl.tracking_server",
    "covidtl.metrics": "covidtl.confusion",
}


@pytest.mark.parametrize("old", ALIASES)
def test_an_old_module_name_warns_and_is_its_new_module(monkeypatch, old):
    new = importlib.import_module(ALIASES[old])
    monkeypatch.delitem(sys.modules, old, raising=False)
    message = f"{old} is {ALIASES[old]} now; this alias goes in the next release"
    with pytest.warns(DeprecationWarning, match=f"^{re.escape(message)}$"):
        module = importlib.import_module(old)
    assert module is new
    assert getattr(importlib.import_module("covidtl"), old.rsplit(".", 1)[1]) is new  # from covidtl import old


def test_an_old_module_name_shares_its_new_module_s_layer():
    for old, new in ALIASES.items():
        (layer,) = [layer for layer in layer_modules() if old in layer]
        assert new in layer, f"{old} is not in {new}'s layer"


def alias_imports(src: Path) -> list[str]:
    """`file:line` of each import of an old module name in covidtl under `src`."""
    found = []
    for path in sorted((src / "covidtl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            if any(name == old or name.startswith(old + ".") for name in names for old in ALIASES):
                found.append(f"{path.relative_to(src)}:{node.lineno}")
    return found


def test_nothing_in_the_package_imports_an_old_module_name(tmp_path):
    assert alias_imports(ROOT / "src") == []
    src, planted = planted_copy(tmp_path, "cards.py", "\nfrom covidtl import pretrained  # planted\n")
    line = planted.read_text().splitlines().index("from covidtl import pretrained  # planted") + 1
    assert alias_imports(src) == [f"covidtl/cards.py:{line}"]
