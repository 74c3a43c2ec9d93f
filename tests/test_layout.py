"""The package's import graph: no cycles, and arrows that run one way, down the layers training (Lightning,
the CLI) -> tools -> data -> library, so that loading a model or running a tool never needs Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "multimoe"
LIBRARY = {
    "config",
    "modality",
    "encoders",
    "moe",
    "trunk",
    "heads",
    "model",
    "lora",
    "quantize",
    "portable",
    "pretrained",
    "surgery",
    "tokenizer",
}
LAYERS = {"library": 0, "data": 1, "tools": 2, "training": 3}  # a module imports its own layer or lower ones


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The multimoe modules ``path`` imports anywhere (functions included), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "TYPE_CHECKING"
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "multimoe"}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {i for i in imports(path) if i in modules and i != name} for name, path in modules.items()}


def layer(module: str) -> str:
    top = module.split(".")[1] if "." in module else "library"
    return "library" if top in LIBRARY else top


def test_the_package_has_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_imports_run_from_tools_and_training_down_to_the_library() -> None:
    assert {layer(m) for m in graph()} == set(LAYERS) | {"library"}
    upward = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in targets
        if LAYERS[layer(b)] > LAYERS[layer(a)]
    ]
    assert upward == []


def test_the_library_and_the_tools_load_without_lightning() -> None:
    tools = [module_name(p) for p in (PACKAGE / "tools").glob("*.py")]
    library = [m for m in graph() if layer(m) == "library"]
    data = ["multimoe.data.dataset", "multimoe.data.collate", "multimoe.data.manifest"]
    code = "\n".join(f"import {m}" for m in sorted({*tools, *library, *data}))
    code += "\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0].endswith('lightning')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
