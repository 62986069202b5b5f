"""Checkpoints as safetensors + JSON, written to a temp directory and renamed (never half-written).

``RUN/checkpoints/<tag>/{model.safetensors, optim.safetensors, state.json}``; ``last`` K kept.
No pickles anywhere: optimizer state is flattened into named tensors plus a JSON skeleton.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from snag_dist.errors import CheckpointError


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, skeleton = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        skeleton["state"][str(idx)] = {}
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous().clone()
                skeleton["state"][str(idx)][key] = "tensor"
            else:
                skeleton["state"][str(idx)][key] = value
    return tensors, skeleton


def unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for idx, slots in skeleton["state"].items():
        state[int(idx)] = {k: (tensors[f"{idx}.{k}"] if v == "tensor" else v) for k, v in slots.items()}
    return {"state": state, "param_groups": skeleton["param_groups"]}


def save_checkpoint(folder: Path, model_state: dict, optim_state: dict | None, state: dict, keep_last: int = 0,
                    tag: str = "", rng: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / tag
    tmp = folder / f".{tag}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_tensors(model_state), str(tmp / "model.safetensors"))
    if optim_state is not None:
        tensors, skeleton = flatten_optimizer(optim_state)
        save_file(tensors, str(tmp / "optim.safetensors"))
        state = {**state, "optimizer": skeleton}
    if rng:
        save_file(_tensors(rng), str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        _prune(folder, keep_last)
    return final


def _prune(folder: Path, keep_last: int) -> None:
    steps = sorted((p for p in folder.iterdir() if p.name.startswith("epoch_")),
                   key=lambda p: int(p.name.split("_")[1]))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_rng(path: Path) -> dict[str, torch.Tensor]:
    """Every rank's RNG states saved with a checkpoint ({} when none)."""
    file = path / "rng.safetensors"
    try:
        return load_file(str(file)) if file.is_file() else {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from None


def load_checkpoint(path: Path) -> tuple[dict, dict | None, dict]:
    """-> (model state, optimizer state or None, state.json)."""
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"checkpoint {path} is missing or incomplete (state.json / model.safetensors)")
    try:
        state = json.loads((path / "state.json").read_text())
        model = load_file(str(path / "model.safetensors"))
        optim = None
        if (path / "optim.safetensors").is_file() and "optimizer" in state:
            optim = unflatten_optimizer(load_file(str(path / "optim.safetensors")), state.pop("optimizer"))
    except (json.JSONDecodeError, SafetensorError, OSError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from None
    return model, optim, state


def latest(folder: Path) -> Path | None:
    steps = [p for p in folder.glob("epoch_*") if (p / "state.json").is_file()]
    return max(steps, key=lambda p: int(p.name.split("_")[1])) if steps else None
