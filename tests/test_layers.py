"""The layers of docs/architecture.md hold: imports run one way, no module cycles, the scheduler side loads no
diffusers. Read from the source with `ast` (every import, function-local ones included), so a cycle hidden
inside a function counts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from common.paths import PROJECT_ROOT

PACKAGES = ("common", "attention", "models", "engine", "api", "deployments", "serve_graph", "training",
            "benchmarks", "k8s")
ALLOWED = {
    "common": set(),
    "attention": {"common"},
    "models": {"attention", "common"},
    "engine": {"attention", "common", "models"},
    "api": {"common", "engine", "models"},
    "deployments": {"api", "attention", "common", "engine", "models"},
    "serve_graph": {"api", "common", "deployments"},
    "training": {"common", "models"},
}
"""Package -> the packages it may import. Benchmarks and k8s tooling sit on top and may import any."""


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in its body (`from a import b` counts a.b when b is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_packages_import_only_the_layers_below_them():
    wrong = sorted((module, target) for module, targets in _graph().items() for target in targets
                   if (source := module.split(".")[0]) in ALLOWED and target.split(".")[0] != source
                   and target.split(".")[0] not in ALLOWED[source])
    assert wrong == []


def _cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if root in state:
            continue
        path, iterators = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while path:
            following = next(iterators[-1], None)
            if following is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state.get(following) == 1:
                return path[path.index(following):] + [following]
            elif following not in state:
                state[following] = 1
                path.append(following)
                iterators.append(iter(sorted(graph[following])))
    return None


def test_no_module_imports_itself_through_others():
    assert _cycle_from(_graph()) is None
    assert _cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_scheduler_side_loads_neither_diffusers_nor_transformers():
    """The step scheduler, its messages and the API's validation run in processes that hold no model."""
    code = ("import sys, engine.scheduler, engine.messages, engine.step_cost, api.validation, api.config, "
            "api.dllm_validation; print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
