"""The package's import structure: every module imports, no import cycle among its modules, and
no module imports from a stage above its own.

Imports are read from the source with ``ast``: module-level and function-level ``import`` and
``from ... import`` statements alike (a function-level import is a dependency too, only a late
one); imports under ``if TYPE_CHECKING:`` are left out (they never run). ``from P import n``
depends on module ``P.n`` when that is a module of the package, else on ``P`` itself (its
``__init__``).

Stages, lowest first (:data:`STAGES`). A module may import from its own stage and the stages
below; cycles are refused within a stage too:

- ``errors``, then the small utilities that import nothing but them (``atomic``, ``paths``,
  ``progress``, ``distributed``, ``flops``);
- ``checkpoints`` and ``identity``: what a run records on disk, written by training and read by
  every later stage;
- ``task``: what a segmentation task is (channels, classes), read with the data and carried by
  every later stage;
- ``data`` < ``models`` < ``config`` (the config validates ``model.arch`` against the model
  registry; data and models use the config's classes only in annotations) < ``training``;
- ``run`` (``load_run``) and the package's own ``__init__``, which re-exports it;
- ``influence`` < ``explain`` < ``evaluate`` (the evaluation scores influence folders against
  retraining, and reuses the report's figures);
- the command line at the top: ``cli``, ``clidoc`` (reads the parser), ``launch``, and
  ``compile_cache`` (process setup done by the command line; it keeps its cache beside the data
  cache, so it sits above ``data``).

A module outside every stage fails the test: a new top-level module is given its stage here.
Known violations are listed in :data:`ALLOWED`, each with what should remove it; an entry that
no longer matches an import fails the test too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = "tracin_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# (stage name, top-level names under tracin_jax: a module or a subpackage; "" = __init__)
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("errors", ("errors",)),
    ("utilities", ("atomic", "paths", "progress", "distributed", "flops")),
    ("records", ("checkpoints", "identity")),
    ("task", ("task",)),
    ("data", ("data",)),
    ("models", ("models",)),
    ("config", ("config",)),
    ("training", ("training",)),
    ("run", ("run", "")),
    ("influence", ("influence",)),
    ("explain", ("explain",)),
    ("evaluate", ("evaluate",)),
    ("command line", ("cli", "clidoc", "launch", "compile_cache")),
)

# Known violations, (importer, imported) -> what removes it. An edge listed here is neither a
# stage violation nor part of a cycle.
ALLOWED: dict[tuple[str, str], str] = {}


def module_files() -> dict[str, Path]:
    """{dotted module name: source file} of every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(name: str, source: str, modules) -> set[str]:
    """The package's modules that module ``name`` (source text ``source``) imports."""
    tree = ast.parse(source)
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node)
            for stmt in node.body for n in ast.walk(stmt)}
    is_pkg = name == PACKAGE or (ROOT.parent / Path(*name.split("."))).is_dir()
    here = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PACKAGE:
                continue
            for a in node.names:
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path.read_text(), files) for name, path in files.items()}


def stage_of(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else ""
    for rank, (_, names) in enumerate(STAGES):
        if top in names:
            return rank
    return None


def cycles(graph: dict[str, set[str]], allowed=ALLOWED) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    edges = {m: sorted(d for d in ds if (m, d) not in allowed and d in graph)
             for m, ds in graph.items()}
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(comps)


def upward(graph: dict[str, set[str]], allowed=ALLOWED) -> list[str]:
    """'importer (stage) -> imported (stage)' for every import from a stage above."""
    bad = []
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if (m, d) in allowed or stage_of(d) is None or stage_of(m) is None:
                continue
            if stage_of(d) > stage_of(m):
                bad.append(f"{m} ({STAGES[stage_of(m)][0]}) -> {d} ({STAGES[stage_of(d)][0]})")
    return bad


GRAPH = import_graph()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_every_module_has_a_stage():
    assert [m for m in GRAPH if stage_of(m) is None] == []


def test_no_import_cycle():
    found = cycles(GRAPH)
    assert found == [], "import cycles (break one import, or list it in ALLOWED with its fix): " \
                        + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_from_a_stage_above():
    assert upward(GRAPH) == []


def test_allowlist_entries_still_exist():
    stale = [f"{a} -> {b}" for a, b in ALLOWED if b not in GRAPH.get(a, set())]
    assert stale == [], "fixed: remove from ALLOWED: " + "; ".join(stale)


def test_the_checks_catch_a_new_violation():
    """A cycle and an upward import added to the real graph are both reported."""
    graph = {m: set(d) for m, d in GRAPH.items()}
    graph["tracin_jax.errors"].add("tracin_jax.atomic")  # atomic imports errors: a cycle
    graph["tracin_jax.training.train"].add("tracin_jax.evaluate.lds")  # training -> evaluate
    assert ["tracin_jax.atomic", "tracin_jax.errors"] in cycles(graph)
    assert "tracin_jax.errors (errors) -> tracin_jax.atomic (utilities)" in upward(graph)
    assert "tracin_jax.training.train (training) -> tracin_jax.evaluate.lds (evaluate)" \
        in upward(graph)
    source = "def f():\n    from tracin_jax.evaluate import lds\n" \
             "if TYPE_CHECKING:\n    from tracin_jax import cli\n"
    assert imports_of("tracin_jax.training.x", source, GRAPH) == {"tracin_jax.evaluate.lds"}
