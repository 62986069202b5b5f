"""Batched decoding equals per-entity decoding: the stream (in order, shuffled, through DataLoader
workers) and the feature store return, for every entity id, what a naive per-entity reading of the
shards gives — with blocks that do not divide shards and batches that straddle blocks."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch

from snag_dist.data.manifest import load_manifest
from snag_dist.data.prepare import PrepareOptions, TripleCache, _reblock, prepare
from snag_dist.data.readers import read_dataset
from snag_dist.data.records import MEMBER, EntityLayout
from snag_dist.data.store import FeatureStore
from snag_dist.data.stream import EntityStream, RowStream, StreamConfig, make_loader, read_all_rows
from snag_dist.data.synth import ModalityOption, SynthOptions, synth

# Batches are fresh, writable tensors (no views of read-only record bytes).
pytestmark = pytest.mark.filterwarnings("error:The given NumPy array is not writable")

N = 600
OPTS = PrepareOptions(shard_size=100, entity_block=32, min_shards=4, relation_topk=10, block_size=70)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    mods = (ModalityOption("image", 16, 0.7), ModalityOption("name", 8, 1.0))
    synth(root / "raw", SynthOptions(N, 3000, relations=20, modalities=mods))
    prepare(root / "raw", root / "shards", OPTS, show_progress=False)
    return root


def per_entity_reference(out) -> dict[int, dict]:
    """id -> {kg, mask, features}: every record decoded, then one entity at a time, in Python loops."""
    manifest = load_manifest(out)
    layout = EntityLayout.from_manifest(manifest)
    ref = {}
    for path in manifest.shard_paths(out, "entities"):
        with tarfile.open(path) as tar:
            for member in tar:
                block = layout.decode(tar.extractfile(member).read())
                for i, eid in enumerate(block.ids.tolist()):
                    feats = {k: v[i].astype(np.float32) for k, v in block.dense.items()}
                    for k, csr in block.bags.items():
                        row = np.zeros(manifest.modalities[k].dim, np.float32)
                        a, b = csr.indptr[i], csr.indptr[i + 1]
                        for col, val in zip(csr.indices[a:b], csr.values[a:b]):
                            row[col] = val
                        feats[k] = row
                    ref[eid] = {"kg": int(block.kg[i]), "mask": block.mask[i].copy(), "features": feats}
    return ref


def assert_matches(batches, ref) -> None:
    ids = torch.cat([b["ids"] for b in batches]).numpy()
    assert sorted(ids.tolist()) == list(range(N))
    for b in batches:
        for i, eid in enumerate(b["ids"].tolist()):
            want = ref[eid]
            assert int(b["kg"][i]) == want["kg"] and np.array_equal(b["mask"][i].numpy(), want["mask"])
            for name, row in want["features"].items():
                assert b["features"][name].dtype == torch.float32
                assert np.array_equal(b["features"][name][i].numpy(), row), (eid, name)


def test_layout_of_prepared_shards(shards):
    manifest = load_manifest(shards / "shards")
    assert list(manifest.modalities) == ["relation", "image", "name"]
    infos = manifest.shards["entities"]
    assert [s.rows for s in infos] == [100] * 6 and [s.samples for s in infos] == [4] * 6  # 32+32+32+4
    with tarfile.open(manifest.shard_paths(shards / "shards", "entities")[0]) as tar:
        assert [m.name for m in tar] == [f"{i:010d}.{MEMBER}" for i in (0, 32, 64, 96)]


@pytest.mark.parametrize("shuffle,workers", [(0, 0), (50, 0), (0, 2), (128, 2)])
def test_stream_batches_equal_per_entity_decoding(shards, shuffle, workers):
    ref = per_entity_reference(shards / "shards")
    stream = EntityStream(shards / "shards", StreamConfig(batch_size=45, shuffle_buffer=shuffle, seed=1))
    batches = list(make_loader(stream, workers))
    # each worker batches its own shards: all batches are full but the last of each worker
    assert sum(len(b["ids"]) < 45 for b in batches) <= max(workers, 1)
    assert_matches(batches, ref)
    if shuffle == 0 and workers == 0:
        assert torch.equal(torch.cat([b["ids"] for b in batches]), torch.arange(N))


def test_shuffled_batches_mix_blocks_and_epochs_differ(shards):
    stream = EntityStream(shards / "shards", StreamConfig(batch_size=64, shuffle_buffer=256, seed=3))
    first = next(iter(stream))["ids"].numpy()
    assert len(np.unique(first // 32)) > 4  # entities from many 32-entity blocks
    stream.set_epoch(1)
    assert not np.array_equal(next(iter(stream))["ids"].numpy(), first)


def test_feature_store_equals_reference_across_block_boundaries(shards, tmp_path):
    ref = per_entity_reference(shards / "shards")
    store = FeatureStore.open(shards / "shards", tmp_path / "store", (13, 250))  # cuts blocks and shards
    ids = np.arange(13, 250)
    got = store.lookup(ids)
    for name in ("relation", "image", "name"):
        assert np.array_equal(got["features"][name].numpy(), np.stack([ref[i]["features"][name] for i in ids]))
    assert np.array_equal(got["mask"].numpy(), np.stack([ref[i]["mask"] for i in ids]))


@pytest.mark.parametrize("batch_size,drop_last", [(5, False), (64, True), (1000, False)])
def test_row_stream_rebatching(shards, batch_size, drop_last):
    out = shards / "shards"
    every = read_all_rows(out, "triples/train")
    batches = list(RowStream(out, "triples/train", StreamConfig(batch_size=batch_size, drop_last=drop_last)))
    assert all(len(b) == batch_size for b in batches[:-1])
    got = torch.cat(batches).numpy()
    keep = len(every) // batch_size * batch_size if drop_last else len(every)
    assert np.array_equal(got, every[:keep])


def test_triple_cache_and_reblock(shards, tmp_path):
    ds = read_dataset(shards / "raw")
    cache = TripleCache(ds, tmp_path / "cache", block_rows=1000)
    for split in ds.splits():
        want = np.concatenate(list(ds.iter_triples(split)))
        blocks = list(cache.blocks(split))
        assert max(len(b) for b in blocks) <= 1000 and cache.rows[split] == len(want)
        assert np.array_equal(np.concatenate(blocks), want)
        cut = list(_reblock(iter(blocks), 333))
        assert [len(b) for b in cut[:-1]] == [333] * (len(cut) - 1)
        assert all(b.base is None for b in cut)  # fresh arrays: a view would pin its whole input block
        assert np.array_equal(np.concatenate(cut), want)
