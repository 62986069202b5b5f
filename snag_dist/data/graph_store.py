"""The training graph as a memory-mapped CSR adjacency, built once from the triple shards.

Sampled GAT training (``snag_dist.model.sampling``) reads the neighbours of a batch's entities
only, so no rank needs the graph as tensors in memory: ``indptr.npy`` (N+1,) and ``indices.npy``
are mapped and the OS page cache holds the rows that get read. The adjacency is undirected and
de-duplicated, without self-loops (the GAT adds one per node itself): a triple (h, r, t) gives t
in row h and h in row t, relations are ignored, and every row's neighbours are sorted ascending.

Built from ``triples/train`` under ``SHARDS/.store/graph`` (or ``store_dir/graph``), stamped with
the manifest's sha256 and the triple shards' files (``integrity.store_key``) and rebuilt when they
change. Like the feature store it is written in a temp directory and renamed, so concurrent ranks
on one node race safely.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from snag_dist.data.integrity import store_key
from snag_dist.data.manifest import Manifest, load_manifest
from snag_dist.data.store import cached_build
from snag_dist.data.stream import RowStream, StreamConfig
from snag_dist.errors import DataError

GRAPH_VERSION = 1
GROUP = "triples/train"


def _edge_keys(root: Path, num_nodes: int) -> np.ndarray:
    """dst * N + src of both directions of every non-loop training triple, unsorted, duplicates kept."""
    parts = []
    for block in RowStream(root, GROUP, StreamConfig(batch_size=1 << 20)):
        hrt = block.numpy()
        if hrt.size and (hrt[:, [0, 2]].min() < 0 or hrt[:, [0, 2]].max() >= num_nodes):
            raise DataError(f"{root}: {GROUP} has entity ids outside [0, {num_nodes})")
        h, t = hrt[:, 0], hrt[:, 2]
        keep = h != t
        h, t = h[keep], t[keep]
        keys = np.empty(2 * len(h), dtype=np.int64)
        np.multiply(h, num_nodes, out=keys[: len(h)])
        keys[: len(h)] += t
        np.multiply(t, num_nodes, out=keys[len(h):])
        keys[len(h):] += h
        parts.append(keys)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _build(root: Path, num_nodes: int, tmp: Path) -> None:
    # Memory: the per-block keys and their concatenation (2 x 2T int64) briefly, then the sorted
    # keys plus the de-duplicated copy; ~160 MB at peak for 5M triples.
    if num_nodes >= 3_037_000_499:  # N * N must fit in int64
        raise DataError(f"{root}: {num_nodes} entities is too many for one graph store")
    keys = _edge_keys(root, num_nodes)
    keys.sort()
    if len(keys):
        fresh = np.empty(len(keys), dtype=bool)
        fresh[0] = True
        np.not_equal(keys[1:], keys[:-1], out=fresh[1:])
        keys = keys[fresh]
        del fresh
    # Row r's edges are the keys in [r * N, (r + 1) * N).
    indptr = np.searchsorted(keys, np.arange(num_nodes + 1, dtype=np.int64) * num_nodes).astype(np.int64)
    np.remainder(keys, num_nodes, out=keys)
    np.save(tmp / "indptr.npy", indptr)
    np.save(tmp / "indices.npy", keys.astype(np.int32) if num_nodes < 2**31 else keys)


class GraphStore:
    """Undirected CSR adjacency of the training triples, memory-mapped: row i's neighbours are
    ``indices[indptr[i]:indptr[i + 1]]``, sorted, unique, never i itself."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path, self.manifest = path, manifest
        self.indptr = np.load(path / "indptr.npy", mmap_mode="r")
        self.indices = np.load(path / "indices.npy", mmap_mode="r")
        self.num_nodes = len(self.indptr) - 1

    @classmethod
    def open(cls, shards: str | Path, store_dir: str | Path | None = None) -> GraphStore:
        root = Path(shards)
        manifest = load_manifest(root)
        base = Path(store_dir) if store_dir else root / ".store"

        def build(tmp: Path) -> dict:
            _build(root, manifest.num_entities, tmp)
            return {"version": GRAPH_VERSION, "num_nodes": manifest.num_entities}

        key = store_key(root, manifest.shards.get(GROUP, []))  # a rewritten triple shard rebuilds (and is checked)
        path = cached_build(base / "graph", "graph.json", key, build)
        return cls(path, manifest)

    @property
    def num_edges(self) -> int:
        """Directed edges: twice the undirected ones."""
        return int(self.indptr[-1])

    def degree(self, ids) -> np.ndarray:
        """Neighbour counts of ``ids`` (array-like of node ids), int64."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_nodes):
            raise DataError(f"node ids outside [0, {self.num_nodes})")
        return self.indptr[ids + 1] - self.indptr[ids]

    def release(self, advice: int = mmap.MADV_DONTNEED) -> None:
        """Drop the pages read so far from this process's resident set (see FeatureStore.release)."""
        for array in (self.indptr, self.indices):
            mapped = getattr(array, "_mmap", None)
            if mapped is not None and hasattr(mapped, "madvise"):
                mapped.madvise(advice)

    def advise_random(self) -> None:
        """Sampling reads scattered rows: no read-ahead (see FeatureStore.advise_random)."""
        self.release(mmap.MADV_RANDOM)
