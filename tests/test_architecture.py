"""The package's shape, checked the way its reviewer reads it (docs/architecture.md, "Rules
between modules"): short functions, imports at the top pointing down the layers, SQL in the two
store modules, and a package that never reaches into the checkout it was built from.

Everything here reads the source with :mod:`ast`; only the last test imports the package, in a
child process, to see which heavy libraries the service's import pulls in.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mailrouter"

MAX_FUNCTION_LINES = 60

# Libraries too heavy (hundreds of MB or seconds to import) to load unless the work needs them:
# they are imported inside the function that uses them, with a comment that says so.
HEAVY = frozenset({"mlx", "mlx_lm", "sklearn", "llama_cpp", "torch", "transformers"})
# Array code (numpy and the GGUF writer on it) is fine at the top of training and baseline
# modules, but makes them heavy to import: the service never loads it until it needs it.
ARRAYS = frozenset({"numpy", "gguf"})

# Each module's layer, by its dotted name or the package it lives in (longest prefix wins).
# Imports point down: a module imports from its own layer or one below, never above.
LAYERS: dict[str, int] = {
    # core: settings, types, pure decisions, stores, and the foundations under them
    "mailrouter": 0,
    **dict.fromkeys(
        (
            "mailrouter.errors",
            "mailrouter.logs",
            "mailrouter.keychain",
            "mailrouter.files",
            "mailrouter.backoff",
            "mailrouter.datalock",
            "mailrouter.config",
            "mailrouter.message",
            "mailrouter.prediction",
            "mailrouter.prompt",
            "mailrouter.chat_template",
            "mailrouter.tokens",
            "mailrouter.router",
            "mailrouter.automated",
            "mailrouter.rules",
            "mailrouter.dataset",
            "mailrouter.state",
            "mailrouter.calibration",
        ),
        0,
    ),
    # adapters: one outside system each
    **dict.fromkeys(("mailrouter.mail", "mailrouter.classify"), 1),
    # orchestration
    **dict.fromkeys(("mailrouter.pipeline", "mailrouter.corrections", "mailrouter.training"), 2),
    # application (docs/architecture.md's table; importers read mail files with mail.parse)
    **dict.fromkeys(
        (
            "mailrouter.importers",
            "mailrouter.wiring",
            "mailrouter.reprocess",
            "mailrouter.service",
            "mailrouter.scheduling",
            "mailrouter.status",
            "mailrouter.doctor",
            "mailrouter.demo",
            "mailrouter.selftest",
            "mailrouter.deploy",
            "mailrouter.localservers",
        ),
        3,
    ),
    # the command line
    "mailrouter.cli": 4,
    "mailrouter.__main__": 4,
}
LAYER_NAMES = ("core", "adapters", "orchestration", "application", "cli")

# The orchestration packages stay apart; corrections plug into the pipeline only through its
# narrow types and the forward's composition (wiring.py hands the pipeline its handlers).
ORCHESTRATION = ("mailrouter.pipeline", "mailrouter.corrections", "mailrouter.training")
ALLOWED_ACROSS = {
    "mailrouter.corrections": ("mailrouter.pipeline.types", "mailrouter.pipeline.compose")
}

SQL = re.compile(
    r"\b(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
    r"(CREATE|ALTER|DROP)\s+(TABLE|INDEX))\b",
    re.DOTALL,
)
SQL_HOMES = ("mailrouter/state.py", "mailrouter/training/registry.py")


@dataclass(frozen=True)
class Module:
    name: str  # mailrouter.pipeline.intake
    path: Path
    source: str
    tree: ast.Module

    @property
    def relpath(self) -> str:
        return self.path.relative_to(REPO).as_posix()

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


@dataclass(frozen=True)
class Import:
    module: Module
    node: ast.Import | ast.ImportFrom
    where: str  # "top", "type-checking" or "function"

    @property
    def targets(self) -> list[str]:
        """The absolute names imported: ``pkg.mod`` for a module, ``pkg.mod`` for a name in it."""
        if isinstance(self.node, ast.Import):
            return [alias.name for alias in self.node.names]
        base = self.node.module or ""
        if self.node.level:
            parts = self.module.name.split(".")
            if not self.module.is_package:
                parts = parts[:-1]
            parts = parts[: len(parts) - (self.node.level - 1)]
            base = ".".join([*parts, *([base] if base else [])])
        names = [f"{base}.{alias.name}" for alias in self.node.names]
        return [name if name in _module_names() else base for name in names]

    @property
    def own(self) -> list[str]:
        return [t for t in self.targets if t == "mailrouter" or t.startswith("mailrouter.")]

    @property
    def where_text(self) -> str:
        return f"{self.module.relpath}:{self.node.lineno}"


@functools.cache
def modules() -> tuple[Module, ...]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        source = path.read_text(encoding="utf-8")
        found.append(Module(".".join(parts), path, source, ast.parse(source, str(path))))
    return tuple(found)


@functools.cache
def _module_names() -> frozenset[str]:
    return frozenset(m.name for m in modules())


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports_in(module: Module, node: ast.AST, where: str) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield Import(module, child, where)
            continue
        inner = where
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inner = "function"
        elif _is_type_checking(child) and where == "top":
            inner = "type-checking"
        yield from _imports_in(module, child, inner)


def imports() -> Iterator[Import]:
    for module in modules():
        yield from _imports_in(module, module.tree, "top")


def layer(name: str) -> int:
    """The layer of a module, from its own entry or its package's (the package root's entry
    is its ``__init__`` only: a new top-level module must be placed)."""
    parts = name.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    if name in LAYERS:
        return LAYERS[name]
    raise KeyError(name)


def _commented_imports(module: Module) -> set[int]:
    """Line numbers of imports that carry a comment: on their own lines, on the line just
    above, or anywhere in the run of imports they belong to (one comment for a group)."""
    lines = module.source.splitlines()
    commented: set[int] = set()
    for node in ast.walk(module.tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        runs: list[list[ast.stmt]] = []
        for stmt in body:
            is_import = isinstance(stmt, ast.Import | ast.ImportFrom)
            if is_import and runs and runs[-1] and _follows(runs[-1][-1], stmt):
                runs[-1].append(stmt)
            elif is_import:
                runs.append([stmt])
        for run in runs:
            first, last = run[0].lineno, run[-1].end_lineno or run[-1].lineno
            if any("#" in lines[n - 1] for n in range(max(first - 1, 1), last + 1)):
                commented.update(stmt.lineno for stmt in run)
    return commented


def _follows(previous: ast.stmt, stmt: ast.stmt) -> bool:
    return isinstance(previous, ast.Import | ast.ImportFrom) and stmt.lineno == (
        (previous.end_lineno or previous.lineno) + 1
    )


# --- functions -------------------------------------------------------------------------------


def test_no_function_over_60_lines() -> None:
    """Counted as the reviewer counts: from ``def`` to the last line of the body, docstring in."""
    long = []
    for module in modules():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{module.relpath}:{node.lineno} {node.name}: {size} lines")
    assert not long, "split these along their seams:\n" + "\n".join(long)


# --- imports ---------------------------------------------------------------------------------


@functools.cache
def heavy_modules() -> frozenset[str]:
    """The project's modules that load array code or a heavy library when imported: those that
    import one at their top, and those that import such a module at theirs."""
    edges: dict[str, set[str]] = {}
    heavy = set()
    for imp in imports():
        if imp.where != "top":
            continue
        if any(t.split(".")[0] in HEAVY | ARRAYS for t in imp.targets):
            heavy.add(imp.module.name)
        for target in imp.own:
            edges.setdefault(target, set()).add(imp.module.name)
    todo = list(heavy)
    while todo:
        for importer in edges.get(todo.pop(), ()):
            if importer not in heavy:
                heavy.add(importer)
                todo.append(importer)
    return frozenset(heavy)


def _lazy_for_weight(imp: Import) -> bool:
    return all(t in heavy_modules() for t in imp.own) and imp.node.lineno in _commented_imports(
        imp.module
    )


def test_own_imports_are_at_the_top() -> None:
    """An import of the project inside a function or behind ``TYPE_CHECKING`` hides the real
    dependency graph; a cycle it works around is a design problem to solve, not to hide. The
    one exception is a module heavy to import (array code), with a comment saying so."""
    hidden = [
        f"{imp.where_text} ({imp.where}): {ast.unparse(imp.node)}"
        for imp in imports()
        if imp.where != "top" and imp.own and not _lazy_for_weight(imp)
    ]
    assert not hidden, "move these to the top of their module:\n" + "\n".join(hidden)


def test_a_lazy_import_says_why() -> None:
    """Outside libraries may be imported where they are used only for their weight (or because
    they are optional), and then a comment on the import says so."""
    silent = [
        f"{imp.where_text}: {ast.unparse(imp.node)}"
        for imp in imports()
        if imp.where == "function"
        and not imp.own
        and imp.node.lineno not in _commented_imports(imp.module)
    ]
    assert not silent, "import at the top, or say why not in a comment:\n" + "\n".join(silent)


def test_heavy_libraries_are_never_imported_at_module_level() -> None:
    eager = [
        f"{imp.where_text}: {ast.unparse(imp.node)}"
        for imp in imports()
        if imp.where == "top" and any(t.split(".")[0] in HEAVY for t in imp.targets)
    ]
    assert not eager, "\n".join(eager)


def test_the_service_and_the_cli_load_no_heavy_library() -> None:
    """``serve`` runs for months in a few tens of MB: importing the service or the command line
    (which imports every command) must not load MLX, scikit-learn, llama.cpp or numpy."""
    code = (
        "import sys, mailrouter.service, mailrouter.cli, mailrouter.wiring\n"
        f"heavy = {sorted(HEAVY | ARRAYS)!r}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


# --- layers ----------------------------------------------------------------------------------


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for module in modules():
        try:
            layer(module.name)
        except KeyError:
            unplaced.append(module.name)
    assert not unplaced, "place these in LAYERS (and in docs/architecture.md):\n" + "\n".join(
        unplaced
    )


def test_imports_point_down() -> None:
    """cli → application → orchestration → adapters → core: the core never imports an adapter,
    an adapter never imports the pipeline, and so on."""
    upward = []
    for imp in imports():
        source = layer(imp.module.name)
        for target in imp.own:
            if layer(target) > source:
                upward.append(
                    f"{imp.where_text}: {imp.module.name} ({LAYER_NAMES[source]}) imports "
                    f"{target} ({LAYER_NAMES[layer(target)]})"
                )
    assert not upward, "\n".join(upward)


def _package_of(name: str) -> str | None:
    return next((p for p in ORCHESTRATION if name == p or name.startswith(p + ".")), None)


def test_orchestration_packages_stay_apart() -> None:
    """``pipeline`` never imports ``corrections``; ``corrections`` sees only the pipeline's
    types and the forward's composition; ``training`` imports neither."""
    crossing = []
    for imp in imports():
        source = _package_of(imp.module.name)
        for target in imp.own:
            dest = _package_of(target)
            if source is None or dest is None or dest == source:
                continue
            allowed = ALLOWED_ACROSS.get(source, ())
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                crossing.append(f"{imp.where_text}: {imp.module.name} imports {target}")
    assert not crossing, "\n".join(crossing)


# --- SQL and files ---------------------------------------------------------------------------


def test_sql_lives_in_the_state_and_registry_modules() -> None:
    stray = []
    for module in modules():
        if module.relpath in SQL_HOMES:
            continue
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and SQL.search(node.value)
            ):
                stray.append(f"{module.relpath}:{node.lineno}: {node.value[:60]!r}")
    assert not stray, "give these a named method in state.py or registry.py:\n" + "\n".join(stray)


def test_the_package_never_reads_the_checkout() -> None:
    """Installed as a wheel there is no checkout: package data is read with
    :mod:`importlib.resources`, never found from ``__file__``."""
    uses = [
        f"{module.relpath}:{node.lineno}"
        for module in modules()
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Name) and node.id == "__file__"
    ]
    assert not uses, "\n".join(uses)
