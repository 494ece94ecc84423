"""Fail on an import cycle between the modules of a package.

Every ``import`` statement counts, at module level or inside a function (an import inside a
function that would close a cycle only hides it), and importing ``a.b.c`` also runs the
``__init__`` of ``a`` and ``a.b``, so those count as imported too.

    python tools/import_graph.py            # checks dsv2_jax; exit 1 and the cycles if any
    python tools/import_graph.py --dot      # the graph in Graphviz format
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_files(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` (packages by __init__)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement brings in (absolute)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # ``from pkg import name`` imports pkg, and pkg.name when that is a module.
    return [prefix] + [f"{prefix}.{a.name}" for a in node.names]


def import_graph(package: str = "dsv2_jax", root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports (directly, with the packages above them)."""
    files = module_files(package, root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(node, module, path.name == "__init__.py"):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # the packages above run their __init__ too
                    candidate = ".".join(parts[:i])
                    if candidate in files and candidate != module:
                        deps.add(candidate)
        graph[module] = deps
    return graph


def _inits_of(module: str, graph) -> set[str]:
    """A module's own enclosing packages: importing it runs them first, which is not a cycle."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in graph}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted.

    An edge from a module to one of its own enclosing packages is left out: Python has run
    that package's ``__init__`` before the module, so it is not a cycle unless the package
    imports the module back *and* something else closes the loop, which the remaining edges
    still show.
    """
    edges = {m: {d for d in deps if d not in _inits_of(m, graph)} for m, deps in graph.items()}
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--package", default="dsv2_jax")
    p.add_argument("--dot", action="store_true", help="print the graph in Graphviz format")
    args = p.parse_args(argv)
    graph = import_graph(args.package)
    if args.dot:
        print("digraph imports {")
        for m, deps in sorted(graph.items()):
            for d in sorted(deps):
                print(f'  "{m}" -> "{d}";')
        print("}")
    cycles = find_cycles(graph)
    for c in cycles:
        print("import cycle: " + " <-> ".join(c), file=sys.stderr)
    if not args.dot:
        print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(cycles)} cycles")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
