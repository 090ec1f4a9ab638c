"""The layering the README states is true: no module imports a higher floor (lazy imports included), no cycles."""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "caitdeploy"

# floor of each module (README, "Architecture"); a package maps all its modules to one floor
FLOORS = {
    "caitdeploy.kernels": 0,  # the wing: imports nothing else of caitdeploy
    "caitdeploy.core": 1,  # errors, staging, budgets, bounded readers
    "caitdeploy.families": 2,  # configs, deploy models, FLOPs, the timm adapter
    "caitdeploy.baselines": 2,
    "caitdeploy.formats": 3,  # checkpoints and fused files (read through a family)
    "caitdeploy.compress": 3,
    "caitdeploy.convert": 3,
    "caitdeploy.training.wrappers": 3,
    "caitdeploy.export": 4,
    "caitdeploy.runtime": 4,
    "caitdeploy.formats.describe": 4,
    "caitdeploy.serve": 4,
    "caitdeploy.bench": 4,
    "caitdeploy.evaluate": 4,
    "caitdeploy.training": 4,
    "caitdeploy.pipelines": 5,
    "caitdeploy.testing": 5,  # helpers and harnesses shared by tests/ and benchmarks/; nothing imports them
    "caitdeploy.testing.fuzz": 6,  # the fuzz harness's "inspect" reader is what `caitdeploy inspect` runs (cli)
    "caitdeploy.cli": 6,
    "caitdeploy": 6,
}
FLOORS["caitdeploy.__main__"] = FLOORS["caitdeploy.cli"]  # `python -m caitdeploy` is the CLI


# A package key places every module under its folder; the root "caitdeploy" places only caitdeploy/__init__.py, so
# a new top-level module is unknown (test_every_module_has_a_floor fails) until it is given its floor above.
ROOT = "caitdeploy"


class UnknownModule(KeyError):
    """A module the FLOORS table does not place."""


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _packages(floors: dict[str, int]) -> set[str]:
    """The FLOORS keys that are package folders (each places its whole subtree), the root excepted."""
    return {k for k in floors if k != ROOT and (PKG.parent / k.replace(".", "/")).is_dir()}


def floor_of(name: str, floors: dict[str, int] | None = None, packages: set[str] | None = None) -> int:
    """The floor of module `name`: its own entry, else that of the nearest enclosing package entry (never the
    root's). Raises UnknownModule for a module nothing places."""
    floors = FLOORS if floors is None else floors
    packages = _packages(floors) if packages is None else packages
    if name in floors:
        return floors[name]
    parent = name
    while "." in parent:
        parent = parent.rsplit(".", 1)[0]
        if parent in packages:
            return floors[parent]
    raise UnknownModule(
        f"{name}: not in tests/test_layering.py FLOORS (nor in a package listed there): give it "
        "its floor (README, Architecture)"
    )


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
                out.add(
                    sub
                    if (PKG.parent / sub.replace(".", "/")).exists()
                    or (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                    else target
                )
    out.discard(me)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def unknown_modules(
    g: dict[str, set[str]], floors: dict[str, int] | None = None, packages: set[str] | None = None
) -> list[str]:
    """Every module of `g`, and every module one of them imports, that FLOORS does not place."""
    bad = set()
    for name in set(g) | {d for deps in g.values() for d in deps}:
        try:
            floor_of(name, floors, packages)
        except UnknownModule:
            bad.add(name)
    return sorted(bad)


def upward_imports(
    g: dict[str, set[str]], floors: dict[str, int] | None = None, packages: set[str] | None = None
) -> list[str]:
    bad = []
    for mod, deps in g.items():
        f = floor_of(mod, floors, packages)
        for d in deps:
            fd = floor_of(d, floors, packages)
            if mod.startswith("caitdeploy.kernels"):
                if not d.startswith("caitdeploy.kernels"):
                    bad.append(f"{mod} (wing) imports {d}")
            elif fd > f:
                bad.append(f"{mod} (floor {f}) imports {d} (floor {fd})")
    return sorted(bad)


def find_cycles(g: dict[str, set[str]]) -> list[str]:
    """Import cycles of `g` (module -> the modules it imports), each as `a -> b -> a`; [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(n, stack):
        state[n] = 1
        for d in sorted(g.get(n, ())):
            if d not in g:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    return cycles


def package_of(name: str) -> str:
    """The package directly under caitdeploy that holds module `name` (caitdeploy.X); the root stays itself."""
    return ".".join(name.split(".")[:2])


def package_graph(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """`g` with every module collapsed to its package (`package_of`); imports inside one package are dropped."""
    out: dict[str, set[str]] = {}
    for mod, deps in g.items():
        out.setdefault(package_of(mod), set()).update(package_of(d) for d in deps)
    for pkg, deps in out.items():
        deps.discard(pkg)
    return out


def package_edges(g: dict[str, set[str]], a: str, b: str) -> list[str]:
    """The module imports of `g` behind the package edge a -> b, as `module -> module`."""
    return sorted(f"{m} -> {d}" for m, deps in g.items() if package_of(m) == a for d in deps if package_of(d) == b)


def test_every_module_has_a_floor():
    unknown = unknown_modules(graph())
    assert not unknown, "modules the README's table does not place:\n" + "\n".join(unknown)


def test_no_upward_imports():
    bad = upward_imports(graph())
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "\n".join(cycles)


def test_no_package_import_cycles():
    """Collapsed to the packages directly under caitdeploy (caitdeploy.X), the imports form no cycle either: a
    concern is owned by one package, and no package reaches back into one that imports it."""
    g = graph()
    cycles = find_cycles(package_graph(g))
    why = []
    for cycle in cycles:
        pkgs = cycle.split(" -> ")
        why += [cycle] + [f"    {e}" for a, b in pairwise(pkgs) for e in package_edges(g, a, b)]
    assert not cycles, "package import cycles (the module imports behind each):\n" + "\n".join(why)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """Self-test: the walker finds an import inside a function and resolves `..` relative imports."""
    deps = imports_of(PKG / "bench" / "run.py")
    assert "caitdeploy.formats.fused" in deps and "caitdeploy.core.budgets" in deps  # lazy and top-level
    assert "caitdeploy.families.vit.config" in imports_of(PKG / "formats" / "checkpoint.py")


def test_the_checker_rejects_an_unknown_module_and_a_cycle():
    """Self-test on a made-up graph: a module nothing places is refused (the root's floor is not inherited), a
    listed package places its modules, an upward import and a cycle are found."""
    floors = {"caitdeploy": 3, "caitdeploy.low": 1, "caitdeploy.pkg": 2}
    packages = {"caitdeploy.pkg"}
    assert floor_of("caitdeploy.pkg.anything", floors, packages) == 2
    assert floor_of("caitdeploy", floors, packages) == 3
    with pytest.raises(UnknownModule, match="caitdeploy.new"):
        floor_of("caitdeploy.new", floors, packages)
    g = {
        "caitdeploy": {"caitdeploy.pkg.a"},
        "caitdeploy.new": set(),
        "caitdeploy.low": {"caitdeploy.pkg.b"},
        "caitdeploy.pkg.a": {"caitdeploy.pkg.b"},
        "caitdeploy.pkg.b": {"caitdeploy.gone"},
    }
    assert unknown_modules(g, floors, packages) == ["caitdeploy.gone", "caitdeploy.new"]
    del g["caitdeploy.new"], g["caitdeploy.pkg.b"]
    assert upward_imports(g, floors, packages) == ["caitdeploy.low (floor 1) imports caitdeploy.pkg.b (floor 2)"]
    assert find_cycles(g) == []
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert find_cycles(cyclic) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"a"}}) == ["a -> a"]


def test_the_package_checker_collapses_modules_and_finds_a_package_cycle():
    """Self-test on a made-up graph: modules collapse to caitdeploy.X (the root stays itself, a deep module goes to
    its top package), imports inside a package vanish, and a cycle that no module graph shows is found."""
    g = {
        "caitdeploy": {"caitdeploy.low.a"},
        "caitdeploy.low.a": {"caitdeploy.low.b"},
        "caitdeploy.low.b": {"caitdeploy.high.x"},
        "caitdeploy.high.x": set(),
        "caitdeploy.high.y.z": {"caitdeploy.low.a"},
        "caitdeploy.__main__": {"caitdeploy"},
    }
    assert package_of("caitdeploy") == "caitdeploy" and package_of("caitdeploy.high.y.z") == "caitdeploy.high"
    assert find_cycles(g) == []  # module by module: no cycle
    pg = package_graph(g)
    assert pg == {
        "caitdeploy": {"caitdeploy.low"},
        "caitdeploy.low": {"caitdeploy.high"},
        "caitdeploy.high": {"caitdeploy.low"},
        "caitdeploy.__main__": {"caitdeploy"},
    }
    assert find_cycles(pg) == ["caitdeploy.low -> caitdeploy.high -> caitdeploy.low"]
    assert package_edges(g, "caitdeploy.high", "caitdeploy.low") == ["caitdeploy.high.y.z -> caitdeploy.low.a"]
    g["caitdeploy.high.y.z"] = set()
    assert find_cycles(package_graph(g)) == []


def test_tests_and_benchmarks_share_code_only_through_the_package():
    """Shared helpers live in caitdeploy/testing: no test or benchmark edits sys.path, loads a file by path, or
    imports another test module."""
    root = PKG.parent
    bad = []
    for path in sorted([*root.glob("tests/**/*.py"), *root.glob("benchmarks/**/*.py"), *root.glob("examples/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Import, ast.ImportFrom)) else ""
            if (
                isinstance(node, ast.Call)
                and (
                    "sys.path" in text.split("(")[0] or "spec_from_file_location" in text or "SourceFileLoader" in text
                )
                or isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0].startswith(("test_", "bench_"))
            ):
                bad.append(f"{path.relative_to(root)}:{node.lineno}: {text[:80]}")
    assert not bad, "\n".join(bad)
