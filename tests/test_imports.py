"""The import graph of the package: every module imports on its own, no cycles, arrows pointing one way
(entry points → launch → stages → train/engines → core), and a core that loads no torch.

The graph is read from the source (every `import`, module level or inside a function: a lazy import is still an
arrow), so a cycle hidden behind a function-level import is found too.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import oel_hpc

PKG = Path(oel_hpc.__file__).resolve().parent

# Lower layers never import higher ones. A module's layer is that of its longest matching prefix.
LAYERS = {
    "oel_hpc.__main__": 4, "oel_hpc.worker": 4, "oel_hpc.status": 4,
    "oel_hpc.launch": 3, "oel_hpc.lifecycle": 3,
    "oel_hpc.stages": 2, "oel_hpc.summary": 2,
    "oel_hpc.train": 1, "oel_hpc.engines": 1,
    "oel_hpc": 0,
}
TORCH_FREE = ["oel_hpc.errors", "oel_hpc.log", "oel_hpc.rundir", "oel_hpc.config", "oel_hpc.games", "oel_hpc.prompts",
              "oel_hpc.experience", "oel_hpc.pipeline", "oel_hpc.status", "oel_hpc.slurm", "oel_hpc.launch.render",
              "oel_hpc.launch.slurm", "oel_hpc.launch.local", "oel_hpc.worker", "oel_hpc.lifecycle", "oel_hpc.ranks",
              "oel_hpc.runlock", "oel_hpc.launch.guard", "oel_hpc.model_files", "oel_hpc.tracking",
              "oel_hpc.verify", "oel_hpc.vllm_check", "oel_hpc.report", "oel_hpc.svgplot", "oel_hpc.taskprogress"]


def all_modules() -> list[str]:
    names = []
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _path(module: str) -> Path:
    base = PKG.parent.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imports_of(module: str, known: set[str]) -> set[str]:
    """The oel_hpc modules `module` imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    path = _path(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import oel_hpc.games.text` → that module; a name → its module
                t = t.rpartition(".")[0]
            if t.startswith("oel_hpc") and t != module and t != "oel_hpc":
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = set(all_modules())
    return {m: imports_of(m, known) for m in known}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def test_the_graph_reader_sees_arrows():
    g = graph()
    assert "oel_hpc.errors" in g["oel_hpc.config"]  # a module-level import
    assert any(m.startswith("oel_hpc.stages.") for m in g["oel_hpc.stages"]) or g["oel_hpc.stages"]
    # a cycle planted in a copy of the graph is found
    planted = {k: set(v) for k, v in g.items()}
    planted["oel_hpc.errors"].add("oel_hpc.config")
    assert any({"oel_hpc.config", "oel_hpc.errors"} <= set(c) for c in cycles(planted))


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_arrows_point_down_the_layers():
    g = graph()
    upward = [f"{m} → {t}" for m, targets in sorted(g.items()) for t in sorted(targets)
              if layer(t) > layer(m) and not t.startswith(m + ".")]  # a package's __init__ may name its modules
    assert upward == []


def test_every_module_imports_on_its_own():
    """In one fresh interpreter, each module is imported with no other oel_hpc module loaded before it."""
    try:
        import megatron.core  # noqa: F401
        has_megatron = True
    except ImportError:
        has_megatron = False
    names = [m for m in all_modules() if has_megatron or "megatron" not in m.split(".")]
    names = [m for m in names if not m.endswith("loss_triton") and not m.endswith("loss.triton")
             and not m.endswith(".fused")]  # needs triton, which is GPU-only here
    code = (
        "import importlib, sys, traceback\n"
        f"bad = []\nfor name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'oel_hpc' or m.startswith('oel_hpc.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception as e:\n        bad.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=PKG.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("module", TORCH_FREE)
def test_core_loads_no_torch(module):
    if not _path(module).exists():
        pytest.skip(f"{module} does not exist in this layout")
    code = (f"import sys, {module}\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PKG.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
