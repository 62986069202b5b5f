"""Bad-input / fault catalogue, data half: inputs that must never be silently corrupted.

Every case writes real files into tmp_path and runs the real ``snag-dist`` verbs (``prepare``,
``synth``, ``train``, ``stream``): a bad input is one line on stderr naming the file (and row/line
where there is one), exit code 1, and nothing half-written; a good-but-unusual input (BOM, CRLF,
trailing whitespace) gives the same shards as the plain one. Issue #21, items 3-7 (data part).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from snag_dist.cli import main
from tests.conftest import write_alignment, write_completion

BOM = b"\xef\xbb\xbf"


# -- helpers -------------------------------------------------------------------------------------
def run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main([*argv])
    return code, capsys.readouterr().err.strip()


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    code, err = run(capsys, *argv)
    assert code == 1, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def prepare_fails(capsys, src: Path, tmp_path: Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    out = tmp_path / "out"
    err = one_line_error(capsys, ["prepare", str(src), "--out", str(out), "--quiet", *extra], *needles)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]
    return err


def prepare_ok(capsys, src: Path, out: Path, *extra: str) -> dict:
    code, err = run(capsys, "prepare", str(src), "--out", str(out), "--quiet", *extra)
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def all_rows(out: Path, group: str) -> np.ndarray:
    from snag_dist.data.stream import read_all_rows

    return read_all_rows(out, group)


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def npy_data_offset(shard: Path) -> int:
    """File offset of the first array element of the shard's first (``.npy``) member."""
    with tarfile.open(shard) as tar:
        member = tar.next()
        start = member.offset_data
    with open(shard, "rb") as fh:
        fh.seek(start)
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        return fh.tell()


def last_member_end(shard: Path) -> int:
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    return members[-1].offset_data + members[-1].size


TRAIN = ["--config", "quickstart", "--quiet", "--set", "train.epochs=1", "--set", "model.hidden=16",
         "--set", "model.modalities=[structure,relation,image]"]


def train(capsys, shards: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run(capsys, "train", "--shards", str(shards), "--out", str(out), *TRAIN, *extra)


@pytest.fixture
def shards(tmp_path, capsys) -> Path:
    src = tmp_path / "align"
    write_alignment(src)
    out = tmp_path / "shards"
    prepare_ok(capsys, src, out)
    return out


# -- 3. shard integrity at train time ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "stream"])
def test_train_refuses_flipped_byte_in_triple_shard(shards, tmp_path, capsys, mode):
    shard = sorted((shards / "triples").glob("train-*.tar"))[0]
    flip(shard, npy_data_offset(shard))  # lowest bit of the first head id: still a valid id
    code, err = train(capsys, shards, tmp_path / "run", "--set", f"data.mode={mode}")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "corrupt shard" in err and shard.name in err and "sha256" in err, err


def test_train_refuses_flipped_byte_in_entity_shard(shards, tmp_path, capsys):
    shard = sorted((shards / "entities").glob("*.tar"))[0]
    flip(shard, last_member_end(shard) - 1)  # a feature value of the last block: still decodes
    code, err = train(capsys, shards, tmp_path / "run")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "corrupt shard" in err and shard.name in err, err
    assert not (shards / ".store" / "0-80").exists()  # nothing cached from a corrupt shard


def test_train_after_first_run_refuses_truncated_entity_shard(shards, tmp_path, capsys):
    code, err = train(capsys, shards, tmp_path / "run1")
    assert code == 0, err
    assert (shards / ".store" / "0-80" / "store.json").is_file()
    shard = sorted((shards / "entities").glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:-1024])
    code, err = train(capsys, shards, tmp_path / "run2")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "corrupt shard" in err and shard.name in err, err


def test_feature_store_cache_follows_the_shards(shards, tmp_path):
    """The cache key covers the entity shards (their checksums and files), not the manifest alone:
    a rewritten shard is noticed even though manifest.json did not change."""
    from snag_dist.data.store import FeatureStore
    from snag_dist.errors import DataError

    FeatureStore.open(shards)
    shard = sorted((shards / "entities").glob("*.tar"))[0]
    flip(shard, last_member_end(shard) - 1)
    with pytest.raises(DataError, match=shard.name):
        FeatureStore.open(shards)


def test_stream_worker_error_is_one_line(shards, capsys):
    """A corrupt shard found inside a DataLoader worker is still one line (not the worker's traceback)."""
    shard = sorted((shards / "entities").glob("*.tar"))[0]
    flip(shard, last_member_end(shard) - 1)
    err = one_line_error(capsys, ["stream", str(shards), "--workers", "2"], "corrupt shard", shard.name)
    assert "Original Traceback" not in err


def test_old_manifest_without_checksums_still_trains(shards, tmp_path, capsys):
    """Shards listed without a sha256 (hand-made or older manifests): the size is still checked, the hash
    is skipped, training works."""
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    for group in manifest["shards"].values():
        for info in group:
            info["sha256"] = ""
    path.write_text(json.dumps(manifest))
    code, err = train(capsys, shards, tmp_path / "run")
    assert code == 0, err


# -- 4. non-finite feature values ----------------------------------------------------------------
def _image(src: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(src / "features" / "image.npy"), np.load(src / "features" / "image.present.npy").astype(bool)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_prepare_rejects_non_finite_feature(tmp_path, capsys, value):
    src = tmp_path / "align"
    write_alignment(src)
    image, present = _image(src)
    row = int(np.flatnonzero(present)[5])
    image[row, 3] = value
    np.save(src / "features" / "image.npy", image)
    prepare_fails(capsys, src, tmp_path, "image.npy", f"row {row}", "column 3", "--mask-nonfinite")


def test_prepare_rejects_non_finite_in_safetensors(tmp_path, capsys):
    from safetensors.numpy import save_file

    src = tmp_path / "align"
    write_alignment(src)
    image, present = _image(src)
    image[7, 0] = np.nan
    (src / "features" / "image.npy").unlink()
    (src / "features" / "image.present.npy").unlink()
    save_file({"features": image}, str(src / "features" / "image.safetensors"))
    prepare_fails(capsys, src, tmp_path, "image.safetensors", "row 7", "column 0")


def test_mask_nonfinite_treats_entities_as_missing(tmp_path, capsys):
    from safetensors.numpy import load_file

    from snag_dist.data.store import FeatureStore

    src = tmp_path / "align"
    write_alignment(src)
    image, present = _image(src)
    bad = np.flatnonzero(present)[:3]
    image[bad[0], 0], image[bad[1], 5], image[bad[2], 7] = np.nan, np.inf, -np.inf
    absent = int(np.flatnonzero(~present)[0])
    image[absent, 2] = np.nan  # a row the presence mask already marks missing: ignored either way
    np.save(src / "features" / "image.npy", image)
    out = tmp_path / "out"
    code, err = run(capsys, "prepare", str(src), "--out", str(out), "--quiet", "--mask-nonfinite")
    assert code == 0, err
    assert "3 entities" in err and "image" in err and len(err.splitlines()) == 1, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"]["image"]["coverage"] == pytest.approx((present.sum() - 3) / len(present))
    stats = load_file(str(out / "stats.safetensors"))
    assert all(np.isfinite(v).all() for v in stats.values())
    table = FeatureStore.open(out).all()
    col = list(manifest["modalities"]).index("image")
    mask = table["mask"].numpy()[:, col]
    assert not mask[bad].any() and mask.sum() == present.sum() - 3
    assert np.isfinite(table["features"]["image"].numpy()).all()


def test_prepare_rejects_float16_overflow(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    image, present = _image(src)
    row = int(np.flatnonzero(present)[0])
    image[row, 1] = 1e6  # finite in float32, inf once stored as float16
    np.save(src / "features" / "image.npy", image)
    prepare_fails(capsys, src, tmp_path, "image.npy", f"row {row}", "column 1", "float16", "--dtype float32")
    prepare_ok(capsys, src, tmp_path / "ok", "--dtype", "float32")


# -- 5. per-line column checks -------------------------------------------------------------------
@pytest.mark.parametrize("layout,name,lines,cols", [
    ("align", "triples_1", "1\t2\n3\t4\t5\t6\n", 3),  # 2 + 4 columns: re-cut into two triples before
    ("mkgc", "train.txt", "1\t2\t3\t4\n5\t1\n", 3),
    ("align", "ref_ent_ids", "5\n6\t45\t7\n", 2),  # 1 + 3 columns: re-cut into two links before
])
def test_column_count_is_checked_per_line(tmp_path, capsys, layout, name, lines, cols):
    src = tmp_path / layout
    (write_alignment if layout == "align" else write_completion)(src)
    path = src / name
    before = len(path.read_text().splitlines())
    with open(path, "a") as fh:
        fh.write(lines)
    prepare_fails(capsys, src, tmp_path, name, f"line {before + 1}", f"expected {cols} integer columns")


# -- 6. BOM, duplicate ids, unknown ids with their line ------------------------------------------
@pytest.mark.parametrize("layout,name", [("align", "ent_ids_1"), ("align", "triples_1"), ("align", "rel_ids_2"),
                                         ("align", "ref_ent_ids"), ("mkgc", "entities.txt"),
                                         ("mkgc", "train.txt"), ("mkgc", "entity2id.txt")])
def test_leading_bom_is_stripped(tmp_path, capsys, layout, name):
    """Every text reader drops a leading BOM (entity2id.txt is a guard: its URI parsing hid the BOM)."""
    plain, bom = tmp_path / "plain", tmp_path / "bom"
    write = write_alignment if layout == "align" else write_completion
    write(plain)
    write(bom)
    (bom / name).write_bytes(BOM + (bom / name).read_bytes())
    a = prepare_ok(capsys, plain, tmp_path / "a", "--text", "chargram")
    b = prepare_ok(capsys, bom, tmp_path / "b", "--text", "chargram")
    assert [[s["sha256"] for s in g] for g in a["shards"].values()] == \
        [[s["sha256"] for s in g] for g in b["shards"].values()]


def test_duplicate_entity_id_across_alignment_files(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    with open(src / "ent_ids_2", "a") as fh:
        fh.write("12\thttp://en.kg/resource/Again\n")
    prepare_fails(capsys, src, tmp_path, "duplicate entity id 12", "ent_ids_2", "line 41", "ent_ids_1", "line 13")


def test_duplicate_entity_id_within_one_file(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    lines = (src / "ent_ids_1").read_text().splitlines()
    lines[20] = "7\thttp://fr.kg/resource/Seven_again"
    (src / "ent_ids_1").write_text("\n".join(lines) + "\n")
    prepare_fails(capsys, src, tmp_path, "duplicate entity id 7", "ent_ids_1", "line 21", "line 8")


def test_duplicate_completion_entity_names_id_and_line(tmp_path, capsys):
    src = tmp_path / "mkgc"
    write_completion(src)
    with open(src / "entities.txt", "a") as fh:
        fh.write("9\n")
    prepare_fails(capsys, src, tmp_path, "entities.txt", "duplicate entity id 9", "line 51", "line 10")


def test_duplicate_relation_id_names_its_file(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    with open(src / "rel_ids_2", "a") as fh:
        fh.write("3\thttp://en.kg/p/dup\n")
    prepare_fails(capsys, src, tmp_path, "duplicate relation id 3", "rel_ids_2", "line 5", "rel_ids_1", "line 4")


@pytest.mark.parametrize("name,row", [("ref_ent_ids", "4\t999\n"), ("triples_2", "45\t101\t999\n")])
def test_unknown_entity_names_id_file_and_line(tmp_path, capsys, name, row):
    src = tmp_path / "align"
    write_alignment(src)
    path = src / name
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(7, row)
    lines.insert(3, "\n")  # a blank line before it: the line number is the file's, not the row's
    path.write_text("".join(lines))
    prepare_fails(capsys, src, tmp_path, name, "999", "line 9")


def test_link_between_entities_of_one_kg(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    with open(src / "ref_ent_ids", "a") as fh:
        fh.write("35\t3\n")  # both KG1 (ids 0..39)
    prepare_fails(capsys, src, tmp_path, "ref_ent_ids", "line 31", "35", "KG1", "KG2")


# -- 7. temp folders of killed runs, empty files, --out that is a file ----------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folder_of_killed_prepare_is_removed(tmp_path, capsys):
    import socket

    src = tmp_path / "align"
    write_alignment(src)
    dead = _dead_pid()
    stale_old = tmp_path / f".out.tmp-{dead}"  # the name an older prepare used
    stale_new = tmp_path / f".out.tmp-{socket.gethostname()}-{dead}"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.tmp-{socket.gethostname()}-{alive.pid}"  # a prepare still running
        other = tmp_path / f".out.tmp-elsewhere.example-{dead}"  # another host's: not ours to judge
        for folder in (stale_old, stale_new, live, other):
            folder.mkdir()
            (folder / "entities").mkdir()
            (folder / "entities" / "entities-000000.tar").write_bytes(b"x" * 4096)
        code, err = run(capsys, "prepare", str(src), "--out", str(tmp_path / "out"), "--quiet")
        assert code == 0, err
        assert not stale_old.exists() and not stale_new.exists()
        assert live.is_dir() and other.is_dir()
        assert len(err.splitlines()) == 1 and "2 stale temp folders" in err and str(dead) in err, err
    finally:
        alive.kill()
        alive.wait()


def test_really_killed_prepare_is_cleaned_by_the_next(tmp_path, capsys):
    """SIGKILL a real prepare while it writes shards, then prepare again into the same OUT."""
    import signal
    import time

    src = tmp_path / "align"
    write_alignment(src, n1=400, n2=400, n_triples=3000)
    out = tmp_path / "out"
    code = "import time, snag_dist.data.prepare as p\n" \
           "real = p.ShardSink.write\n" \
           "def slow(*a, **k):\n    real(*a, **k); time.sleep(30)\n" \
           "p.ShardSink.write = slow\n" \
           f"p.prepare({str(src)!r}, {str(out)!r}, show_progress=False)\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".out.tmp-*/entities/*.tar")) and time.time() < deadline:
            time.sleep(0.1)
        assert list(tmp_path.glob(".out.tmp-*")), "prepare never started writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    code, err = run(capsys, "prepare", str(src), "--out", str(out), "--quiet")
    assert code == 0, err
    assert not list(tmp_path.glob(".out.*")), list(tmp_path.iterdir())
    assert "stale temp folder" in err and str(proc.pid) in err, err


def test_empty_triples_1_alone_is_an_error(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    (src / "triples_1").write_text("")
    prepare_fails(capsys, src, tmp_path, "triples_1", "no triples")


def test_blank_only_triple_file_is_an_error(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    (src / "triples_2").write_text("\n  \n\n")
    prepare_fails(capsys, src, tmp_path, "triples_2", "no triples")


def test_empty_entity_file_is_an_error(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    (src / "ent_ids_1").write_text("")
    prepare_fails(capsys, src, tmp_path, "ent_ids_1", "no entities")


@pytest.mark.parametrize("verb", ["prepare", "synth"])
@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_that_is_a_regular_file(tmp_path, capsys, verb, where):
    src = tmp_path / "align"
    write_alignment(src)
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    out = blocker if where == "file" else blocker / "sub"
    args = [verb, str(src), "--out", str(out)] if verb == "prepare" else \
        [verb, "--out", str(out), "--entities", "50", "--triples", "100"]
    one_line_error(capsys, [*args, "--quiet"], "afile")
    assert blocker.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "align"]


def test_overwrite_does_not_replace_a_regular_file(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    one_line_error(capsys, ["prepare", str(src), "--out", str(blocker), "--overwrite", "--quiet"], "afile",
                   "not a directory")
    assert blocker.read_text() == "mine"


# -- the next cases a careful user tries ---------------------------------------------------------
# (wrong row count and integer dtype: tests/data/test_errors.py; "guard" cases here were already
# one-line errors before #21 and stay in the catalogue so they remain so.)
@pytest.mark.parametrize("case", ["zero_bytes", "zero_dim", "one_d_guard", "object_guard"])
def test_bad_feature_file(tmp_path, capsys, case):
    src = tmp_path / "align"
    write_alignment(src)
    path = src / "features" / "image.npy"
    needles = {"zero_bytes": ["empty file"], "zero_dim": ["(80, 0)", "no columns"],
               "one_d_guard": ["2-D", "(80,)"], "object_guard": ["not a readable .npy"]}[case]
    if case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "zero_dim":
        np.save(path, np.zeros((80, 0), np.float32))
    elif case == "one_d_guard":
        np.save(path, np.zeros(80, np.float32))
    else:
        np.save(path, np.array([[1.0] * 8] * 80, dtype=object), allow_pickle=True)
    prepare_fails(capsys, src, tmp_path, "image.npy", *needles)


def test_safetensors_with_integer_features(tmp_path, capsys):
    from safetensors.numpy import save_file

    src = tmp_path / "align"
    write_alignment(src)
    (src / "features" / "image.npy").unlink()
    (src / "features" / "image.present.npy").unlink()
    save_file({"features": np.zeros((80, 8), np.int32)}, str(src / "features" / "image.safetensors"))
    prepare_fails(capsys, src, tmp_path, "image.safetensors", "wrong dtype", "I32")


@pytest.mark.parametrize("data,needle", [({"Q42": [1.0, 2.0]}, "'Q42'"), ({3: "abc"}, "3"), ({3: 1.5}, "3")])
def test_pickle_features_with_bad_entries(tmp_path, capsys, data, needle):
    import pickle

    src = tmp_path / "align"
    write_alignment(src)
    (src / "features" / "attr.pkl").write_bytes(pickle.dumps(data))
    prepare_fails(capsys, src, tmp_path, "attr.pkl", needle, extra=("--allow-pickle",))


def test_truncated_feature_file(tmp_path, capsys):
    """Guard: a .npy cut short (an interrupted copy)."""
    src = tmp_path / "align"
    write_alignment(src)
    path = src / "features" / "image.npy"
    path.write_bytes(path.read_bytes()[:-100])
    prepare_fails(capsys, src, tmp_path, "image.npy")


def test_presence_mask_with_wrong_length(tmp_path, capsys):
    """Guard."""
    src = tmp_path / "align"
    write_alignment(src)
    np.save(src / "features" / "image.present.npy", np.ones(79, np.uint8))
    prepare_fails(capsys, src, tmp_path, "image.present.npy", "79 rows", "expected 80")


def test_integer_too_large_for_int64(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    with open(src / "triples_1", "a") as fh:
        fh.write("1\t2\t99999999999999999999999\n")
    prepare_fails(capsys, src, tmp_path, "triples_1", "line 301", "99999999999999999999999")


def test_non_utf8_name_is_an_error(tmp_path, capsys):
    src = tmp_path / "align"
    write_alignment(src)
    lines = (src / "ent_ids_1").read_bytes().splitlines(keepends=True)
    lines[4] = b"4\thttp://fr.kg/resource/Caf\xe9\n"  # Latin-1, not UTF-8
    (src / "ent_ids_1").write_bytes(b"".join(lines))
    prepare_fails(capsys, src, tmp_path, "ent_ids_1", "line 5", "UTF-8")


@pytest.mark.parametrize("layout", ["align", "mkgc"])
def test_crlf_trailing_whitespace_and_blank_lines_give_the_same_shards(tmp_path, capsys, layout):
    """Windows line endings, trailing blanks and empty lines in every text file (the alignment layout
    took them before #21; ``entity2id.txt`` with a trailing blank was an error)."""
    plain, messy = tmp_path / "plain", tmp_path / "messy"
    write = write_alignment if layout == "align" else write_completion
    write(plain)
    write(messy)
    names = ("ent_ids_1", "ent_ids_2", "rel_ids_1", "rel_ids_2", "triples_1", "triples_2", "ref_ent_ids") \
        if layout == "align" else ("entities.txt", "relations.txt", "train.txt", "valid.txt", "test.txt",
                                   "entity2id.txt")
    for name in names:
        lines = (messy / name).read_bytes().splitlines()
        (messy / name).write_bytes(b"\r\n".join(line + b" \t" for line in lines) + b"\r\n\r\n")
    a = prepare_ok(capsys, plain, tmp_path / "a", "--text", "chargram")
    b = prepare_ok(capsys, messy, tmp_path / "b", "--text", "chargram")
    assert [[s["sha256"] for s in g] for g in a["shards"].values()] == \
        [[s["sha256"] for s in g] for g in b["shards"].values()]


def test_prepare_into_unwritable_parent(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    src = tmp_path / "align"
    write_alignment(src)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        one_line_error(capsys, ["prepare", str(src), "--out", str(locked / "out"), "--quiet"], str(locked))
    finally:
        locked.chmod(0o755)
