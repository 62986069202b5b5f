"""Memory-mapped entity feature store, filled once from the entity shards.

Training looks up a batch's entity features by id. Instead of every rank holding every entity,
a rank opens the store for its own id partition (``partition_range``): only the entity shards
overlapping that range are read, and the OS page cache — not the Python heap — holds the rows.
Small graphs use the whole range. The store is built in a temp directory and renamed, so
concurrent ranks on one node race safely (the first rename wins, the others reuse it).
"""

from __future__ import annotations

import json
import mmap
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from snag_dist.data.integrity import CheckedShard, store_key
from snag_dist.data.manifest import Manifest, ShardInfo, load_manifest
from snag_dist.data.npy_writer import NpyWriter
from snag_dist.data.records import MEMBER, Csr, EntityBlock, EntityLayout, alloc_many, cast_into
from snag_dist.errors import DataError
from snag_dist.fsio import atomic_dir, remove_stale

STORE_VERSION = 1


def partition_range(num_entities: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, balanced id range [start, stop) owned by ``rank``."""
    per, extra = divmod(num_entities, world_size)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


def _overlapping(manifest: Manifest, start: int, stop: int) -> list[ShardInfo]:
    return [s for s in manifest.shards["entities"] if not (s.last_id < start or s.first_id >= stop)]


def _iter_blocks(root: Path, manifest: Manifest, start: int, stop: int) -> Iterator[EntityBlock]:
    """Entity blocks of ids [start, stop) in order, cut to that range, each shard checked against the
    manifest (size at open, sha256 over the bytes read, ``integrity``) before its last block is
    handed on; a gap in the ids names the shard."""
    layout = EntityLayout.from_manifest(manifest)
    next_id = start
    for info in _overlapping(manifest, start, stop):
        path = root / info.file
        shard = CheckedShard(path, info)
        held = None  # a shard's blocks are passed on one behind, so its last waits for the check
        try:
            with tarfile.open(fileobj=shard, mode="r|") as tar:
                for member in tar:
                    if not member.name.endswith(f".{MEMBER}"):
                        raise DataError(f"corrupt shard {path}: unexpected member {member.name}")
                    block = layout.decode(tar.extractfile(member).read(), f"{path}: {member.name}")
                    if not (len(block) and block.ids[0] < stop and block.ids[-1] >= start):
                        continue
                    a, b = np.searchsorted(block.ids, [start, stop])
                    part = block.slice(int(a), int(b))
                    if part.ids[0] != next_id:  # shards and blocks hold ascending ids; a gap is a missing entity
                        shard.finish()  # a damaged shard explains a gap best
                        raise DataError(f"{root}: entity shards miss entity id {next_id} ({path} jumps to "
                                        f"{int(part.ids[0])})")
                    next_id += len(part)
                    if held is not None:
                        yield held
                    held = part
            shard.finish()
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            raise DataError(f"corrupt shard {path}: {exc}") from None
        finally:
            shard.close()
        if held is not None:
            yield held
    if next_id != stop:
        raise DataError(f"{root}: entity shards miss entity id {next_id}")


def _build(root: Path, manifest: Manifest, start: int, stop: int, tmp: Path) -> None:
    n = stop - start
    layout = EntityLayout.from_manifest(manifest)
    # Written front to back with plain writes (``NpyWriter``), never through a memory map.
    files = {"kg": NpyWriter(tmp / "kg.npy", np.uint8, (n,)),
             "mask": NpyWriter(tmp / "mask.npy", np.bool_, (n, len(layout.columns)))}
    files.update({c.name: NpyWriter(tmp / f"{c.name}.npy", c.dtype, (n, c.dim))
                  for c in layout.columns if c.kind == "dense"})
    bags: dict[str, list[Csr]] = {c.name: [] for c in layout.bags}
    try:
        for block in _iter_blocks(root, manifest, start, stop):
            files["kg"].append(block.kg)
            files["mask"].append(block.mask)
            for name, values in block.dense.items():
                files[name].append(values)
            for name, csr in block.bags.items():
                bags[name].append(Csr(csr.indptr, csr.indices.copy(), csr.values.copy()))
    finally:
        for fh in files.values():
            fh.close()
    for c in layout.bags:
        bag = Csr.concat(bags.pop(c.name))
        np.save(tmp / f"{c.name}.indptr.npy", bag.indptr)
        np.save(tmp / f"{c.name}.indices.npy", bag.indices.astype(np.int32))
        np.save(tmp / f"{c.name}.values.npy", bag.values.astype(np.float32))


def cached_build(folder: Path, meta_name: str, stamp: str, build: Callable[[Path], dict]) -> Path:
    """``folder`` built once per manifest: reused while ``folder/meta_name`` records ``stamp`` (the
    manifest's sha256, for the stores here also the source shards' checksums and files, see
    ``integrity.store_key``), else ``build(tmp)`` fills a temp folder (returning extra metadata) that is
    renamed into place. Concurrent builders race safely: the first rename wins, the others reuse it.
    Temp folders of builders that were killed (same host, dead PID) are removed on the way."""
    meta = folder / meta_name
    if meta.is_file() and json.loads(meta.read_text()).get("manifest_sha256") == stamp:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(folder, ("tmp", "old"))
    try:
        with atomic_dir(folder) as tmp:  # an outdated folder is renamed aside, then deleted
            extra = build(tmp) or {}
            (tmp / meta_name).write_text(json.dumps({**extra, "manifest_sha256": stamp}))
    except OSError:
        if not meta.is_file():  # no other rank finished it either
            raise
    return folder


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
        self.bags = {c.name: Csr(*(np.load(path / f"{c.name}.{p}.npy", mmap_mode="r")
                                   for p in ("indptr", "indices", "values")))
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

        def build(tmp: Path) -> dict:
            _build(root, manifest, start, stop, tmp)
            return {"version": STORE_VERSION}

        key = store_key(root, _overlapping(manifest, start, stop))  # a rewritten shard rebuilds (and is checked)
        path = cached_build(base / f"{start}-{stop}", "store.json", key, build)
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
        # One allocation for all feature matrices: the next lookup reuses it (see ``alloc_many``).
        outs = alloc_many([((len(local), c.dim), np.float32) for c in self.layout.columns])
        feats = {}
        for c, out in zip(self.layout.columns, outs):
            if c.kind == "dense":
                cast_into(out, self.dense[c.name][local])
            else:
                out.fill(0)
                self.bags[c.name].take(local).scatter_into(out)
            feats[c.name] = torch.from_numpy(out)
        return {"features": feats, "mask": torch.from_numpy(np.asarray(self.mask[local])),
                "kg": torch.from_numpy(np.asarray(self.kg[local]))}

    def _maps(self) -> list:
        arrays = [self.kg, self.mask, *self.dense.values(), *(a for bag in self.bags.values()
                                                               for a in (bag.indptr, bag.indices, bag.values))]
        return [m for m in (getattr(a, "_mmap", None) for a in arrays) if m is not None and hasattr(m, "madvise")]

    def advise_random(self) -> None:
        """Batches read scattered rows: without this, every page fault reads ahead ~128 KiB around
        it, and a 1M-entity store's resident set grows by ~1 GiB per step."""
        for mapped in self._maps():
            mapped.madvise(mmap.MADV_RANDOM)

    def release(self) -> None:
        """Drop the pages this process has read from its resident set (MADV_DONTNEED on the maps):
        they stay in the OS page cache, shared by every process on the node, but stop counting in
        this process's RSS, which otherwise grows towards the whole store as random batches touch it."""
        for mapped in self._maps():
            mapped.madvise(mmap.MADV_DONTNEED)

    def all(self) -> dict[str, object]:
        """The whole partition (small graphs: full-graph training)."""
        return self.lookup(np.arange(self.start, self.stop))
