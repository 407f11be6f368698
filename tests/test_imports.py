"""Imports point one way, down the layers of ../shared/DESIGN.md: each subpackage of flaxlm
imports only subpackages on a lower floor of :data:`LAYERS` (and its own modules), so the
import graph has no circles and a newcomer knows where a change may reach.

The graph is read from the source with ``ast``, so it holds every ``import`` of a flaxlm
module anywhere in a file: at the top, inside functions, under ``if TYPE_CHECKING``. A lazy
import that dodges a circle is still a circle here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flaxlm"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the flaxlm modules it imports (packages stand for their __init__)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..data import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:  # from pkg import module counts as that module
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path (first module repeated at the end) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, c) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


def test_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "flaxlm"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("from flaxlm.data.a import f\n")
    (pkg / "data" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "data" / "b.py").write_text("from flaxlm import config\n")
    (pkg / "config.py").write_text("import flaxlm.data.a\n")
    graph = import_graph(pkg)
    assert graph["flaxlm.data.a"] == {"flaxlm.data.b"}
    assert find_cycles(graph) == [
        ["flaxlm.config", "flaxlm.data.a", "flaxlm.data.b", "flaxlm.config"]
    ]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (make the imports point down the layers):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


# The floors, from the bottom. A package may import packages on lower floors only: never one
# on its own floor, never one above. flaxlm/__init__.py (the root) may import the runtime.
LAYERS: list[set[str]] = [
    {"storage"},  # paths and URLs: everything above reads and writes through it
    {"config"},
    {"runtime", "tokenizers", "models", "parallel"},
    {"losses", "data", "checkpoint", "hf"},
    {"families"},
    {"tasks"},  # task evaluation: the trainer runs it (train.eval_tasks), tools/commands too
    {"train"},
    {"tools"},
    {"commands"},
    {"cli"},
]
ROOT_MAY_IMPORT = {"runtime"}


def package_of(module: str) -> str:
    """flaxlm.data.cache -> data; flaxlm.cli -> cli; flaxlm -> flaxlm (the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import that points sideways or up the floors, as one line."""
    floor = {name: i for i, names in enumerate(LAYERS) for name in names}
    bad = []
    for source, targets in sorted(graph.items()):
        here = package_of(source)
        for target in sorted(targets):
            there = package_of(target)
            if here == there:
                continue
            if here == "flaxlm":
                ok = there in ROOT_MAY_IMPORT
            elif here not in floor or there not in floor:
                ok = False  # a new subpackage must be given its floor
            else:
                ok = floor[there] < floor[here]
            if not ok:
                where = f"floor {floor.get(here, '?')} -> {floor.get(there, '?')}"
                bad.append(f"{source} imports {target} ({here} -> {there}: {where})")
    return bad


def test_every_subpackage_has_a_floor():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    floors = set().union(*LAYERS)
    assert packages | modules <= floors, (
        f"give these a floor in LAYERS: {(packages | modules) - floors}"
    )


def test_the_root_holds_only_the_entry_point():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "cli.py"], f"modules loose in flaxlm/: {loose}"


def test_finds_an_import_that_points_up(tmp_path):
    pkg = tmp_path / "flaxlm"
    for sub in ("data", "models", "train"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "gpt.py").write_text("from flaxlm.data.cache import x\n")  # up
    (pkg / "data" / "cache.py").write_text("from flaxlm.models import gpt\n")  # down: fine
    (pkg / "train" / "loop.py").write_text("import flaxlm.data.cache\n")  # down: fine
    assert layer_violations(import_graph(pkg)) == [
        "flaxlm.models.gpt imports flaxlm.data.cache (models -> data: floor 2 -> 3)"
    ]


def test_imports_point_down_the_layers():
    bad = layer_violations(import_graph())
    assert not bad, "imports that point sideways or up (see LAYERS):\n" + "\n".join(bad)
