"""Bad input: a clear one-line error naming the file/key/value, exit 1, no partial output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from snag_dist.cli import main
from snag_dist.data.prepare import PrepareOptions, prepare


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snag_dist", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_verify_names_corrupt_and_missing_shard(align_dir, tmp_path, capsys):
    src, _ = align_dir
    out = tmp_path / "shards"
    prepare(src, out, PrepareOptions(), show_progress=False)
    assert main(["verify", str(out), "--quiet"]) == 0
    shard = sorted((out / "triples").glob("train-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert_one_line_error(capsys, ["verify", str(out), "--quiet"], "corrupt shard", shard.name)
    shard.unlink()
    assert_one_line_error(capsys, ["verify", str(out), "--quiet"], "missing shard", shard.name)


def test_stream_of_truncated_shard_names_it(align_dir, tmp_path):
    from snag_dist.data.stream import EntityStream, StreamConfig
    from snag_dist.errors import DataError

    src, _ = align_dir
    out = tmp_path / "shards"
    prepare(src, out, PrepareOptions(shard_size=20), show_progress=False)
    shard = out / "entities" / "entities-000002.tar"
    shard.write_bytes(shard.read_bytes()[:700])  # 512-byte tar header + part of the first block
    with pytest.raises(DataError, match="entities-000002.tar"):
        for _ in EntityStream(out, StreamConfig()):
            pass


@pytest.mark.parametrize("case", ["missing_file", "id_out_of_range", "wrong_dim", "wrong_dtype",
                                  "empty_split", "bad_relation", "bad_line", "pickle_refused",
                                  "pickle_corrupt"])
def test_prepare_bad_input(case, tmp_path, capsys):
    from tests.conftest import write_alignment, write_completion

    align, mkgc = tmp_path / "a", tmp_path / "m"
    write_alignment(align)
    write_completion(mkgc)
    src, needles, extra = align, [], []
    if case == "missing_file":
        (align / "triples_2").unlink()
        needles = ["missing file", "triples_2"]
    elif case == "id_out_of_range":
        with open(align / "triples_1", "a") as fh:
            fh.write("3\t1\t999\n")
        needles = ["triples_1", "999", "out of range"]
    elif case == "wrong_dim":
        np.save(align / "features" / "image.npy", np.zeros((79, 8), np.float32))
        needles = ["image.npy", "wrong shape", "(79, 8)"]
    elif case == "wrong_dtype":
        np.save(align / "features" / "image.npy", np.zeros((80, 8), np.int64))
        needles = ["image.npy", "wrong dtype", "int64"]
    elif case == "empty_split":
        (mkgc / "valid.txt").write_text("")
        src, needles = mkgc, ["valid.txt", "empty"]
    elif case == "bad_relation":
        with open(mkgc / "test.txt", "a") as fh:
            fh.write("1\t77\t2\n")
        src, needles = mkgc, ["test.txt", "unknown relation id 77"]
    elif case == "bad_line":
        with open(mkgc / "train.txt", "a") as fh:
            fh.write("1\t2\n")
        src, needles = mkgc, ["train.txt", "line 401", "3 integer columns"]
    elif case == "pickle_refused":
        (align / "features" / "attr.pkl").write_bytes(b"\x80\x04N.")
        needles = ["attr.pkl", "--allow-pickle"]
    elif case == "pickle_corrupt":
        (align / "features" / "attr.pkl").write_bytes(b"\x80\x04\x95garbage")
        needles, extra = ["attr.pkl", "not a readable pickle"], ["--allow-pickle"]
    out = tmp_path / "out"
    assert_one_line_error(capsys, ["prepare", str(src), "--out", str(out), "--quiet", *extra], *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_interrupted_prepare_leaves_no_output(align_dir, tmp_path, monkeypatch):
    from snag_dist.data import prepare as prep

    src, _ = align_dir
    calls = {"n": 0}
    real = prep.ShardSink.write

    def failing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(prep.ShardSink, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(src, tmp_path / "out", PrepareOptions(), show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["align"]


def test_existing_output_is_not_clobbered(align_dir, tmp_path, capsys):
    src, _ = align_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(capsys, ["prepare", str(src), "--out", str(out), "--quiet"], str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_subprocess_exit_code_and_single_line(tmp_path):
    res = run_cli("verify", str(tmp_path / "nope"))
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "manifest.json" in res.stderr


def test_bad_prepare_option_value(align_dir, tmp_path, capsys):
    src, _ = align_dir
    assert_one_line_error(capsys, ["prepare", str(src), "--out", str(tmp_path / "o"), "--text", "bert",
                                   "--quiet"],
                          "--text", "'bert'")
    assert_one_line_error(capsys, ["prepare", str(src), "--out", str(tmp_path / "o"), "--train-ratio", "1.5",
                                   "--quiet"],
                          "--train-ratio", "1.5")
    assert not (tmp_path / "o").exists()


def test_manifest_corrupt_json(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{not json")
    assert_one_line_error(capsys, ["verify", str(tmp_path)], "manifest.json", "corrupt JSON")


def test_cli_options_show_their_choices_and_synth_speaks_task_names(tmp_path, capsys):
    from snag_dist.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb").choices
    prepare_help, synth_help = sub["prepare"].format_help(), sub["synth"].format_help()
    assert "{none,minilm,chargram}" in prepare_help and "{float16,float32}" in prepare_help
    assert "{alignment,completion}" in synth_help and "mkgc" not in synth_help
    assert main(["synth", "--out", str(tmp_path / "s"), "--entities", "60", "--triples", "240", "--task", "completion",
                 "--modalities", "image:4:0.5", "--quiet"]) == 0
    assert (tmp_path / "s" / "train.txt").is_file()


def test_prepare_cli_defaults_are_prepare_options_defaults(monkeypatch, tmp_path):
    """prepare's defaults live in PrepareOptions only: the CLI passes every one of them through."""
    import dataclasses

    import snag_dist.data.prepare as prep
    import snag_dist.report as report

    seen = []
    monkeypatch.setattr(prep, "prepare", lambda src, out, opts, show_progress: seen.append(opts))
    monkeypatch.setattr(report, "print_manifest", lambda *a: None)
    assert main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--seed", "3",
                 "--mask-nonfinite"]) == 0
    assert seen == [prep.PrepareOptions(), dataclasses.replace(prep.PrepareOptions(), seed=3, mask_nonfinite=True)]
