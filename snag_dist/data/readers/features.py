"""Per-modality entity feature files, opened lazily so rows are read in chunks.

Accepted in ``DATASET_DIR/features/``, one file per modality, row i = entity i:
- ``<modality>.npy``: (N, D) float16/float32/float64, memory-mapped; optional ``<modality>.present.npy``
  (N,) bool/uint8 (1 = the entity has this modality; default: all present).
- ``<modality>.safetensors``: tensor ``features`` (N, D) and optional ``present`` (N,).
- ``<modality>.pkl``: an EVA-style ``{entity_id: vector}`` dict; read only with ``allow_pickle``
  (pickles can run code), entities missing from the dict are absent.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from snag_dist.errors import DataError

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass
class FeatureSource:
    """One modality's features: a lazily-read (N, D) table plus a presence mask."""

    name: str
    path: Path
    table: object  # np.memmap / np.ndarray / safetensors slice; supports [a:b]
    present: np.ndarray  # (N,) bool
    dim: int

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        block = np.asarray(self.table[start:stop], dtype=np.float32)
        return block, self.present[start:stop]


def _check_shape(path: Path, shape: tuple[int, ...], dtype, num_entities: int) -> int:
    if len(shape) != 2:
        raise DataError(f"{path}: features must be 2-D (entities, dim), got shape {tuple(shape)}")
    if shape[0] != num_entities:
        raise DataError(f"{path}: wrong shape {tuple(shape)}: expected {num_entities} rows (one per entity)")
    if shape[1] == 0:
        raise DataError(f"{path}: features have no columns (shape {tuple(shape)})")
    if not isinstance(dtype, np.dtype) and dtype not in FLOAT_DTYPES:  # e.g. a safetensors 'I32' or 'BF16'
        raise DataError(f"{path}: wrong dtype {dtype}: expected float16/float32/float64")
    if np.dtype(dtype) not in [np.dtype(d) for d in FLOAT_DTYPES]:
        raise DataError(f"{path}: wrong dtype {np.dtype(dtype)}: expected float16/float32/float64")
    return int(shape[1])


def _load_npy(path: Path, **kw) -> np.ndarray:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not a .npy array")
    try:
        return np.load(path, allow_pickle=False, **kw)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None


def _present_mask(path: Path | None, values, num_entities: int) -> np.ndarray:
    if values is None:
        return np.ones(num_entities, dtype=bool)
    mask = np.asarray(values).reshape(-1)
    if mask.shape[0] != num_entities:
        raise DataError(f"{path}: presence mask has {mask.shape[0]} rows, expected {num_entities}")
    return mask.astype(bool)


def _open_npy(path: Path, name: str, num_entities: int) -> FeatureSource:
    table = _load_npy(path, mmap_mode="r")
    dim = _check_shape(path, table.shape, table.dtype, num_entities)
    mask_path = path.with_name(f"{name}.present.npy")
    present = _load_npy(mask_path) if mask_path.is_file() else None
    return FeatureSource(name, path, table, _present_mask(mask_path, present, num_entities), dim)


def _open_safetensors(path: Path, name: str, num_entities: int) -> FeatureSource:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="numpy")
        keys = set(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
    if "features" not in keys:
        raise DataError(f"{path}: missing tensor 'features' (found: {', '.join(sorted(keys))})")
    table = handle.get_slice("features")
    shape = tuple(table.get_shape())
    dtype = {"F16": np.float16, "F32": np.float32, "F64": np.float64}.get(table.get_dtype(), table.get_dtype())
    dim = _check_shape(path, shape, dtype, num_entities)
    present = handle.get_tensor("present") if "present" in keys else None
    return FeatureSource(name, path, table, _present_mask(path, present, num_entities), dim)


def _open_pickle(path: Path, name: str, num_entities: int, allow_pickle: bool) -> FeatureSource:
    if not allow_pickle:  # unpickling can run code: only on the user's explicit --allow-pickle
        raise DataError(f"{path}: pickle input refused (it can run code); pass --allow-pickle if you trust it")
    try:
        data = pickle.loads(path.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise DataError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty {{entity_id: vector}} dict")
    table = present = None
    dim = 0
    for key, vec in data.items():
        try:
            idx = int(key)
            with np.errstate(over="ignore"):  # float64 beyond float32 -> inf: reported as non-finite later
                row = np.asarray(vec, dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(f"{path}: entry {key!r}: expected an integer entity id and a numeric vector") from None
        if row.ndim != 1 or row.size == 0:
            raise DataError(f"{path}: entity {key!r} has shape {row.shape}, expected a non-empty vector")
        if table is None:
            dim = row.size
            table = np.zeros((num_entities, dim), dtype=np.float32)
            present = np.zeros(num_entities, dtype=bool)
        if not 0 <= idx < num_entities:
            raise DataError(f"{path}: entity id {idx} out of range [0, {num_entities})")
        if row.size != dim:
            raise DataError(f"{path}: entity {idx} has dim {row.size}, expected {dim}")
        table[idx] = row
        present[idx] = True
    return FeatureSource(name, path, table, present, dim)


def discover_features(root: Path, num_entities: int, allow_pickle: bool = False) -> dict[str, FeatureSource]:
    """Open every modality file in ``root/features`` (sorted by name)."""
    folder = root / "features"
    if not folder.is_dir():
        return {}
    out: dict[str, FeatureSource] = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".present.npy") or path.name.startswith("."):
            continue
        name = path.name.split(".")[0]
        if name in out:
            raise DataError(f"{path}: modality '{name}' given by two files")
        if path.suffix == ".npy":
            out[name] = _open_npy(path, name, num_entities)
        elif path.suffix == ".safetensors":
            out[name] = _open_safetensors(path, name, num_entities)
        elif path.suffix in (".pkl", ".pickle"):
            out[name] = _open_pickle(path, name, num_entities, allow_pickle)
        else:
            raise DataError(f"{path}: unknown feature file type (use .npy, .safetensors, or .pkl with --allow-pickle)")
    return out
