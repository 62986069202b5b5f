"""Checkpoints as safetensors + JSON, written to a temp directory and renamed (never half-written).

``RUN/checkpoints/<tag>/{model.safetensors, optim.safetensors, state.json, rng.safetensors,
task.safetensors, optim.rank<R>.safetensors}``; tags ``epoch_<E>`` (before epoch E) and
``epoch_<E>_step_<S>`` (S batches into epoch E); the last K kept. Every rank writes its own optimizer
partition (ZeRO) into the same temp folder, so RUN must be on a filesystem all nodes share.
No pickles anywhere: optimizer state is flattened into named tensors plus a JSON skeleton.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from snag_dist.errors import CheckpointError
from snag_dist.fsio import install_dir


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
                    tag: str = "", rng: dict[str, torch.Tensor] | None = None,
                    task_state: dict[str, torch.Tensor] | None = None,
                    rank_shards: dict[str, torch.Tensor] | None = None, rank: int = 0, is_main: bool = True,
                    barrier: Callable[[], None] | None = None,
                    rank_files: dict[str, list[dict[str, torch.Tensor]]] | None = None) -> Path:
    """Write one checkpoint; with ``barrier`` every rank calls this (rank shards), else rank 0 only.
    ``rank_files``: per-rank state in chunks (the sharded entity table) written as ``<name>.rank<R>.<K>.safetensors``."""
    sync = barrier or (lambda: None)
    final = folder / tag
    tmp = folder / f".{tag}.tmp"
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    sync()
    if rank_shards:
        save_file(_tensors(rank_shards), str(tmp / f"optim.rank{rank}.safetensors"))
    for name, parts in (rank_files or {}).items():  # a list of row chunks, one file each
        for k, tensors in enumerate(parts):
            save_file(_tensors(tensors), str(tmp / f"{name}.rank{rank}.{k}.safetensors"))
    if not is_main:
        sync()
        sync()
        return final
    save_file(_tensors(model_state), str(tmp / "model.safetensors"))
    if task_state:
        save_file(_tensors(task_state), str(tmp / "task.safetensors"))
    if optim_state is not None:
        tensors, skeleton = flatten_optimizer(optim_state)
        save_file(tensors, str(tmp / "optim.safetensors"))
        state = {**state, "optimizer": skeleton}
    if rng:
        save_file(_tensors(rng), str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
    sync()  # every rank's partition is on disk
    install(tmp, final)
    if keep_last:
        _prune(folder, keep_last)
    sync()
    return final


def _aside(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def install(tmp: Path, final: Path) -> None:
    """Rename a complete ``tmp`` folder to ``final``. An existing ``final`` (e.g. ``best``) is renamed
    aside first and deleted last, so at every instant either ``final`` or its aside copy is a whole
    checkpoint: a kill between the renames leaves ``.<tag>.old``, which ``checkpoint_dir`` reads and
    ``recover`` renames back."""
    install_dir(tmp, final, aside=_aside(final))


def checkpoint_dir(folder: Path, tag: str) -> Path:
    """``folder/tag``, or its aside copy when a kill interrupted the replacement of ``tag`` (read-only:
    for readers that do not hold the run lock)."""
    final, old = folder / tag, _aside(folder / tag)
    if not final.is_dir() and (old / "state.json").is_file():
        return old
    return final


def recover(folder: Path) -> list[str]:
    """Under the run lock: put back checkpoints whose replacement a kill interrupted, drop aside
    copies whose replacement completed and temp folders of unfinished writes. Returns the recovered tags."""
    if not folder.is_dir():
        return []
    back = []
    for old in folder.glob(".*.old"):
        final = folder / old.name[1:-len(".old")]
        if not final.exists() and (old / "state.json").is_file():
            os.replace(old, final)
            back.append(final.name)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in folder.glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    return back


def tags(folder: Path) -> list[str]:
    """Checkpoint names in ``folder`` (``best``, ``epoch_N``...), including ones only an aside copy holds."""
    if not folder.is_dir():
        return []
    names = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    names |= {p.name[1:-len(".old")] for p in folder.glob(".*.old") if (p / "state.json").is_file()}
    return sorted(names)


def _position(path: Path) -> tuple[int, int]:
    """``epoch_5`` -> (5, 0); ``epoch_4_step_30`` -> (4, 30): the order training reached them."""
    parts = path.name.split("_")
    return int(parts[1]), int(parts[3]) if len(parts) == 4 else 0


def _prune(folder: Path, keep_last: int) -> None:
    steps = sorted((p for p in folder.iterdir() if p.name.startswith("epoch_")), key=_position)
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_task_state(path: Path) -> dict[str, torch.Tensor]:
    """The task's own state (e.g. alignment pseudo links) saved with a checkpoint ({} when none)."""
    return _load_optional(path / "task.safetensors", path)


def load_rank_files(path: Path, name: str, rows: tuple[int, int] | None = None,
                    keys: tuple[str, ...] | None = None) -> list[dict[str, torch.Tensor]]:
    """Every ``<name>.rank<R>.<K>.safetensors`` of a checkpoint (rank R's K-th chunk), in (R, K) order;
    with ``rows``, only the chunks whose "range" overlaps [rows[0], rows[1]); with ``keys``, only those
    tensors (e.g. weights without optimizer moments)."""
    def order(p: Path) -> tuple[int, int]:
        rank, chunk = p.name[len(name) + len(".rank"):].split(".")[:2]
        return int(rank), int(chunk)

    files = sorted(path.glob(f"{name}.rank*.*.safetensors"), key=order)
    if not files:
        raise CheckpointError(f"checkpoint {path} has no {name}.rank<R>.<K>.safetensors (saved on the full data path?)")
    if rows is None and keys is None:
        return [_load_optional(f, path) for f in files]
    out = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as part:
                a, b = (int(v) for v in part.get_tensor("range").reshape(-1)[:2])
                if rows is not None and (b <= rows[0] or a >= rows[1]):
                    continue
                out.append({k: part.get_tensor(k) for k in part.keys() if keys is None or k in keys})
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from None
    return out


def _row_blocks(path: Path, name: str, rows: tuple[int, int], key: str, block: int):
    """(first row, tensor) blocks of rows [rows[0], rows[1]) of tensor ``key`` of the ``<name>.rank<R>.<K>``
    files, in row order, ``block`` rows at a time; a one-line error unless the files cover them."""
    files = sorted(path.glob(f"{name}.rank*.*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path} has no {name}.rank<R>.<K>.safetensors (saved on the full data path?)")
    lo, hi = rows
    ranges = []
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as part:
                ranges.append(tuple(int(v) for v in part.get_tensor("range").reshape(-1)[:2]) + (f,))
        filled = 0
        for a, b, f in sorted(ranges, key=lambda r: r[0]):
            s, e = max(a, lo), min(b, hi)
            if s >= e:
                continue
            with safe_open(str(f), framework="pt") as part:
                src = part.get_slice(key)
                for x in range(s, e, block):
                    y = min(x + block, e)
                    yield x, src[x - a:y - a]
            filled += e - s
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from None
    if filled != hi - lo:  # the saved ranges tile [0, N): anything else is a foreign or partial checkpoint
        raise CheckpointError(f"checkpoint {path}: its {name} files hold {filled} of rows [{lo}, {hi})")


def read_rank_rows(path: Path, name: str, rows: tuple[int, int], out: torch.Tensor, key: str = "weight",
                   block: int = 65_536) -> None:
    """Fill ``out`` (rows[1] - rows[0], ...) with rows [rows[0], rows[1]) of tensor ``key`` of the
    ``<name>.rank<R>.<K>`` files, ``block`` rows at a time: no second copy of the rows is ever held
    (a 1M-entity table loaded whole, then cut and copied, briefly needs three times its size)."""
    for x, values in _row_blocks(path, name, rows, key, block):
        out[x - rows[0]:x - rows[0] + len(values)].copy_(values)


def map_rank_rows(path: Path, name: str, rows: tuple[int, int], tmp_dir: Path, key: str = "weight") -> np.ndarray:
    """Rows [rows[0], rows[1]) of float32 tensor ``key`` of the ``<name>.rank<R>.<K>`` files as a read-only
    (copy-on-write) memory map: of the checkpoint file itself when one file holds them all, else of a
    file in ``tmp_dir`` they are copied into block by block. Evaluation reads the table this way: its
    pages can leave the resident set after use (``ShardedTable.release``) instead of N/W rows held."""
    lo, hi = rows
    for f in sorted(path.glob(f"{name}.rank*.*.safetensors")):
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            with safe_open(str(f), framework="pt") as part:
                a, b = (int(v) for v in part.get_tensor("range").reshape(-1)[:2])
        except (OSError, ValueError, SafetensorError) as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt: {f.name}: {exc}") from None
        info = header.get(key, {})
        if a <= lo and hi <= b and info.get("dtype") == "F32" and len(info.get("shape", ())) == 2:
            width = int(info["shape"][1])
            offset = 8 + size + int(info["data_offsets"][0]) + (lo - a) * width * 4
            return np.memmap(f, dtype=np.float32, mode="c", offset=offset, shape=(hi - lo, width))
    # Several files (another world size): one contiguous copy, written with plain writes (pages
    # written through a mapping would count in this process's resident set).
    out, width = tmp_dir / f"{name}.rows-{lo}-{hi}.f32", 0
    with open(out, "wb") as fh:
        for _, values in _row_blocks(path, name, rows, key, 65_536):
            values.float().numpy().tofile(fh)
            width = values.shape[1]
    return np.memmap(out, dtype=np.float32, mode="c", shape=(hi - lo, width))


def load_rank_shard(path: Path, rank: int) -> dict[str, torch.Tensor]:
    file = path / f"optim.rank{rank}.safetensors"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no optimizer partition for rank {rank} "
                              "(saved with a different number of processes or ZeRO stage?)")
    return _load_optional(file, path)


def _load_optional(file: Path, path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file)) if file.is_file() else {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from None


def load_rng(path: Path) -> dict[str, torch.Tensor]:
    """Every rank's RNG states saved with a checkpoint ({} when none)."""
    return _load_optional(path / "rng.safetensors", path)


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
    return max(steps, key=_position) if steps else None
