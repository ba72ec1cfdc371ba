"""The package modules a `covidtl` command line runs: the import closure of its click command.

Read from the source with `ast`, so that it follows a split or renamed module without a list to
keep. Every import statement of a module reached counts, at module level or inside a function (a
function's import runs when the function does), except those under `if TYPE_CHECKING:` (never
run), those inside the function of a command not invoked, and the group's imports of the files of
commands not invoked (made only to register them).
"""

from __future__ import annotations

import ast
import functools
import inspect
import shlex
from pathlib import Path

import click

SRC = Path(__file__).parents[1] / "src"
PACKAGE = "covidtl"


def module_file(name: str, src: Path = SRC) -> Path | None:
    """The source file of a module of the package, or None (a name inside a module, or outside)."""
    if name.split(".")[0] != PACKAGE:
        return None
    base = src.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def package_modules() -> set[str]:
    """Every module of the package, by dotted name."""
    return {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
            for p in (SRC / PACKAGE).rglob("*.py")}


def invoked(argv: str, group: click.Group) -> list[click.Command]:
    """The click commands a `covidtl ...` command line runs, the group first (`covidtl cache prune`: three)."""
    chain, command = [group], group
    words = shlex.split(argv)[1:]
    while words and isinstance(command, click.Group):
        word = words.pop(0)
        if word.startswith("-"):
            if word in ("-S", "--set", "--params"):  # the group's options that take a value
                words.pop(0)
            continue
        command = command.commands[word]
        chain.append(command)
    return chain


def every_command(group: click.Group) -> list[click.Command]:
    """The group and every command under it that has a function."""
    found = [c for sub in group.commands.values()
             for c in (every_command(sub) if isinstance(sub, click.Group) else [sub])]
    return [c for c in [group, *found] if c.callback is not None]


def _function_name(command: click.Command) -> tuple[str, str]:
    function = inspect.unwrap(command.callback)
    return function.__module__, function.__name__


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _skipped_nodes(tree: ast.Module, not_run: frozenset[str]) -> set[int]:
    """The nodes of `if TYPE_CHECKING:` blocks and of the module's functions named in `not_run`."""
    blocks = [n.body for n in ast.walk(tree) if isinstance(n, ast.If) and _is_type_checking(n.test)]
    blocks += [[n] for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in not_run]
    return {id(node) for block in blocks for statement in block for node in ast.walk(statement)}


@functools.cache
def imports_of(module: str, not_run: frozenset[str] = frozenset(), src: Path = SRC) -> frozenset[str]:
    """The package's modules that `module`'s code imports, less the functions named in `not_run`."""
    path = module_file(module, src)
    tree = ast.parse(path.read_text(), str(path))
    skipped = _skipped_nodes(tree, not_run)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level - 1` above this module's
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + [node.module] if node.module else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return frozenset(name for name in names if module_file(name, src))


def closure(argv: str) -> set[str]:
    """The package's modules that the command line `argv` (`covidtl -S k=v train ...`) imports."""
    from covidtl.cli import main

    assert Path(inspect.getfile(inspect.unwrap(main.callback))).is_relative_to(SRC), (
        "run with PYTHONPATH=src: the closure is read from this checkout's source")
    return set(_closure(tuple(_function_name(c) for c in invoked(argv, main))))


@functools.cache
def _closure(run: tuple[tuple[str, str], ...]) -> frozenset[str]:
    """The closure of the command functions `run` (module, name), the group's first."""
    from covidtl.cli import main

    not_run: dict[str, frozenset[str]] = {}
    for command in every_command(main):
        module, function = _function_name(command)
        if (module, function) not in run:
            not_run[module] = not_run.get(module, frozenset()) | {function}
    # The group's file imports the files of the commands not invoked only to register them.
    registered_only = set(not_run) - {module for module, _ in run}
    seen: set[str] = set()
    todo = [module for module, _ in run]
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for name in [".".join(parts[:i]) for i in range(1, len(parts) + 1)]:  # importing a.b runs a first
            if name not in seen:
                seen.add(name)
                imported = imports_of(name, not_run.get(name, frozenset()))
                todo.extend(imported - registered_only if name == main.callback.__module__ else imported)
    return frozenset(seen)


def source_files(modules: set[str]) -> set[str]:
    """The modules' files, relative to the repository root (as dvc.yaml names them)."""
    return {module_file(m).relative_to(SRC.parent).as_posix() for m in modules}
