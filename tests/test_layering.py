"""The layering the README states is true: no module imports a higher floor (lazy imports included), no cycles."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "caitdeploy"

# floor of each module (README, "Architecture"); a package maps all its modules to one floor
FLOORS = {
    "caitdeploy.config": 1, "caitdeploy.format": 1, "caitdeploy.errors": 1, "caitdeploy.paths": 1, "caitdeploy.tensorfile": 1,
    "caitdeploy.timm_compat": 2,
    "caitdeploy.checkpoint": 2, "caitdeploy.reference": 2, "caitdeploy.surgery": 2, "caitdeploy.model": 2, "caitdeploy.models": 2,
    "caitdeploy.flops": 2, "caitdeploy.limits": 2, "caitdeploy.safepickle": 2, "caitdeploy.baselines": 2,
    "caitdeploy.imagefile": 2,
    "caitdeploy.fuse": 3, "caitdeploy.cdcp": 3, "caitdeploy.io": 3, "caitdeploy.train": 3, "caitdeploy.convert": 3,
    "caitdeploy.export": 4, "caitdeploy.runtime": 4, "caitdeploy.describe": 4, "caitdeploy.serve": 4, "caitdeploy.bench": 4,
    "caitdeploy.trainer": 4,
    "caitdeploy.cli": 5, "caitdeploy.commands": 5, "caitdeploy": 5,
    "caitdeploy.kernels": 0,   # the wing: imports nothing else of caitdeploy
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(name: str) -> int:
    while name not in FLOORS:
        name = name.rsplit(".", 1)[0]
    return FLOORS[name]


def imports_of(path: Path) -> set[str]:
    """Every caitdeploy module `path` imports, at top level or inside functions."""
    me = module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("caitdeploy")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("caitdeploy"):
                continue
            for a in node.names:  # `from . import kernels` names a module
                sub = f"{target}.{a.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).exists()
                        or (PKG.parent / (sub.replace(".", "/") + ".py")).exists() else target)
    out.discard(me)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def test_every_module_has_a_floor():
    for name in graph():
        floor_of(name)  # raises KeyError for a module the README's table does not place


def test_no_upward_imports():
    bad = []
    for mod, deps in graph().items():
        f = floor_of(mod)
        for d in deps:
            fd = floor_of(d)
            if mod.startswith("caitdeploy.kernels"):
                if not d.startswith("caitdeploy.kernels"):
                    bad.append(f"{mod} (wing) imports {d}")
            elif fd > f:
                bad.append(f"{mod} (floor {f}) imports {d} (floor {fd})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        for d in g.get(n, ()):
            if d not in g:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in g:
        if n not in state:
            visit(n, [n])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """Self-test: the walker finds an import inside a function and resolves `..` relative imports."""
    deps = imports_of(PKG / "bench" / "run.py")
    assert "caitdeploy.io" in deps and "caitdeploy.limits" in deps  # lazy and top-level
    assert "caitdeploy.config" in imports_of(PKG / "checkpoint.py")
