"""No import circles inside jaxctx: every `import`/`from` statement (top-level or inside a function) counted.

A lazy import inside a function still ties two modules together; a circle means neither can be understood,
tested or moved alone (the training loop once imported its own command line, which imported the loop).
"""

import ast
import os

import jaxctx

PACKAGE_DIR = os.path.dirname(jaxctx.__file__)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, modules: set[str]) -> set[str]:
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = [os.path.join(d, f) for d, _, files in os.walk(PACKAGE_DIR) for f in files if f.endswith(".py")]
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None. A package importing its own submodules is not a circle
    (`pkg/__init__.py` re-exporting `pkg.mod` is how a package is assembled), so edges parent -> child are left out."""
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_circles():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_checker_sees_a_circle():
    graph = import_graph()
    assert "jaxctx.train.loop" in graph["jaxctx.train.cli"]  # the lazy import is counted
    graph["jaxctx.train.loop"] = graph["jaxctx.train.loop"] | {"jaxctx.train.cli"}  # the old circle, planted
    assert find_cycle(graph) is not None
