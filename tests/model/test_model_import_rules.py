"""The model and task layers stay backend-free: no distributed imports, no `.cuda(`.

The engine wraps plain modules from outside (STYLE.md habit 2); device comes from the inputs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "snag_dist"
FORBIDDEN = ("torch.distributed", "accelerate", "deepspeed")
FILES = sorted(p for layer in ("model", "tasks") for p in (ROOT / layer).rglob("*.py"))


def imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from torch import distributed
    return names


def test_model_package_is_scanned():
    assert ROOT / "model" / "snag.py" in FILES


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
