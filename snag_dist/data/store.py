"""Memory-mapped entity feature store, filled once from the entity shards.

Training looks up a batch's entity features by id. Instead of every rank holding every entity,
a rank opens the store for its own id partition (``partition_range``): only the entity shards
overlapping that range are read, and the OS page cache — not the Python heap — holds the rows.
Small graphs use the whole range. The store is built in a temp directory and renamed, so
concurrent ranks on one node race safely (the first rename wins, the others reuse it).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from snag_dist.data.manifest import Manifest, load_manifest, sha256_file
from snag_dist.data.records import EntityLayout
from snag_dist.errors import DataError

STORE_VERSION = 1


def partition_range(num_entities: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, balanced id range [start, stop) owned by ``rank``."""
    per, extra = divmod(num_entities, world_size)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


@dataclass
class _Bag:
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    dim: int


def _iter_records(root: Path, manifest: Manifest, start: int, stop: int):
    layout = EntityLayout.from_manifest(manifest)
    for info in manifest.shards["entities"]:
        if info.last_id < start or info.first_id >= stop:
            continue
        path = root / info.file
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    eid = int(member.name.split(".", 1)[0])
                    if start <= eid < stop:
                        yield eid, layout.decode(tar.extractfile(member).read(), member.name)
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise DataError(f"corrupt shard {path}: {exc}") from None


def _build(root: Path, manifest: Manifest, start: int, stop: int, tmp: Path) -> None:
    n = stop - start
    layout = EntityLayout.from_manifest(manifest)
    m = len(layout.columns)
    kg = np.lib.format.open_memmap(tmp / "kg.npy", "w+", np.uint8, (n,))
    mask = np.lib.format.open_memmap(tmp / "mask.npy", "w+", np.bool_, (n, m))
    dense = {c.name: np.lib.format.open_memmap(tmp / f"{c.name}.npy", "w+", c.dtype, (n, c.dim))
             for c in layout.columns if c.kind == "dense"}
    bag_rows: dict[str, list] = {c.name: [None] * n for c in layout.bags}
    seen = np.zeros(n, dtype=bool)
    for eid, (k, msk, parts) in _iter_records(root, manifest, start, stop):
        i = eid - start
        kg[i], mask[i], seen[i] = k, msk, True
        for name, value in parts.items():
            if name in dense:
                dense[name][i] = value
            else:
                bag_rows[name][i] = value
    if not seen.all():
        raise DataError(f"{root}: entity shards miss entity id {start + int(np.argmin(seen))}")
    for c in layout.bags:
        rows = bag_rows.pop(c.name)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(r[0]) for r in rows], out=indptr[1:])
        np.save(tmp / f"{c.name}.indptr.npy", indptr)
        np.save(tmp / f"{c.name}.indices.npy", np.concatenate([r[0] for r in rows]).astype(np.int32))
        np.save(tmp / f"{c.name}.values.npy", np.concatenate([r[1] for r in rows]).astype(np.float32))
    for arr in (kg, mask, *dense.values()):
        arr.flush()


class FeatureStore:
    """Entity features of ids [start, stop), memory-mapped; ``lookup`` returns float32 tensors."""

    def __init__(self, path: Path, manifest: Manifest, start: int, stop: int) -> None:
        self.path, self.manifest, self.start, self.stop = path, manifest, start, stop
        self.layout = EntityLayout.from_manifest(manifest)
        self.modalities = [c.name for c in self.layout.columns]
        self.kg = np.load(path / "kg.npy", mmap_mode="r")
        self.mask = np.load(path / "mask.npy", mmap_mode="r")
        self.dense = {c.name: np.load(path / f"{c.name}.npy", mmap_mode="r")
                      for c in self.layout.columns if c.kind == "dense"}
        self.bags = {c.name: _Bag(*(np.load(path / f"{c.name}.{p}.npy", mmap_mode="r")
                                    for p in ("indptr", "indices", "values")), c.dim)
                     for c in self.layout.bags}

    @classmethod
    def open(cls, shards: str | Path, store_dir: str | Path | None = None,
             partition: tuple[int, int] | None = None) -> FeatureStore:
        root = Path(shards)
        manifest = load_manifest(root)
        start, stop = partition or (0, manifest.num_entities)
        if not 0 <= start < stop <= manifest.num_entities:
            raise DataError(f"entity partition [{start}, {stop}) outside [0, {manifest.num_entities})")
        base = Path(store_dir) if store_dir else root / ".store"
        path = base / f"{start}-{stop}"
        stamp = sha256_file(root / "manifest.json")
        meta = path / "store.json"
        if meta.is_file() and json.loads(meta.read_text()).get("manifest_sha256") == stamp:
            return cls(path, manifest, start, stop)
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".{start}-{stop}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _build(root, manifest, start, stop, tmp)
            (tmp / "store.json").write_text(json.dumps({"version": STORE_VERSION, "manifest_sha256": stamp}))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        except OSError:
            if not meta.is_file():  # no other rank finished it either
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(path, manifest, start, stop)

    def _local(self, ids: np.ndarray) -> np.ndarray:
        local = np.asarray(ids, dtype=np.int64) - self.start
        if local.size and (local.min() < 0 or local.max() >= self.stop - self.start):
            bad = int(ids[(local < 0) | (local >= self.stop - self.start)][0])
            raise DataError(f"entity id {bad} outside this store's partition [{self.start}, {self.stop})")
        return local

    def lookup(self, ids) -> dict[str, object]:
        """Features of ``ids``: {"features": {m: (B,D) float32}, "mask": (B,M) bool, "kg": (B,) uint8}."""
        local = self._local(np.asarray(ids))
        feats = {}
        for c in self.layout.columns:
            if c.kind == "dense":
                feats[c.name] = torch.from_numpy(np.asarray(self.dense[c.name][local], dtype=np.float32))
            else:
                feats[c.name] = torch.from_numpy(self._bag_rows(self.bags[c.name], local))
        return {"features": feats, "mask": torch.from_numpy(np.asarray(self.mask[local])),
                "kg": torch.from_numpy(np.asarray(self.kg[local]))}

    @staticmethod
    def _bag_rows(bag: _Bag, local: np.ndarray) -> np.ndarray:
        out = np.zeros((len(local), bag.dim), dtype=np.float32)
        lo, hi = bag.indptr[local], bag.indptr[local + 1]
        lens = hi - lo
        rows = np.repeat(np.arange(len(local)), lens)
        offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(lo, lens)
        out[rows, bag.indices[offs]] = bag.values[offs]
        return out

    def all(self) -> dict[str, object]:
        """The whole partition (small graphs: full-graph training)."""
        return self.lookup(np.arange(self.start, self.stop))
