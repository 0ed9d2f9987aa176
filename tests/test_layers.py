"""The package's layer rule, read from the source (docs/ARCHITECTURE.md).

``ascood/`` is six layers, each a folder: data -> nets -> training -> scoring -> deploy -> apps. A module may
import its own layer and the layers before it, never a later one; ``ascood.files`` and ``ascood._ops``
sit below all of them. Every import counts, also the ones inside functions (a lazy import is still
a dependency). The import graph between modules has no cycle, and the top level holds only the
layer folders and a few small modules.
"""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "ascood"
LAYERS = ("data", "nets", "training", "scoring", "deploy", "apps")
BASE = ("files", "_ops")  # below every layer
FACADE = ("__init__", "__main__")  # the top-level package re-exports from every layer
TOP_LEVEL_ALLOWED = {*LAYERS, "__init__.py", "__main__.py", "files.py", "_ops.py"}


def module_name(path: pathlib.Path, root: pathlib.Path = PKG) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path, root: pathlib.Path = PKG) -> set[str]:
    """Every ``ascood.*`` module ``path`` imports (relative imports resolved; ``from X import name``
    counts X.name when that is a module of the package)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ascood")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ascood":
                continue
            found.add(target)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if module_path(sub, root) is not None:
                    found.add(sub)
    return found


def module_path(name: str, root: pathlib.Path = PKG) -> pathlib.Path | None:
    rel = pathlib.Path(*name.split(".")[1:])
    for cand in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def layer_of(name: str) -> int | None:
    """0 for the base modules, 1..6 for the layers, None for the facade."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] in FACADE:
        return None
    if parts[1] in BASE:
        return 0
    return LAYERS.index(parts[1]) + 1


MODULES = sorted(PKG.rglob("*.py"))
GRAPH = {module_name(p): imports_of(p) for p in MODULES}


def test_top_level_holds_only_the_layers_and_small_modules():
    extra = sorted(p.name for p in PKG.iterdir() if p.name not in TOP_LEVEL_ALLOWED and p.name != "__pycache__")
    assert extra == []
    for layer in LAYERS:
        init = PKG / layer / "__init__.py"
        assert init.is_file(), f"{layer}/ needs an __init__.py saying what lives there"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Layer rule" in doc and "import" in doc, f"{layer}/__init__.py must state what it may import"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer_of(m) is not None))
def test_imports_point_down(module):
    here = layer_of(module)
    upward = sorted(t for t in GRAPH[module] if layer_of(t) is not None and layer_of(t) > here)
    assert upward == [], f"{module} (layer {here}) imports later layers: {upward}"


def test_no_import_cycle():
    graph = {m: {t for t in deps if t in GRAPH and t != m} for m, deps in GRAPH.items()}
    # A package's __init__ importing its own children is how packages re-export; a child importing
    # its package's __init__ back through it is the same edge seen from below, not a design circle.
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".") and not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_violation(tmp_path):
    # The rule above must be able to fail: a data-layer module that imports the trainer is caught,
    # also when the import hides inside a function.
    root = tmp_path / "ascood"
    for rel in ("data/__init__.py", "training/__init__.py", "training/trainer.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    bad = root / "data" / "datasets.py"
    bad.write_text("def f():\n    from ..training.trainer import Trainer\n    from ..training import trainer\n")
    deps = imports_of(bad, root)
    assert "ascood.training.trainer" in deps
    assert max(layer_of(t) for t in deps) > layer_of(module_name(bad, root))


def test_old_module_paths_still_import():
    # The flat layout's module names are aliases of the moved modules (the same objects).
    import importlib

    import ascood

    for old, new in ascood.MOVED_MODULES.items():
        assert importlib.import_module(f"ascood.{old}") is importlib.import_module(new)
        assert getattr(ascood, old) is importlib.import_module(new)
    from ascood.scorers import KNN  # noqa: F401
    from ascood.checkpoint import load_model  # noqa: F401
    import ascood.scorers.perturb as P

    assert P.__name__ == "ascood.scoring.scorers.perturb"
