"""Shared fixtures: tiny raw datasets in the real on-disk formats, written per test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SHARED = ROOT.parent / "shared" / "data"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool


def _tsv(path: Path, rows) -> None:
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))


def write_alignment(root: Path, n1: int = 40, n2: int = 40, n_triples: int = 300, seed: int = 0) -> dict:
    """Two KGs with global ids, relation lists (KG2 relation ids offset by 100), links, an image modality."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    n = n1 + n2
    _tsv(root / "ent_ids_1", [(i, f"http://fr.kg/resource/Ent_{i}") for i in range(n1)])
    _tsv(root / "ent_ids_2", [(i, f"http://en.kg/resource/Entity_{i}") for i in range(n1, n)])
    _tsv(root / "rel_ids_1", [(r, f"http://fr.kg/p/{r}") for r in range(5)])
    _tsv(root / "rel_ids_2", [(100 + r, f"http://en.kg/p/{r}") for r in range(4)])
    t1 = np.stack([rng.integers(0, n1, n_triples), rng.integers(0, 5, n_triples), rng.integers(0, n1, n_triples)], 1)
    t2 = np.stack([rng.integers(n1, n, n_triples), 100 + rng.integers(0, 4, n_triples),
                   rng.integers(n1, n, n_triples)], 1)
    _tsv(root / "triples_1", t1.tolist())
    _tsv(root / "triples_2", t2.tolist())
    links = np.stack([np.arange(30), n1 + rng.permutation(30)], 1)
    _tsv(root / "ref_ent_ids", links.tolist())
    (root / "features").mkdir()
    image = rng.normal(size=(n, 8)).astype(np.float32)
    present = rng.random(n) < 0.7
    np.save(root / "features" / "image.npy", image)
    np.save(root / "features" / "image.present.npy", present.astype(np.uint8))
    return {"triples": np.concatenate([t1, t2]), "links": links, "image": image, "present": present, "n": n}


def write_completion(root: Path, n: int = 50, r: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    _tsv(root / "entities.txt", [(i,) for i in range(n)])
    _tsv(root / "relations.txt", [(i,) for i in range(r)])
    splits = {}
    for split, m in (("train", 400), ("valid", 40), ("test", 40)):
        t = np.stack([rng.integers(0, n, m), rng.integers(0, r, m), rng.integers(0, n, m)], 1)
        _tsv(root / f"{split}.txt", t.tolist())
        splits[split] = t
    (root / "entity2id.txt").write_text("".join(f"<http://kg/resource/E_{i}> {i}\n" for i in range(n)))
    return splits


@pytest.fixture
def align_dir(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "align"
    return root, write_alignment(root)


@pytest.fixture
def mkgc_dir(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "mkgc"
    return root, write_completion(root)


def pytest_collection_modifyitems(config, items) -> None:
    """Markers by folder: tests/distributed runs real processes (``dist``), tests/tune starts Ray
    (``ray``); ``make test-fast`` leaves them, and ``slow``, out."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "distributed" in parts:
            item.add_marker(pytest.mark.dist)
        if "tune" in parts:
            item.add_marker(pytest.mark.ray)
