"""The package's import graph runs one way: no cycles, and no import from an earlier stage to a
later one (docs/architecture.md, "Rank order").

The graph is built with `ast` from every import statement in `parlm/` (module level and inside
functions, absolute and relative), so an import hidden in a function counts like any other.
`import_problems(root)` takes the checkout's root so the same check can be pointed at another
checkout, e.g. `python -c "from tests.test_import_graph import report; report('/tmp/old')"`.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Packages in data-flow order: a module may import from its own rank or a lower one only.
RANKS = {
    "parlm": 0, "parlm.config": 0, "parlm.dist": 0, "parlm.runlog": 0, "parlm.cli": 0,
    # The submission-script generator reads package sources as text and imports no stage: a
    # tool below the stages, so the quant stage can count the code bytes it produces.
    "parlm.submission.build": 0, "parlm.submission.minify": 0,
    "parlm.data": 1,
    "parlm.model": 2,
    "parlm.train": 3,
    "parlm.quant": 4,
    "parlm.eval": 5,
    "parlm.ppm": 6,
    # What the submission script runs (train, quant, eval) and the record export.
    "parlm.submission": 7,
    "parlm.report": 8,  # writes the submission folder of a run
    "parlm.pipeline": 9,
    "parlm.run": 10,
    "parlm.ablate": 10,  # drives parlm.run per (variant, seed), as parlm.run drives the pipeline
}
# `python -m parlm.<stage>` entry points: nothing imports them, so they rank with parlm.run.
ENTRY_POINT_RANK = 10


def module_name(root: Path, path: Path) -> str:
    """`parlm/eval/stage.py` -> `parlm.eval.stage`; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path) -> dict[str, Path]:
    """Every module of `root/parlm` by dotted name."""
    return {module_name(root, path): path for path in sorted((root / "parlm").rglob("*.py"))}


def imported_names(module: str, path: Path) -> set[str]:
    """Dotted names that `module` imports (every `import` / `from ... import` in the file,
    relative ones resolved against the module's package); `from a import b` yields both `a`
    and `a.b` so that importing a submodule by name counts."""
    is_package = path.name == "__init__.py"
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the parlm modules it imports (names resolved to existing modules)."""
    modules = package_modules(root)
    graph = {}
    for module, path in modules.items():
        targets = {name for name in imported_names(module, path) if name in modules}
        graph[module] = {t for t in targets if t != module}
    return graph


def rank(module: str, ranks: dict[str, int] = RANKS) -> int:
    """The rank of the longest prefix of `module` in `ranks` (KeyError for an unranked module)."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return ENTRY_POINT_RANK
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in ranks and (end > 1 or module == "parlm"):
            return ranks[prefix]
    raise KeyError(f"{module} has no rank in RANKS; add its package to the table")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as
    (a cycle path a -> b -> ... -> a inside it, all its modules)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [(cycle_in(graph, component), sorted(component)) for component in components]


def cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One closed path inside a strongly connected `component`, by breadth-first search from
    its first module back to itself."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def backward_edges(graph: dict[str, set[str]], ranks: dict[str, int] = RANKS) -> list[tuple[str, str]]:
    """Imports from a lower-ranked (earlier) package to a higher-ranked (later) one."""
    return sorted((source, target) for source, targets in graph.items() for target in targets
                  if rank(source, ranks) < rank(target, ranks))


def import_problems(root: str | Path = REPO_ROOT, ranks: dict[str, int] = RANKS) -> list[str]:
    """One line per cycle (`cycle: a -> b -> a`, plus the other modules of its strongly
    connected component) and per backward edge (`earlier -> later: a (rank i) imports b
    (rank j)`) in the checkout at `root`."""
    graph = import_graph(Path(root))
    lines = []
    for cycle, component in find_cycles(graph):
        others = sorted(set(component) - set(cycle))
        lines.append("cycle: " + " -> ".join(cycle) + (f" (same cycle group: {', '.join(others)})" if others else ""))
    lines += [f"earlier -> later: {a} (rank {rank(a, ranks)}) imports {b} (rank {rank(b, ranks)})"
              for a, b in backward_edges(graph, ranks)]
    return lines


def report(root: str | Path, ranks: dict[str, int] = RANKS) -> None:
    """Print the problems of the checkout at `root` (for a one-off look at another layout,
    with a rank table for its module names)."""
    problems = import_problems(root, ranks)
    print("\n".join(problems) if problems else "no cycles, no earlier -> later imports")


def test_graph_helpers_find_a_planted_cycle_and_backward_edge():
    graph = {"parlm.train.a": {"parlm.eval.b"}, "parlm.eval.b": {"parlm.train.a"},
             "parlm.data.c": set()}
    assert find_cycles(graph) == [(["parlm.eval.b", "parlm.train.a", "parlm.eval.b"],
                                   ["parlm.eval.b", "parlm.train.a"])]
    assert backward_edges(graph) == [("parlm.train.a", "parlm.eval.b")]


def test_relative_and_function_level_imports_are_seen(tmp_path):
    package = tmp_path / "parlm" / "quant"
    package.mkdir(parents=True)
    (tmp_path / "parlm" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "stats.py").write_text("def f():\n    from ..eval import scoring\n")
    (tmp_path / "parlm" / "eval").mkdir()
    (tmp_path / "parlm" / "eval" / "__init__.py").write_text("")
    (tmp_path / "parlm" / "eval" / "scoring.py").write_text("from parlm.quant import stats\n")
    assert import_problems(tmp_path) == [
        "cycle: parlm.eval.scoring -> parlm.quant.stats -> parlm.eval.scoring",
        "earlier -> later: parlm.quant.stats (rank 4) imports parlm.eval (rank 5)",
        "earlier -> later: parlm.quant.stats (rank 4) imports parlm.eval.scoring (rank 5)"]


def test_every_module_has_a_rank():
    for module in package_modules(REPO_ROOT):
        rank(module)


def test_parlm_imports_run_one_way():
    problems = import_problems(REPO_ROOT)
    assert not problems, "\n".join(problems)
