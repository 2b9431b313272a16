"""Data flows one way: config → registry → loss → LightningModule → logger/report. Walk the imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import xentlab

PACKAGE = Path(xentlab.__file__).parent
FRAMEWORKS = ("hydra", "omegaconf", "pytorch_lightning", "lightning", "tensorboard")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports, at any depth (lazy imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        n for n in imported_modules(path) if any(n == f or n.startswith(f + ".") for f in forbidden)
    )


CORE = sorted((PACKAGE / "kernels").rglob("*.py")) + [PACKAGE / "functional.py", PACKAGE / "weights.py"]


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_math_core_knows_no_framework_and_no_registry(path):
    if not path.exists():
        pytest.fail(f"{path} is missing")
    assert (
        offending(path, (*FRAMEWORKS, "xentlab.losses", "xentlab.lab", "xentlab.train"))
        == []
    )


def test_module_gets_its_loss_from_train_not_the_registry():
    assert offending(PACKAGE / "lab" / "module.py", ("xentlab.losses", "xentlab.train", "hydra")) == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "lab" / "report").glob("*.py")), ids=lambda p: p.name)
def test_report_reads_files_not_live_objects(path):
    assert (
        offending(
            path,
            ("xentlab.train", "xentlab.lab.module", "xentlab.losses", "pytorch_lightning", "torch"),
        )
        == []
    )


def test_only_the_triton_backend_imports_triton():
    users = sorted(
        p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if offending(p, ("triton",))
    )
    assert users and all(u.startswith("kernels/triton/") for u in users), users


def test_xentlab_imports_and_trains_on_a_machine_without_triton():
    # torch itself imports triton when it is installed, so hide it: a None entry makes every import fail.
    code = (
        "import sys; sys.modules['triton'] = None; "
        "import xentlab, xentlab.functional, xentlab.losses, xentlab.train, torch; "
        "x = torch.randn(4, 3, requires_grad=True); "
        "xentlab.functional.cross_entropy(x, torch.tensor([0, 1, 2, 0])).backward(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_hydra_entry_point_imports_neither_torch_nor_lightning():
    # The process that launches a parallel sweep only composes configs and dispatches jobs; importing
    # the training stack there would add ~5 s to every joblib sweep.
    code = "import sys, xentlab.train; print(sorted({'torch', 'pytorch_lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def module_name(path: Path) -> str:
    parts = ["xentlab", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def own_imports(path: Path) -> set[str]:
    """The xentlab modules a file imports, at any depth: `from a.b import c` is `a.b.c` when that is a
    module, else `a.b`; relative imports are resolved against the file's package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            candidates = [(base, alias.name) for alias in node.names]
        else:
            continue
        for base, leaf in candidates:
            if leaf is not None and f"{base}.{leaf}" in MODULES:
                found.add(f"{base}.{leaf}")
            elif base in MODULES:
                found.add(base)
    return found - {name}


GRAPH = {name: own_imports(path) for name, path in MODULES.items()}
LIBRARY = ("xentlab.functional", "xentlab.kernels", "xentlab.losses", "xentlab.testing", "xentlab.weights",
           "xentlab.tasks")


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_import_graph_has_no_cycle():
    """Counting imports inside functions: a lazy import still ties the two modules together."""
    done, stack = set(), []

    def visit(name: str) -> None:
        if name in stack:
            cycle = stack[stack.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        stack.append(name)
        for imported in sorted(GRAPH[name]):
            visit(imported)
        stack.pop()
        done.add(name)

    assert "xentlab.lab.run" in GRAPH["xentlab.train"]  # the walk sees function-local imports
    for name in sorted(GRAPH):
        visit(name)


@pytest.mark.parametrize(("layer", "forbidden"), [
    (LIBRARY, ("xentlab.lab", "xentlab.train", "xentlab.cli")),
    (("xentlab.lab",), ("xentlab.train", "xentlab.cli")),
], ids=["library", "lab"])
def test_no_layer_imports_the_one_above(layer, forbidden):
    upward = sorted(f"{name} -> {imported}" for name, imports in GRAPH.items() if within(name, layer)
                    for imported in imports if within(imported, forbidden))
    assert upward == []
