"""reader -> prepare -> stream returns exactly the input: ids, features, triples, links."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from snag_dist.data.prepare import PrepareOptions, prepare
from snag_dist.data.readers import read_dataset
from snag_dist.data.store import FeatureStore, partition_range
from snag_dist.data.stream import EntityStream, RowStream, StreamConfig, make_loader, read_all_rows
from snag_dist.data.verify import verify

# Batches are fresh, writable tensors (no views of read-only record bytes).
pytestmark = pytest.mark.filterwarnings("error:The given NumPy array is not writable")


def _stream_entities(root, **kw):
    batches = list(EntityStream(root, StreamConfig(batch_size=7, **kw)))
    return {k: torch.cat([b[k] for b in batches]) for k in ("ids", "kg", "mask")}, \
        {m: torch.cat([b["features"][m] for b in batches]) for m in batches[0]["features"]}


def test_alignment_roundtrip(align_dir, tmp_path):
    src, truth = align_dir
    out = tmp_path / "shards"
    manifest = prepare(src, out, PrepareOptions(min_shards=3, shard_size=16, dtype="float32"), show_progress=False)
    assert verify(out).shards == sum(len(v) for v in manifest.shards.values())
    meta, feats = _stream_entities(out)
    order = torch.argsort(meta["ids"])
    assert torch.equal(meta["ids"][order], torch.arange(truth["n"]))
    img_col = manifest.modality_order().index("image")
    assert torch.equal(meta["mask"][order][:, img_col], torch.from_numpy(truth["present"]))
    expected = np.where(truth["present"][:, None], truth["image"], 0.0)
    assert torch.allclose(feats["image"][order], torch.from_numpy(expected))
    assert torch.equal(meta["kg"][order], torch.tensor([0] * 40 + [1] * 40, dtype=torch.uint8))
    # relation bag: counts of each relation per entity as head or tail, relations renumbered 0..8
    ds = read_dataset(src)
    rel = ds.relation_map[truth["triples"][:, 1]]
    bag = np.zeros((truth["n"], 9))
    np.add.at(bag, (truth["triples"][:, 0], rel), 1)
    np.add.at(bag, (truth["triples"][:, 2], rel), 1)
    top = np.lexsort((np.arange(9), -np.bincount(rel, minlength=9)))  # columns: by frequency, then id
    assert np.array_equal(feats["relation"][order].numpy(), bag[:, top])
    triples = read_all_rows(out, "triples/train")
    got = Counter(map(tuple, triples.tolist()))
    want = Counter(map(tuple, np.stack([truth["triples"][:, 0], rel, truth["triples"][:, 2]], 1).tolist()))
    assert got == want
    links = np.concatenate([read_all_rows(out, f"links/{s}") for s in ("train", "valid", "test")])
    assert sorted(map(tuple, links.tolist())) == sorted(map(tuple, truth["links"].tolist()))
    assert manifest.counts["links"] == {"train": 8, "valid": 1, "test": 21}


def test_completion_roundtrip_and_stats(mkgc_dir, tmp_path):
    src, splits = mkgc_dir
    out = tmp_path / "shards"
    manifest = prepare(src, out, PrepareOptions(text="chargram"), show_progress=False)
    for split, rows in splits.items():
        got = read_all_rows(out, f"triples/{split}")
        assert Counter(map(tuple, got.tolist())) == Counter(map(tuple, rows.tolist()))
        assert manifest.counts["triples"][split] == len(rows)
    meta, feats = _stream_entities(out)
    name = feats["name"][torch.argsort(meta["ids"])]
    assert torch.allclose(name.norm(dim=1), torch.ones(50), atol=1e-2)  # L2-normalised char-grams
    # manifest statistics are the per-modality mean/std of what was written
    assert abs(manifest.modalities["name"].mean - name.mean().item()) < 1e-3
    from safetensors.numpy import load_file

    stats = load_file(str(out / "stats.safetensors"))
    assert np.allclose(stats["name.mean"], name.mean(0).numpy(), atol=1e-3)
    assert np.allclose(stats["name.std"], name.std(0, unbiased=False).numpy(), atol=1e-3)


def test_feature_store_matches_stream_and_partitions(align_dir, tmp_path):
    src, truth = align_dir
    out = tmp_path / "shards"
    prepare(src, out, PrepareOptions(shard_size=16, dtype="float32"), show_progress=False)
    meta, feats = _stream_entities(out, shuffle_buffer=10, seed=3)
    full = FeatureStore.open(out, tmp_path / "store")
    got = full.lookup(meta["ids"].numpy())
    for m in feats:
        assert torch.equal(got["features"][m], feats[m])
    assert torch.equal(got["mask"], meta["mask"])
    start, stop = partition_range(truth["n"], 1, 3)
    part = FeatureStore.open(out, tmp_path / "store", (start, stop))
    ids = np.arange(start, stop)
    assert torch.equal(part.lookup(ids)["features"]["image"], full.lookup(ids)["features"]["image"])
    try:
        part.lookup(np.array([0]))
        raise AssertionError("lookup outside the partition must fail")
    except Exception as exc:  # noqa: BLE001
        assert "outside this store's partition" in str(exc)


def test_epoch_seeded_shuffle_is_deterministic_and_resumable(align_dir, tmp_path):
    src, _ = align_dir
    out = tmp_path / "shards"
    prepare(src, out, PrepareOptions(shard_size=10), show_progress=False)

    def order(epoch, seed=0):
        s = EntityStream(out, StreamConfig(seed=seed, shuffle_buffer=16, batch_size=1000))
        s.load_state_dict({"epoch": epoch})
        return torch.cat([b["ids"] for b in make_loader(s, 2)]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(2)) == list(range(80))
    rows = RowStream(out, "triples/train", StreamConfig(shuffle_buffer=4, batch_size=64, seed=5))
    rows.set_epoch(3)
    first = [b.clone() for b in rows]
    assert all(torch.equal(a, b) for a, b in zip(first, rows))
