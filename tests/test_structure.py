"""The package's shape: no import cycles, stages that depend one way, no reaching into private names."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "captioning"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(mod: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in ``mod``, at any depth (lazy ones too)."""
    here = MODULES[mod]
    package = mod.split(".") if here.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(here.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            out.append((target, names))
            out += [(f"{target}.{n}", []) for n in names if f"{target}.{n}" in MODULES]
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return [(t, names) for t, names in out if t in MODULES and t != mod]


def _edges(mod: str) -> set[str]:
    # a package's __init__ importing its own submodules is how a package exposes them, not a dependency
    own = MODULES[mod].name == "__init__.py"
    return {t for t, _ in _imports(mod) if not (own and t.startswith(mod + "."))}


def test_the_import_graph_has_no_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for t in sorted(_edges(m)):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("low, high", [("captioning.compress", "captioning.training"),
                                       ("captioning.models", "captioning.training"),
                                       ("captioning.evaluation", "captioning.training")])
def test_lower_stages_do_not_import_training(low, high):
    """Training uses compression's masks, the models and the scorers; none of them needs training."""
    bad = sorted(f"{m} imports {t}" for m in MODULES if m == low or m.startswith(low + ".")
                 for t in _edges(m) if t == high or t.startswith(high + "."))
    assert not bad, bad


def test_no_module_takes_another_modules_private_names():
    bad = sorted(f"{m}: {t}.{n}" for m in MODULES for t, names in _imports(m)
                 for n in names if n.startswith("_") and not n.startswith("__"))
    assert not bad, bad


def test_training_xe_stays_small():
    """The cross-entropy stage is a step and a setup; the loop lives in loop.py."""
    assert len((PKG / "training" / "xe.py").read_text().splitlines()) < 200
