"""The floor plan holds: contracts import no component, components form no import cycle,
and a component reaches another only through what that package's `__init__` exports.

Read from the source (every `import`, at module level or inside a function, and under
`TYPE_CHECKING`), not from `sys.modules`, so a lazy import counts as much as an eager one.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# where each installed package lives in the tree (pyproject's package-dir)
FOLDERS = {
    "flywheel.service": ROOT / "service",
    "flywheel.feedback": ROOT / "feedback",
    "flywheel.learner": ROOT / "learner",
    "flywheel.privacy": ROOT / "privacy",
    "flywheel.kernels": ROOT / "kernels",
    "flywheel.migrations": ROOT / "migrations",
    "flywheel": ROOT / "flywheel",
}
# Components: they meet only through each other's public API. `flywheel.store`,
# `flywheel.review` and `flywheel.demo` live under flywheel/ but are components too.
COMPONENTS = (
    "flywheel.service",
    "flywheel.feedback",
    "flywheel.learner",
    "flywheel.privacy",
    "flywheel.kernels",
    "flywheel.store",
    "flywheel.review",
    "flywheel.demo",
)
# Wiring: starts processes, so it may import every component (through its public API).
WIRING = ("flywheel.cli",)


def module_name(path: Path) -> str:
    for package, folder in FOLDERS.items():
        if folder in path.parents or path.parent == folder:
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            return ".".join([package, *parts])
    raise AssertionError(path)


def sources() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS.values():
        for path in folder.rglob("*.py"):
            found.setdefault(module_name(path), path)
    return found


def owner(module: str) -> str:
    """The component, `wiring` or `contracts` a module belongs to."""
    if module == "flywheel.migrations" or module.startswith("flywheel.migrations."):
        return "flywheel.store"  # Alembic's environment and versions are the store's own
    if module == "flywheel.__main__":
        return "flywheel.cli"
    for prefix in COMPONENTS + WIRING:
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return "contracts"


def imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names], node.lineno))
    return [(t, n, line) for t, n, line in found if t == "flywheel" or t.startswith("flywheel.")]


def public_names(package: str, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(modules[package].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return {ast.literal_eval(e) for e in node.value.elts}  # type: ignore[attr-defined]
    return set()


def is_package(module: str, modules: dict[str, Path]) -> bool:
    return module in modules and modules[module].name == "__init__.py"


def violations() -> tuple[list[str], dict[str, set[str]]]:
    modules = sources()
    problems: list[str] = []
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in sorted(modules.items()):
        here = owner(module)
        for target, names, line in imports(path, module):
            if target == "flywheel":  # `from flywheel import store` names a subpackage
                for name in names:
                    sub = f"flywheel.{name}"
                    if owner(sub) != "contracts" and owner(sub) != here:
                        edges[here].add(owner(sub))
                        if here == "contracts":
                            problems.append(f"{module}:{line} contracts import {sub}")
                continue
            there = owner(target)
            if there == here or there == "contracts":
                continue
            where = f"{module}:{line}"
            if here == "contracts":
                problems.append(f"{where} contracts import the component {target}")
                continue
            if there in WIRING:
                problems.append(f"{where} a component imports the CLI ({target})")
                continue
            edges[here].add(there)
            private = [p for p in target.split(".") if p.startswith("_")]
            if private or not is_package(target, modules):
                problems.append(f"{where} imports {target}, not a public package of {there}")
                continue
            exported = public_names(target, modules)
            for name in names:
                if name not in exported and not is_package(f"{target}.{name}", modules):
                    problems.append(f"{where} imports {target}.{name}, not in its __all__")
    return problems, edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_components_meet_only_through_public_api_and_contracts_import_none():
    problems, _ = violations()
    assert problems == [], "\n".join(problems)


def test_no_import_cycle_between_components():
    _, edges = violations()
    assert cycles(edges) == []


def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch):
    """A cycle, a private import and a contract importing a component are each reported."""
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []
    fake = tmp_path / "flywheel"
    (fake / "store").mkdir(parents=True)
    (fake / "store" / "__init__.py").write_text('__all__ = ["open_store"]\n')
    (fake / "store" / "_secret.py").write_text("")
    (fake / "events.py").write_text("from flywheel.store import open_store\n")
    monkeypatch.setitem(FOLDERS, "flywheel", fake)
    for key in [k for k in FOLDERS if k != "flywheel"]:
        monkeypatch.setitem(FOLDERS, key, tmp_path / "none" / key)
    svc = tmp_path / "none" / "flywheel.service"
    svc.mkdir(parents=True)
    (svc / "__init__.py").write_text(
        "from flywheel.store._secret import x\nfrom flywheel.store import close\n"
    )
    problems, _ = violations()
    text = "\n".join(problems)
    assert "contracts import the component flywheel.store" in text
    assert "flywheel.store._secret, not a public package" in text
    assert "flywheel.store.close, not in its __all__" in text


def test_the_client_imports_only_itself_and_the_event_schemas():
    """`flywheel.client` is what apps import: a contract that reaches no further than the
    correction records it produces (`flywheel.events`) and the signature they carry
    (`flywheel.appkeys`, hashlib only), so an app never loads settings, the store or a
    component (torch, SQLAlchemy, MLflow) through it."""
    found = []
    for module, path in sources().items():
        if module == "flywheel.client" or module.startswith("flywheel.client."):
            for target, names, line in imports(path, module):
                inside = target == "flywheel.client" or target.startswith("flywheel.client.")
                if not inside and target not in ("flywheel.events", "flywheel.appkeys"):
                    found.append(f"{module}:{line} imports {target} {names}")
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_says_what_it_offers(component):
    modules = sources()
    assert public_names(component, modules), f"{component}/__init__.py has no __all__"
