"""synth writes the raw on-disk formats the readers take, deterministically, with bounded memory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import snag_dist.data.synth.dataset as synth_dataset
from snag_dist.data.synth import ModalityOption, SynthOptions, parse_modalities, synth
from snag_dist.data.synth.graph import first_unique, row_keys
from snag_dist.data.synth.layouts import KG2_KEEP
from snag_dist.data.synth.text_writer import format_rows
from snag_dist.errors import ConfigError, DataError

N, T, R = 3000, 30000, 50
MODS = (ModalityOption("image", 32, 0.7), ModalityOption("name", 48, 1.0),
        ModalityOption("attribute", 16, 0.3))


def _ints(path: Path, cols: int) -> np.ndarray:
    """Strict parse: tab-separated integer columns, '\\n' line ends."""
    data = path.read_bytes()
    assert b"\r" not in data and (not data or data.endswith(b"\n"))
    rows = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2)
    assert rows.shape[1] == cols, path
    return rows


def _id_names(path: Path) -> tuple[np.ndarray, list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    parts = [line.split("\t") for line in lines]
    assert all(len(p) == 2 for p in parts), path
    return np.array([int(p[0]) for p in parts]), [p[1] for p in parts]


@pytest.fixture(scope="module")
def mkgc(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "mkgc"
    return out, synth(out, SynthOptions(N, T, relations=R, modalities=MODS))


@pytest.fixture(scope="module")
def mmea(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "mmea"
    return out, synth(out, SynthOptions(N, T, task="mmea", relations=R, modalities=MODS))


def test_parse_modalities():
    mods = parse_modalities("image:256:0.7, name:384:1.0,attribute:128")
    assert mods == (ModalityOption("image", 256, 0.7), ModalityOption("name", 384, 1.0),
                    ModalityOption("attribute", 128, 1.0))
    for spec, bad in [("image:256:0.7,name:x:1", "name:x:1"), ("image", "image"), ("a:1:2:3", "a:1:2:3"),
                      ("image:0:0.5", "image"), ("image:8:1.5", "image"), ("relation:8:1", "relation"),
                      ("a b:8:1", "a b"), ("a:8,a:4", "duplicate"), ("", "no modalities")]:
        with pytest.raises(ConfigError, match=bad):
            parse_modalities(spec)


@pytest.mark.parametrize("kwargs", [
    {"entities": 1}, {"triples": 0}, {"task": "lp"}, {"dtype": "int8"}, {"dtype": "nope"},
    {"link_ratio": 0.0}, {"valid_ratio": 0.6, "test_ratio": 0.4},
    {"modalities": (ModalityOption("a", 4, 1.0), ModalityOption("a", 8, 1.0))},
])
def test_options_validated(kwargs):
    with pytest.raises(ConfigError):
        SynthOptions(**{"entities": 10, "triples": 10, **kwargs})


def test_mkgc_layout(mkgc):
    out, counts = mkgc
    assert np.array_equal(_ints(out / "entities.txt", 1)[:, 0], np.arange(N))
    assert np.array_equal(_ints(out / "relations.txt", 1)[:, 0], np.arange(R))
    names = (out / "entity2id.txt").read_text().splitlines()
    assert names[:2] == ["ent_0 0", "ent_1 1"] and len(names) == N
    split = {s: _ints(out / f"{s}.txt", 3) for s in ("train", "valid", "test")}
    for name, tri in split.items():
        assert len(tri) == counts[name] > 0
        assert tri[:, [0, 2]].min() >= 0 and tri[:, [0, 2]].max() < N
        assert tri[:, 1].min() >= 0 and tri[:, 1].max() < R
        assert not (tri[:, 0] == tri[:, 2]).any()
    assert counts["triples"] == sum(len(t) for t in split.values())
    assert 0.9 * T < counts["triples"] <= T
    assert 0.03 < counts["valid"] / counts["triples"] < 0.07
    train_ents = set(split["train"][:, [0, 2]].ravel().tolist())
    train_rels = set(split["train"][:, 1].tolist())
    train_rows = set(map(tuple, split["train"].tolist()))
    for name in ("valid", "test"):  # closed world, no leakage
        assert set(split[name][:, [0, 2]].ravel().tolist()) <= train_ents
        assert set(split[name][:, 1].tolist()) <= train_rels
        assert not train_rows & set(map(tuple, split[name].tolist()))
    meta = json.loads((out / "synth.json").read_text())
    assert meta["counts"] == counts and meta["options"]["entities"] == N
    assert [m["name"] for m in meta["options"]["modalities"]] == ["image", "name", "attribute"]


def test_degrees_are_skewed(mkgc):
    out, _ = mkgc
    tri = _ints(out / "train.txt", 3)
    degree = np.bincount(tri[:, [0, 2]].ravel(), minlength=N)
    top = np.sort(degree)[::-1]
    assert top[0] > 10 * degree.mean()
    assert top[: N // 100].sum() > 0.10 * degree.sum()  # uniform would give ~1-2%
    assert (degree > 0).all()  # the cover pass leaves nobody isolated when triples >= 2N
    relation_counts = np.sort(np.bincount(tri[:, 1], minlength=R))[::-1]
    assert relation_counts[0] > 5 * relation_counts.mean()


def test_mmea_layout(mmea):
    out, counts = mmea
    n1 = N // 2
    ids1, names1 = _id_names(out / "ent_ids_1")
    ids2, names2 = _id_names(out / "ent_ids_2")
    assert np.array_equal(ids1, np.arange(n1)) and np.array_equal(ids2, np.arange(n1, N))
    assert names1[7] == "http://kg1.synth/resource/E7" and names2[0] == f"http://kg2.synth/resource/E{n1}"
    rel1, rel_names = _id_names(out / "rel_ids_1")
    rel2, _ = _id_names(out / "rel_ids_2")
    assert np.array_equal(rel1, np.arange(R)) and np.array_equal(rel2, np.arange(R, 2 * R))
    assert rel_names[3] == "http://kg1.synth/property/P3"
    t1, t2 = _ints(out / "triples_1", 3), _ints(out / "triples_2", 3)
    assert t1[:, [0, 2]].max() < n1 and t1[:, 1].max() < R and t1.min() >= 0
    assert t2[:, [0, 2]].min() >= n1 and t2[:, [0, 2]].max() < N
    assert t2[:, 1].min() >= R and t2[:, 1].max() < 2 * R
    assert (len(t1), len(t2)) == (counts["triples_1"], counts["triples_2"])
    assert counts["triples"] == len(t1) + len(t2)
    assert 0.9 * T < counts["triples"] <= T
    links = _ints(out / "ref_ent_ids", 2)
    assert len(links) == counts["links"] == round(0.8 * n1)
    assert len(np.unique(links[:, 0])) == len(np.unique(links[:, 1])) == len(links)  # 1:1
    assert links[:, 0].max() < n1 <= links[:, 1].min() and links[:, 1].max() < N


def test_mmea_structure_carries_alignment(mmea):
    out, _ = mmea
    t1, t2 = _ints(out / "triples_1", 3), _ints(out / "triples_2", 3)
    links = _ints(out / "ref_ent_ids", 2)
    to2 = np.full(N, -1)
    to2[links[:, 0]] = links[:, 1]
    both = (to2[t1[:, 0]] >= 0) & (to2[t1[:, 2]] >= 0)
    mapped = {(to2[h], r + R, to2[t]) for h, r, t in t1[both].tolist()}
    kept = len(mapped & set(map(tuple, t2.tolist()))) / len(mapped)
    assert abs(kept - KG2_KEEP) < 0.05


@pytest.mark.parametrize("which", ["mkgc", "mmea"])
def test_features(which, request):
    out, counts = request.getfixturevalue(which)
    for mod in MODS:
        feats = np.load(out / "features" / f"{mod.name}.npy", mmap_mode="r")
        present = np.load(out / "features" / f"{mod.name}.present.npy")
        assert feats.shape == (N, mod.dim) and feats.dtype == np.float16
        assert present.shape == (N,) and present.dtype == np.uint8 and set(np.unique(present)) <= {0, 1}
        has = present.astype(bool)
        assert np.isfinite(feats).all()
        assert not feats[~has].any() and (np.abs(feats[has]).sum(axis=1) > 0).all()
        assert counts["modalities"][mod.name] == has.sum()
        assert abs(has.mean() - mod.coverage) < 4 * np.sqrt(mod.coverage * (1 - mod.coverage) / N) + 1e-9


def test_features_carry_alignment(mmea):
    out, _ = mmea
    links = _ints(out / "ref_ent_ids", 2)
    x = np.load(out / "features" / "name.npy").astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hits1 = ((x[links[:, 0]] @ x[links[:, 1]].T).argmax(axis=1) == np.arange(len(links))).mean()
    assert 0.1 < hits1 < 0.95  # learnable, far above chance (1/1200), yet not solved by one modality


def test_deterministic(tmp_path):
    opts = SynthOptions(500, 4000, task="mmea", relations=20, modalities=MODS[:2], seed=7)
    synth(tmp_path / "a", opts)
    synth(tmp_path / "b", opts)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 12
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    synth(tmp_path / "c", SynthOptions(500, 4000, task="mmea", relations=20, modalities=MODS[:2], seed=8))
    assert (tmp_path / "a" / "triples_1").read_bytes() != (tmp_path / "c" / "triples_1").read_bytes()


def test_refuses_non_empty_out_dir(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="taken") as err:
        synth(out, SynthOptions(100, 500))
    assert "\n" not in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert synth(empty, SynthOptions(100, 500))["entities"] == 100


def test_failure_leaves_no_output(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth_dataset, "write_features", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        synth(tmp_path / "out", SynthOptions(100, 500))
    assert list(tmp_path.iterdir()) == []  # neither out nor its temp sibling


def test_format_rows_matches_python():
    rng = np.random.default_rng(0)
    a = np.concatenate([[0, 9, 10, 99, 100], rng.integers(0, 10**12, 200)])
    b = rng.integers(0, 7, len(a))
    got = format_rows([b"e", a, b"\t", b, b" x"])
    assert got == "".join(f"e{x}\t{y} x\n" for x, y in zip(a.tolist(), b.tolist())).encode()
    assert format_rows([np.zeros(0, dtype=np.int64)]) == b""


def test_row_keys_fallback_for_huge_graphs():
    tri = np.array([[5, 1, 2], [5, 1, 2], [2, 1, 5], [5, 0, 2]])
    for n in (10, 2**40):  # int64 keys, then row bytes
        assert first_unique(row_keys(tri, n, 3)).tolist() == [0, 2, 3]


# sha256 (first 16 hex digits) of every integer/text output of two small graphs (seed 5), and the
# float64 (sum, sum of squares) of each feature table: the features pass a float32 matmul, whose last
# bits may depend on the BLAS kernel, so they are compared to a tolerance, everything else byte for byte.
GOLDEN = {
    "mkgc": {
        "entities.txt": "f6e4afb059e38047", "entity2id.txt": "b5428741968dad10",
        "relations.txt": "727d1b30a951d734", "synth.json": "e88d892a9e3bdd34",
        "train.txt": "bbd9090961a157ae", "valid.txt": "88a392a914a1b114", "test.txt": "b86c78ee12aff0d0",
        "features/image.present.npy": "59d1778a64593385", "features/name.present.npy": "f846ee12799fa4d1",
        "features/image.npy": (-241.31867742538452, 19982.327115672877),
        "features/name.npy": (-1854.0190900564194, 42975.15343478499),
    },
    "mmea": {
        "ent_ids_1": "1fd13ade5466259c", "ent_ids_2": "2ca8244274ca9e22", "ref_ent_ids": "0e8d170f793f3d4d",
        "rel_ids_1": "bec144e782471b07", "rel_ids_2": "883514d8b4d9e2cc", "synth.json": "808b878d811e9e92",
        "triples_1": "e9cc85d2f6adfb7a", "triples_2": "d58ac316d4e21034",
        "features/image.present.npy": "59d1778a64593385", "features/name.present.npy": "f846ee12799fa4d1",
        "features/image.npy": (111.6718544960022, 21973.605975869163),
        "features/name.npy": (-2915.037293314934, 43917.622916436034),
    },
}


@pytest.mark.parametrize("task", ["mkgc", "mmea"])
def test_output_bytes_for_a_seed_are_fixed(task, tmp_path):
    """The bytes written for a seed never change: refactors of synth keep every dataset reproducible."""
    out = tmp_path / task
    synth(out, SynthOptions(400, 3000, task=task, relations=12, modalities=MODS[:2], seed=5))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(GOLDEN[task])
    for rel, want in GOLDEN[task].items():
        if isinstance(want, tuple):
            x = np.load(out / rel).astype(np.float64)
            assert (float(x.sum()), float((x * x).sum())) == pytest.approx(want, rel=1e-5, abs=0.05), rel
        else:
            assert hashlib.sha256((out / rel).read_bytes()).hexdigest()[:16] == want, rel
