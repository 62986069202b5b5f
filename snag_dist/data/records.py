"""Binary layout of an entity block (the ``ents`` member of an entity-shard sample), and its columns.

A sample holds a block of consecutive entity ids (``PrepareOptions.entity_block``), column by
column. Why blocks rather than one sample per entity: every tar member costs a 512-byte header and
~60 us of Python in tarfile/webdataset (a ceiling of ~15K samples/s, ~40 MB/s for 2.5 KB entities),
while a block decodes with one ``np.frombuffer`` per column and batches with one vectorised copy.
The stream still shuffles and batches single entities.

Layout, little-endian. Every section starts at a multiple of 8 bytes (zero padding), so each one
decodes to an aligned, zero-copy view. M modalities in manifest order, B of them bags::

    i64 first_id | u32 n | u32 nnz[B]     the block holds entities first_id .. first_id + n - 1
    u8 kg[n]
    u8 mask[n, M]                         1 = the entity has that modality
    then per modality: dense -> (n, dim) values of its dtype, row-major (zeros where absent)
                       bag   -> u32 count[n], then i32 idx[nnz], then f32 val[nnz]
                                (entity i's entries follow entity i-1's; count[i] of them)
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from snag_dist.data.manifest import Manifest
from snag_dist.errors import DataError

MEMBER = "ents"  # tar member extension of an entity block
_HEAD = struct.Struct("<qI")
_SERIAL_ELEMS = 32768  # torch spreads a copy over threads above this size (at::internal::GRAIN_SIZE)


def cast_into(out: np.ndarray, src: np.ndarray) -> None:
    """``out[...] = src`` for float16/float32 rows into float32, through torch's vectorised cast.

    numpy converts float16 one element at a time (~3 ns each here, most of a batch's cost);
    torch's copy is vectorised (F16C, 0.2-1 ns). Chunks below torch's grain size keep each copy on this thread:
    spreading 100-KB copies over cores that other processes are using costs more than it saves.
    """
    if src.dtype == out.dtype or len(src) == 0:
        out[...] = src
        return
    step = max(1, _SERIAL_ELEMS // max(1, src[0].size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only views of a record: only read here
        dst_t, src_t = torch.from_numpy(out), torch.from_numpy(src)
    for a in range(0, len(src), step):
        dst_t[a:a + step].copy_(src_t[a:a + step])


def alloc_many(specs: list[tuple[tuple[int, ...], np.dtype | type]]) -> list[np.ndarray]:
    """Uninitialised arrays of the given (shape, dtype)s, carved from one allocation (8-byte aligned).

    One block of several MB instead of several ~1-MB arrays: when it is freed, glibc raises its
    mmap/trim thresholds past its size and hands the same memory to the next batch; separate arrays
    go back to the OS and return as fresh pages, whose faults cost ~1 ms per MB on these VMs —
    more than the copying that fills them.
    """
    nbytes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in specs]
    arena = np.empty(sum(_aligned(b) for b in nbytes), np.uint8)
    out, pos = [], 0
    for (shape, dtype), size in zip(specs, nbytes):
        out.append(arena[pos:pos + size].view(dtype).reshape(shape))
        pos += _aligned(size)
    return out


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # dense | bag
    dim: int
    dtype: np.dtype


class Csr(NamedTuple):
    """Rows of a bag modality: row i has columns indices[indptr[i]:indptr[i+1]] with values."""

    indptr: np.ndarray  # (n+1,) int64, indptr[0] == 0
    indices: np.ndarray  # (nnz,) int32
    values: np.ndarray  # (nnz,) float32

    def take(self, rows: np.ndarray) -> Csr:
        """The CSR of ``rows`` (any order, repeats allowed), vectorised."""
        lo, hi = self.indptr[rows], self.indptr[np.asarray(rows) + 1]
        lens = hi - lo
        indptr = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        flat = np.arange(indptr[-1], dtype=np.int64) + np.repeat(lo - indptr[:-1], lens)
        return Csr(indptr, self.indices[flat], self.values[flat])

    def slice(self, start: int, stop: int) -> Csr:
        """Rows [start, stop) without copying the entries."""
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        return Csr(self.indptr[start:stop + 1] - a, self.indices[a:b], self.values[a:b])

    def scatter_into(self, out: np.ndarray) -> None:
        """Dense rows: ``out[i, indices] = values`` for every row i of ``out`` (zeros elsewhere)."""
        rows = np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))
        out[rows, self.indices] = self.values

    @staticmethod
    def concat(parts: list[Csr]) -> Csr:
        ends = np.cumsum([0] + [int(p.indptr[-1]) for p in parts[:-1]])
        indptr = np.concatenate([[0]] + [p.indptr[1:] + e for p, e in zip(parts, ends)]).astype(np.int64)
        return Csr(indptr, np.concatenate([p.indices for p in parts]), np.concatenate([p.values for p in parts]))


@dataclass
class EntityBlock:
    """Entities in columns: ids (n,) int64, kg (n,) uint8, mask (n, M) bool, dense (n, D), bags."""

    ids: np.ndarray
    kg: np.ndarray
    mask: np.ndarray
    dense: dict[str, np.ndarray]  # storage dtype
    bags: dict[str, Csr]

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, start: int, stop: int) -> EntityBlock:
        return EntityBlock(self.ids[start:stop], self.kg[start:stop], self.mask[start:stop],
                           {k: v[start:stop] for k, v in self.dense.items()},
                           {k: v.slice(start, stop) for k, v in self.bags.items()})

    @staticmethod
    def shuffled(parts: list[EntityBlock], rng: np.random.Generator) -> EntityBlock:
        """The rows of ``parts`` in a random order, as one block.

        Fixed-size columns are scattered from each part straight to their shuffled positions: one
        copy, where concatenating and then permuting would be two (and a large fresh allocation).
        """
        n = sum(len(p) for p in parts)
        perm = rng.permutation(n)  # output row i is input row perm[i]
        dest = np.empty(n, np.int64)
        dest[perm] = np.arange(n)  # input row j goes to output row dest[j]
        starts = np.cumsum([0] + [len(p) for p in parts[:-1]])

        first = parts[0]
        fixed = [(p.ids, p.kg, p.mask, *p.dense.values()) for p in parts]
        outs = alloc_many([((n, *a.shape[1:]), a.dtype) for a in fixed[0]])
        for arrays, start in zip(fixed, starts):
            rows = dest[start:start + len(arrays[0])]
            for out, values in zip(outs, arrays):
                out[rows] = values
        return EntityBlock(outs[0], outs[1], outs[2], dict(zip(first.dense, outs[3:])),
                           {k: Csr.concat([p.bags[k] for p in parts]).take(perm) for k in first.bags})

    @staticmethod
    def concat(parts: list[EntityBlock]) -> EntityBlock:
        """Fresh, writable arrays (never views of the parts)."""
        first, n = parts[0], sum(len(p) for p in parts)
        fixed = [(p.ids, p.kg, p.mask, *p.dense.values()) for p in parts]
        outs = alloc_many([((n, *a.shape[1:]), a.dtype) for a in fixed[0]])
        for j, out in enumerate(outs):
            np.concatenate([arrays[j] for arrays in fixed], out=out)
        return EntityBlock(outs[0], outs[1], outs[2], dict(zip(first.dense, outs[3:])),
                           {k: Csr.concat([p.bags[k] for p in parts]) for k in first.bags})


def _aligned(pos: int) -> int:
    return pos + (-pos % 8)


@dataclass(frozen=True)
class EntityLayout:
    columns: tuple[Column, ...]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> EntityLayout:
        return cls(tuple(Column(n, m.kind, m.dim, np.dtype(m.dtype)) for n, m in manifest.modalities.items()))

    @property
    def bags(self) -> list[Column]:
        return [c for c in self.columns if c.kind == "bag"]

    def encode(self, block: EntityBlock) -> bytes:
        """One record for a block of consecutive ids (dense columns in their storage dtype)."""
        n = len(block)
        if n and not np.array_equal(block.ids, np.arange(block.ids[0], block.ids[0] + n)):
            raise ValueError("an entity block holds consecutive ids")
        first = int(block.ids[0]) if n else 0
        head = _HEAD.pack(first, n) + np.array([block.bags[c.name].indptr[-1] for c in self.bags], "<u4").tobytes()
        arrays = [np.frombuffer(head, np.uint8), block.kg.astype(np.uint8), block.mask.astype(np.uint8)]
        for c in self.columns:
            if c.kind == "bag":
                bag = block.bags[c.name]
                arrays += [np.diff(bag.indptr).astype("<u4"), bag.indices.astype("<i4"), bag.values.astype("<f4")]
            else:
                arrays.append(np.ascontiguousarray(block.dense[c.name], dtype=c.dtype.newbyteorder("<")))
        parts = []  # buffers joined once: no intermediate bytes copies of the (large) dense columns
        for arr in arrays:
            parts.append(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
            parts.append(bytes(-arr.nbytes % 8))
        return b"".join(parts)

    def decode(self, rec: bytes, key: str = "?") -> EntityBlock:
        """The block in ``rec``; dense and bag columns are read-only views of ``rec``."""
        m, nb = len(self.columns), len(self.bags)
        try:
            first, n = _HEAD.unpack_from(rec, 0)
            nnz = np.frombuffer(rec, "<u4", nb, _HEAD.size).tolist()
            pos = _aligned(_HEAD.size + 4 * nb)
            kg = np.frombuffer(rec, np.uint8, n, pos).copy()  # ids, kg, mask: small and writable (batch tensors)
            pos = _aligned(pos + n)
            mask = np.frombuffer(rec, np.uint8, n * m, pos).reshape(n, m).astype(bool)
            pos = _aligned(pos + n * m)
            dense, bags, bag_i = {}, {}, 0
            for c in self.columns:
                if c.kind == "dense":
                    dense[c.name] = np.frombuffer(rec, c.dtype.newbyteorder("<"), n * c.dim, pos).reshape(n, c.dim)
                    pos = _aligned(pos + n * c.dim * c.dtype.itemsize)
                    continue
                k = nnz[bag_i]
                bag_i += 1
                counts = np.frombuffer(rec, "<u4", n, pos)
                pos = _aligned(pos + 4 * n)
                idx = np.frombuffer(rec, "<i4", k, pos)
                pos = _aligned(pos + 4 * k)
                val = np.frombuffer(rec, "<f4", k, pos)
                pos = _aligned(pos + 4 * k)
                indptr = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(counts, out=indptr[1:])
                if indptr[-1] != k or (k and (idx.min() < 0 or idx.max() >= c.dim)):
                    raise ValueError
                bags[c.name] = Csr(indptr, idx, val)
        except (ValueError, struct.error):
            raise DataError(f"entity block {key}: truncated or malformed record") from None
        if pos != len(rec):
            raise DataError(f"entity block {key}: record has {len(rec)} bytes, layout expects {pos}")
        return EntityBlock(np.arange(first, first + n, dtype=np.int64), kg, mask, dense, bags)
