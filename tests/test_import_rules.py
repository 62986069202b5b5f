"""The model, task, evaluation and data layers stay backend-free: no distributed imports, nothing
from the engine, no `.cuda(`.

The engine wraps plain modules from outside (STYLE.md habit 2) and injects collectives into a task
through its constructor (``comm``); device comes from the inputs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "snag_dist"
FORBIDDEN = ("torch.distributed", "accelerate", "deepspeed", "snag_dist.engine")
FILES = sorted(p for layer in ("model", "tasks", "eval", "data") for p in (ROOT / layer).rglob("*.py"))


def imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from torch import distributed
    return names


def test_every_layer_is_scanned():
    for path in ("model/snag.py", "tasks/completion/task.py", "eval/filtered.py", "data/epoch_stream.py"):
        assert ROOT / path in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_backend_imports_or_cuda_calls(path):
    source = path.read_text()
    bad = [
        mod
        for mod in imported_modules(ast.parse(source))
        if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert not bad, f"{path} imports {bad}"
    assert ".cuda(" not in source, f"{path} calls .cuda(); take the device from inputs or parameters"
