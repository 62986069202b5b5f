"""Atomic writes (snag_dist.fsio): the target holds the old content or the new, never a part, and no
temp sibling survives a writer that raised."""

from __future__ import annotations

import json
import os
import socket

import pytest

from snag_dist.fsio import (
    atomic_dir,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    install_dir,
    remove_stale,
    temp_path,
)


def test_temp_path_is_a_sibling_named_for_host_and_pid(tmp_path):
    tmp = temp_path(tmp_path / "out.json")
    assert tmp.parent == tmp_path
    assert tmp.name == f".out.json.tmp-{socket.gethostname()}-{os.getpid()}"
    assert temp_path(tmp_path / "out", "old").name.startswith(".out.old-")


def test_writes_create_and_replace(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"one")
    assert path.read_bytes() == b"one"
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"
    atomic_write_json(path, {"a": [1, 2]}, indent=1)
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=1)
    with atomic_open(path, "w", newline="") as fh:
        fh.write("three\r\n")
    assert path.read_bytes() == b"three\r\n"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("how", ["path", "open"])
def test_a_writer_that_raises_leaves_the_old_file_and_no_temp(tmp_path, how):
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        if how == "path":
            with atomic_path(path) as tmp:
                tmp.write_text("half a new fi")
                raise RuntimeError("disk full")
        else:
            with atomic_open(path) as fh:
                fh.write("half a new fi")
                fh.flush()
                raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_json_that_cannot_be_encoded_leaves_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["m.json"]


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.parent == tmp_path
        assert out.is_dir()  # the old folder stays until the new one is complete
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]  # neither the temp folder nor the aside copy


def test_atomic_dir_that_raises_leaves_the_old_folder_and_no_temp(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "part").write_text("x")
        raise RuntimeError("killed")
    assert os.listdir(out) == ["old.txt"]
    assert os.listdir(tmp_path) == ["out"]
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "fresh"):
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_without_replacing_takes_only_an_empty_target(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty, replace_existing=False) as tmp:
        (tmp / "a").write_text("a")
    assert os.listdir(empty) == ["a"]
    taken = tmp_path / "taken"  # filled by someone else while we wrote: an error, their file stays
    taken.mkdir()
    (taken / "theirs").write_text("t")
    with pytest.raises(OSError), atomic_dir(taken, replace_existing=False) as tmp:
        (tmp / "ours").write_text("o")
    assert os.listdir(taken) == ["theirs"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "taken"]


def test_atomic_dir_uses_the_given_mkdir(tmp_path):
    made = []
    with atomic_dir(tmp_path / "out", mkdir=lambda p: (made.append(p), p.mkdir())) as tmp:
        pass
    assert made == [tmp] and (tmp_path / "out").is_dir()


def test_install_dir_renames_aside_first_and_deletes_it_last(tmp_path):
    final, new, aside = tmp_path / "best", tmp_path / ".best.tmp", tmp_path / ".best.old"
    final.mkdir()
    (final / "v").write_text("1")
    new.mkdir()
    (new / "v").write_text("2")
    aside.mkdir()  # a leftover aside copy is replaced, not mixed in
    install_dir(new, final, aside=aside)
    assert (final / "v").read_text() == "2"
    assert os.listdir(tmp_path) == ["best"]


def test_remove_stale_removes_dead_writers_folders_only(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    host = socket.gethostname()
    stale = tmp_path / f".out.tmp-{host}-{dead}"
    mine = temp_path(tmp_path / "out")
    other_host = tmp_path / f".out.tmp-elsewhere.example-{dead}"
    for folder in (stale, mine, other_host):
        folder.mkdir()
    assert remove_stale(tmp_path / "out") == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other_host.name])
