"""Each of these has one owner in the package (issue 21): a second definition fails here, naming
where both are. Read from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "covidtl"


def _modules() -> dict[str, ast.Module]:
    return {str(path.relative_to(PACKAGE.parent)): ast.parse(path.read_text(), filename=str(path))
            for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _defined(kind: str, top_level: bool) -> dict[str, list[str]]:
    """name -> ['module.py:line', ...] for every def, class or assigned name of that kind."""
    found: dict[str, list[str]] = defaultdict(list)
    for module, tree in MODULES.items():
        nodes = tree.body if top_level else ast.walk(tree)
        for node in nodes:
            names: list[str] = []
            if kind == "def" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [node.name]
            elif kind == "class" and isinstance(node, ast.ClassDef):
                names = [node.name]
            elif kind == "name" and isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            for name in names:
                found[name].append(f"{module}:{node.lineno}")
    return found


# (what, kind, top level only): each defined exactly once in the package.
ONE_OWNER = [
    ("file_sha256", "def", False),  # covidtl.files
    ("Scored", "class", False),  # covidtl.scores
    ("model_card", "def", False),  # covidtl.cards (the report's card; card.json: training_card)
    ("training_card", "def", False),
    ("ensemble_card", "def", False),
    ("INTENDED_USE", "name", False),  # covidtl.cards
    ("PREDICTION_COLUMNS", "name", False),  # covidtl.cells, with the file's variants beside it
    ("predictions_csv", "def", True),  # covidtl.cells: predictions.csv's one writer and reader
    ("read_predictions", "def", True),
    ("p_covid", "def", True),  # covidtl.paths: p(COVID) out of softmax outputs
    ("store_lock", "def", False),  # covidtl.tracking, through covidtl.locks
    ("draw_confusion", "def", False),  # covidtl.confusion: ConfusionMatrixDisplay
]


@pytest.mark.parametrize(("name", "kind", "top_level"), ONE_OWNER, ids=[n for n, _, _ in ONE_OWNER])
def test_defined_once(name, kind, top_level):
    where = _defined(kind, top_level).get(name, [])
    assert len(where) == 1, f"{kind} {name}: defined {len(where)} times ({', '.join(where) or 'nowhere'})"


def _uses(predicate) -> list[str]:
    return [f"{module}:{node.lineno}" for module, tree in MODULES.items()
            for node in ast.walk(tree) if predicate(module, node)]


def test_predictions_csv_is_written_and_read_by_cells_alone():
    """No statement outside covidtl/cells.py both names predictions.csv and reads or writes a CSV."""
    def own_csv(module, node):
        if module == "covidtl/cells.py" or not isinstance(node, (ast.Expr, ast.Assign, ast.AnnAssign, ast.Return)):
            return False
        inside = list(ast.walk(node))
        names_file = any((isinstance(n, ast.Constant) and n.value == "predictions.csv")
                         or (isinstance(n, ast.Attribute) and n.attr == "predictions_file") for n in inside)
        csv_call = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                       and n.func.attr in ("read_csv", "to_csv") for n in inside)
        return names_file and csv_call

    assert _uses(own_csv) == [], "use covidtl.cells' write_predictions / read_predictions"


def test_only_covidtl_locks_takes_a_file_lock():
    """One lock implementation: fcntl is imported by covidtl/locks.py alone."""
    def imports_fcntl(module, node):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) else [])
        return "fcntl" in names and module != "covidtl/locks.py"

    assert not _uses(imports_fcntl), "fcntl outside covidtl.locks: take the lock with locks.hold"


def _positive_index(node) -> bool:
    """`CLASSES.index(POSITIVE)`, `paths.CLASSES.index(paths.POSITIVE)`, `...index("covid")`."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "index"
            and len(node.args) == 1):
        return False
    arg = node.args[0]
    return ((isinstance(arg, ast.Name) and arg.id == "POSITIVE")
            or (isinstance(arg, ast.Attribute) and arg.attr == "POSITIVE")
            or (isinstance(arg, ast.Constant) and arg.value == "covid"))


INDEX_NAMES = {"POS", "POSITIVE_INDEX"}


def _reads_covid_column(node) -> bool:
    """`prob[:, POS]`, `prob[..., POSITIVE_INDEX]`, `prob[positive]` and the like, read (not assigned)."""
    if not (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)):
        return False
    if (node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", None)) == "CLASSES":
        return False  # the class's name, CLASSES[POS], is no probability
    parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    return any((isinstance(p, ast.Name) and p.id in INDEX_NAMES)
               or (isinstance(p, ast.Attribute) and p.attr == "POSITIVE_INDEX") for p in parts)


def test_p_covid_is_read_in_one_place():
    """The COVID class's index is computed once, and the softmax's COVID column read once (paths)."""
    assert _uses(lambda m, n: _positive_index(n) and m != "covidtl/paths.py") == []
    assert _uses(lambda m, n: _reads_covid_column(n) and m != "covidtl/paths.py") == []


def test_confusion_matrices_are_not_drawn_by_hand():
    """A function about confusion matrices draws through draw_confusion (ConfusionMatrixDisplay)."""
    def hand_drawn(module, node):
        return (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "confusion" in node.name
                and any(isinstance(c, ast.Attribute) and c.attr == "imshow" for c in ast.walk(node)))

    assert _uses(hand_drawn) == []
