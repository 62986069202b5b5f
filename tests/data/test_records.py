"""Entity blocks: the byte layout round-trips, malformed records fail clearly, and the vectorised
column operations (CSR take/slice/concat/scatter, float16 casts) equal a per-entity reference."""

from __future__ import annotations

import numpy as np
import pytest

from snag_dist.data.records import Column, Csr, EntityBlock, EntityLayout, alloc_many, cast_into
from snag_dist.errors import DataError

LAYOUT = EntityLayout((
    Column("relation", "bag", 12, np.dtype("float32")),
    Column("image", "dense", 5, np.dtype("float16")),
    Column("name", "dense", 3, np.dtype("float32")),
    Column("tags", "bag", 4, np.dtype("float32")),
))


def random_csr(rng: np.random.Generator, n: int, dim: int, max_nnz: int) -> Csr:
    lens = rng.integers(0, max_nnz + 1, n)
    lens[::3] = 0  # some entities without the modality
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    idx = np.concatenate([rng.choice(dim, k, replace=False) for k in lens] or [[]]).astype(np.int32)
    return Csr(indptr, idx, rng.integers(1, 9, len(idx)).astype(np.float32))


def random_block(rng: np.random.Generator, first: int, n: int) -> EntityBlock:
    dense = {"image": rng.normal(size=(n, 5)).astype(np.float16), "name": rng.normal(size=(n, 3)).astype(np.float32)}
    bags = {"relation": random_csr(rng, n, 12, 5), "tags": random_csr(rng, n, 4, 0)}  # tags: always empty
    mask = rng.random((n, 4)) < 0.5
    return EntityBlock(np.arange(first, first + n), rng.integers(0, 2, n).astype(np.uint8), mask, dense, bags)


def dense_rows(csr: Csr, dim: int) -> np.ndarray:
    """Per-entity reference: row i = scatter of its entries."""
    out = np.zeros((len(csr.indptr) - 1, dim), np.float32)
    for i in range(len(out)):
        a, b = csr.indptr[i], csr.indptr[i + 1]
        out[i, csr.indices[a:b]] = csr.values[a:b]
    return out


def assert_blocks_equal(got: EntityBlock, want: EntityBlock) -> None:
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.kg, want.kg)
    assert np.array_equal(got.mask, want.mask)
    for k in want.dense:
        assert got.dense[k].dtype == want.dense[k].dtype and np.array_equal(got.dense[k], want.dense[k])
    for k in want.bags:
        for a, b in zip(got.bags[k], want.bags[k]):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("n", [0, 1, 7, 64])
def test_block_roundtrip_and_alignment(n):
    block = random_block(np.random.default_rng(n), 1000, n)
    rec = LAYOUT.encode(block)
    assert len(rec) % 8 == 0
    got = LAYOUT.decode(rec)
    assert_blocks_equal(got, block if n else EntityBlock(np.arange(0), block.kg, block.mask, block.dense, block.bags))
    if n:
        assert got.dense["image"].ctypes.data % 2 == 0 and got.dense["name"].ctypes.data % 4 == 0


def test_encode_needs_consecutive_ids():
    block = random_block(np.random.default_rng(0), 0, 4)
    block.ids = np.array([0, 1, 3, 4])
    with pytest.raises(ValueError, match="consecutive"):
        LAYOUT.encode(block)


def test_malformed_records_name_the_sample():
    rec = LAYOUT.encode(random_block(np.random.default_rng(1), 0, 9))
    for bad in (rec[:-8], rec + bytes(8), rec[:10]):
        with pytest.raises(DataError, match="shard-x: sample 3"):
            LAYOUT.decode(bad, "shard-x: sample 3")
    block = random_block(np.random.default_rng(1), 0, 9)
    block.bags["relation"].indices[:] = 12  # column id outside the bag's dim
    with pytest.raises(DataError, match="malformed"):
        LAYOUT.decode(LAYOUT.encode(block), "k")


def test_csr_take_slice_concat_scatter_equal_per_entity_reference():
    rng = np.random.default_rng(2)
    csr = random_csr(rng, 50, 12, 6)
    ref = dense_rows(csr, 12)
    rows = rng.permutation(50)[:30]
    assert np.array_equal(dense_rows(csr.take(rows), 12), ref[rows])
    assert np.array_equal(dense_rows(csr.take(np.array([4, 4, 0])), 12), ref[[4, 4, 0]])
    assert np.array_equal(dense_rows(csr.slice(10, 37), 12), ref[10:37])
    both = Csr.concat([csr.slice(0, 20), csr.take(rows)])
    assert np.array_equal(dense_rows(both, 12), np.concatenate([ref[:20], ref[rows]]))
    out = np.full((50, 12), 7.0, np.float32)
    out[:] = 0
    csr.scatter_into(out)
    assert np.array_equal(out, ref)


def test_block_shuffled_and_concat_copy():
    rng = np.random.default_rng(3)
    a, b = random_block(rng, 0, 10), random_block(rng, 10, 6)
    rec = LAYOUT.decode(LAYOUT.encode(a))
    joined = EntityBlock.concat([rec])
    assert joined.dense["image"].flags.writeable and not np.shares_memory(joined.dense["image"], rec.dense["image"])
    both = EntityBlock.concat([a, rec, b])
    assert np.array_equal(both.ids, np.r_[np.arange(10), np.arange(10), np.arange(10, 16)])
    got = EntityBlock.shuffled([a, b], np.random.default_rng(5))
    order = got.ids  # a row's id says where it came from: ids 0..15 are rows 0..15 of a then b
    assert sorted(order.tolist()) == list(range(16)) and not np.array_equal(order, np.arange(16))
    for name in ("image", "name"):
        assert np.array_equal(got.dense[name], np.concatenate([a.dense[name], b.dense[name]])[order])
    assert np.array_equal(got.mask, np.concatenate([a.mask, b.mask])[order])
    assert np.array_equal(got.kg, np.concatenate([a.kg, b.kg])[order])
    ref = np.concatenate([dense_rows(a.bags["relation"], 12), dense_rows(b.bags["relation"], 12)])
    assert np.array_equal(dense_rows(got.bags["relation"], 12), ref[order])


@pytest.mark.parametrize("shape", [(0, 5), (3, 5), (20000, 7), (5, 40000)])
def test_cast_into_equals_numpy(shape):
    src = np.random.default_rng(4).normal(size=shape).astype(np.float16)
    out = np.empty(shape, np.float32)
    cast_into(out, src)
    assert np.array_equal(out, src.astype(np.float32))
    src32 = src.astype(np.float32)
    out2 = np.empty(shape, np.float32)
    cast_into(out2, src32)
    assert np.array_equal(out2, src32)


def test_alloc_many_gives_separate_aligned_arrays():
    specs = [((3,), np.uint8), ((0, 4), np.float16), ((5, 3), np.bool_), ((7, 2), np.float32), ((2,), np.int64)]
    arrays = alloc_many(specs)
    for arr, (shape, dtype) in zip(arrays, specs):
        assert arr.shape == shape and arr.dtype == np.dtype(dtype) and arr.ctypes.data % 8 == 0
        arr[...] = 1
    for i, a in enumerate(arrays):
        assert all(not np.shares_memory(a, b) for b in arrays[i + 1:])
