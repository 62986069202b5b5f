"""Fault catalogue, run folders and config: what a user gets for a changed config on resume, two runs in
one folder, a killed launcher, a kill during the `best` replacement, a file as --out, unknown modalities,
booleans as numbers, search-space bounds and missing evaluation splits. Every failure is one line and
exit 1, and nothing of the run is rewritten by a refused command (real files, real processes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from snag_dist.cli import main
from snag_dist.data.prepare import PrepareOptions, prepare
from snag_dist.engine import checkpoint as ckpt_module
from snag_dist.engine.checkpoint import save_checkpoint
from tests.conftest import write_alignment
from tests.distributed.launch import start, torchrun, train_args

TINY = ["model.modalities=[structure,relation]", "model.hidden=16", "model.dropout=0", "train.batch_size=8",
        "train.eval_every=1", "train.checkpoint_every=1", "train.keep_last=5"]
LONG = ["model.modalities=[structure,relation]", "model.hidden=8", "train.batch_size=8", "train.epochs=100000",
        "train.eval_every=0", "eval.test_at_end=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs_data")
    write_alignment(root / "raw")
    prepare(root / "raw", root / "shards", PrepareOptions(train_ratio=0.8, valid_ratio=0.25, min_shards=1),
            show_progress=False)
    return root / "shards"


def _train(shards: Path, out: Path, *sets: str, flags: tuple[str, ...] = ()) -> list[str]:
    return ["train", "--config", "quickstart", "--shards", str(shards), "--out", str(out), "--quiet",
            *[a for s in (*TINY, *sets) for a in ("--set", s)], *flags]


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """``snag-dist argv`` exits 1 with one line on stderr holding every needle."""
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _epochs(run: Path, name: str = "train.jsonl") -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A finished 2-epoch run: checkpoints epoch_1, epoch_2 and best."""
    run = tmp_path_factory.mktemp("runs_finished") / "run"
    assert main(_train(shards, run, "train.epochs=2")) == 0
    return run


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_resume_with_a_changed_config_is_refused_and_leaves_config_yaml(shards, run_copy, capsys):
    config = (run_copy / "config.yaml").read_bytes()
    resume = ("--resume", "auto")
    # a shape change: was a 49-line RuntimeError, with config.yaml rewritten to the new value
    _fails(capsys, _train(shards, run_copy, "train.epochs=2", "model.hidden=32", flags=resume),
           "'model.hidden'", "stored 16", "requested 32")
    # a schedule change: was silently ignored (trained on the old schedule)
    _fails(capsys, _train(shards, run_copy, "train.epochs=2", "train.lr=1e9", flags=resume),
           "'train.lr'", "stored 0.0005", "requested 1000000000.0")
    # more epochs on a finished run: trained nothing and exited 0
    _fails(capsys, _train(shards, run_copy, "train.epochs=3", flags=resume), "'train.epochs'", "stored 2",
           "requested 3", "finished")
    _fails(capsys, _train(shards, run_copy, "train.epochs=1", flags=resume), "'train.epochs'", "not shorten")
    assert (run_copy / "config.yaml").read_bytes() == config
    assert not (run_copy / "resume_changes.jsonl").exists()
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["best", "epoch_1", "epoch_2"]


def test_resume_extends_epochs_of_an_unfinished_run_and_records_the_changes(shards, run_copy):
    shutil.rmtree(run_copy / "checkpoints" / "epoch_2")  # as if killed after epoch 1's checkpoint
    assert main(_train(shards, run_copy, "train.epochs=3", "eval.chunk_size=7", flags=("--resume", "auto"))) == 0
    assert (run_copy / "checkpoints" / "epoch_3").is_dir()
    records = [json.loads(line) for line in (run_copy / "train.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    # the lr schedule was stretched to the new end: epoch 1 no longer ends at lr 0, epoch 2 does
    assert records[1]["lr"] > 1e-5 and records[2]["lr"] == pytest.approx(0.0, abs=1e-9)
    stored = (run_copy / "config.yaml").read_text()
    assert "epochs: 3" in stored and "chunk_size: 7" in stored
    (change,) = [json.loads(line) for line in (run_copy / "resume_changes.jsonl").read_text().splitlines()]
    assert change["checkpoint"] == "epoch_1"
    assert change["changes"] == {"train.epochs": {"stored": 2, "requested": 3},
                                 "eval.chunk_size": {"stored": 4096, "requested": 7}}


CONSTANT = ("train.lr_schedule=constant", "train.warmup_ratio=0")


def test_finished_constant_lr_run_extends_to_the_run_started_with_more_epochs(shards, tmp_path, capsys):
    """A run that ended at its cap on its best epoch, with an lr that does not depend on the run's length,
    goes on to a raised train.epochs bit for bit as the run started with it (weights, losses, test);
    one whose last checkpoint holds an earlier epoch's best weights is refused, naming that epoch."""
    from safetensors.torch import load_file

    every2 = (*CONSTANT, "train.eval_every=2")  # one validation at epoch 1: the best is the last epoch
    assert main(_train(shards, tmp_path / "full", "train.epochs=4", *every2)) == 0
    short = tmp_path / "short"
    assert main(_train(shards, short, "train.epochs=2", *every2)) == 0
    assert main(_train(shards, short, "train.epochs=4", *every2, flags=("--resume", "auto"))) == 0
    a = load_file(str(tmp_path / "full" / "checkpoints" / "epoch_4" / "model.safetensors"))
    b = load_file(str(short / "checkpoints" / "epoch_4" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(r["epoch"], r["loss"]) for r in map(json.loads, (run / "train.jsonl").read_text().splitlines())]
              for run in (tmp_path / "full", short)]
    assert losses[0] == losses[1] and [e for e, _ in losses[0]] == [0, 1, 2, 3]
    summaries = [json.loads((run / "summary.json").read_text()) for run in (tmp_path / "full", short)]
    assert summaries[0] == summaries[1] and summaries[0]["best_epoch"] in (1, 3)
    (change,) = [json.loads(line) for line in (short / "resume_changes.jsonl").read_text().splitlines()]
    assert change["checkpoint"] == "epoch_2" and change["changes"]["train.epochs"] == {"stored": 2, "requested": 4}

    early = tmp_path / "early"  # validated every epoch: on this data the best is epoch 0 of 2
    assert main(_train(shards, early, "train.epochs=2", *CONSTANT)) == 0
    assert json.loads((early / "summary.json").read_text())["best_epoch"] == 0
    before = (early / "train.jsonl").read_bytes()
    _fails(capsys, _train(shards, early, "train.epochs=4", *CONSTANT, flags=("--resume", "auto")),
           "'train.epochs'", "best validation at epoch 0, not the last (1)")
    assert (early / "train.jsonl").read_bytes() == before and not (early / "resume_changes.jsonl").exists()


def test_eval_set_of_a_model_key_and_missing_checkpoints_are_one_line(finished, tmp_path, capsys):
    _fails(capsys, ["eval", str(finished), "--set", "model.hidden=128"], "'model.hidden'", "stored 16",
           "requested 128")
    _fails(capsys, ["eval", str(finished), "--checkpoint", "epoch_9"], "no checkpoint 'epoch_9'",
           "best, epoch_1, epoch_2")
    empty = tmp_path / "empty"  # a run folder whose run ended before its first checkpoint
    empty.mkdir()
    shutil.copy(finished / "config.yaml", empty / "config.yaml")
    _fails(capsys, ["eval", str(empty)], "no checkpoint 'best'", "has none")


def test_fresh_train_into_a_run_with_checkpoints_is_refused_unless_overwrite(shards, run_copy, capsys):
    before = (run_copy / "metrics.jsonl").read_bytes()
    _fails(capsys, _train(shards, run_copy, "train.epochs=1"), "already holds checkpoints", "--resume auto",
           "--overwrite")
    assert (run_copy / "metrics.jsonl").read_bytes() == before
    _fails(capsys, _train(shards, run_copy, "train.epochs=1", flags=("--overwrite", "--resume", "auto")),
           "exclude each other")
    assert main(_train(shards, run_copy, "train.epochs=1", flags=("--overwrite",))) == 0
    # the old epoch_2 is gone: a later --resume auto cannot take it for this run's
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["best", "epoch_1"]
    assert _epochs(run_copy) == [0]
    assert not [p for p in run_copy.iterdir() if ".deleted-" in p.name]


def test_kill_during_best_replacement_leaves_a_best(shards, run_copy, capsys, monkeypatch):
    folder = run_copy / "checkpoints"
    real_replace = os.replace

    def killed_before_rename_in(src, dst):
        if Path(dst) == folder / "best":
            raise KeyboardInterrupt  # the process dies here
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", killed_before_rename_in)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, {"w": torch.zeros(1)}, None, {}, tag="best")
    monkeypatch.undo()
    assert not (folder / "best").exists()
    capsys.readouterr()
    assert main(["eval", str(run_copy), "--splits", "valid"]) == 0  # the previous best, read where it lies
    assert main(_train(shards, run_copy, "train.epochs=2", flags=("--resume", "auto"))) == 0
    assert (folder / "best" / "model.safetensors").is_file()  # put back under the run lock
    assert not list(folder.glob(".*"))


def test_out_that_is_a_file_is_one_line(shards, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    _fails(capsys, _train(shards, file, "train.epochs=1"), str(file), "is a file")
    _fails(capsys, _train(shards, file / "run", "train.epochs=1"), "is a file")
    _fails(capsys, ["tune", "--config", "quickstart", "--space", "tuning/quickstart.yaml", "--out", str(file),
                    "--quiet"], "is a file")
    assert file.read_text() == "x"


def test_unknown_modality_is_one_line_naming_the_known_ones(shards, tmp_path, capsys):
    _fails(capsys, _train(shards, tmp_path / "r", "train.epochs=1", "model.modalities=[structure,video]"),
           "'video'", "structure, relation")
    assert not (tmp_path / "r" / "train.jsonl").exists()


@pytest.mark.parametrize("override, key", [("train.epochs=true", "train.epochs"), ("train.lr=false", "train.lr"),
                                           ("model.gat_fanout=[true,5]", "model.gat_fanout")])
def test_boolean_for_a_number_is_refused(shards, tmp_path, capsys, override, key):
    _fails(capsys, _train(shards, tmp_path / "r", override), f"'{key}'", "not a boolean")


def test_search_space_bound_written_like_config_yaml(tmp_path):
    from snag_dist.config import load_config
    from snag_dist.tune import load_space, validate

    path = tmp_path / "space.yaml"
    path.write_text("params:\n  train.lr: {loguniform: [1e-4, 1e-3]}\n  train.epochs: {randint: [2, 5]}\n")
    space = load_space(path)
    assert space.params[0].args == (1e-4, 1e-3)
    validate(space, load_config("quickstart", ["train.lr=1e-4"]))


def test_missing_valid_links_are_found_before_training(tmp_path, capsys):
    write_alignment(tmp_path / "raw")
    prepare(tmp_path / "raw", tmp_path / "shards", PrepareOptions(valid_ratio=0.0, min_shards=1), show_progress=False)
    _fails(capsys, _train(tmp_path / "shards", tmp_path / "r", "train.epochs=1"), "no 'valid' links",
           "train.eval_every")
    assert not (tmp_path / "r" / "train.jsonl").exists()  # no epoch was trained first


def _wait_for(predicate, proc, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def test_second_run_into_the_same_folder_is_refused_with_the_holders_pid(shards, tmp_path, capsys):
    out = tmp_path / "run"
    first = start([sys.executable, "-m", "snag_dist", *train_args("quickstart", LONG, shards, out)])
    try:
        _wait_for(lambda: (out / "train.jsonl").is_file(), first)
        _fails(capsys, _train(shards, out, "train.epochs=1"), f"pid {first.pid}", socket.gethostname(), "in use")
        _fails(capsys, _train(shards, out, "train.epochs=1", flags=("--resume", "auto")), f"pid {first.pid}")
        _fails(capsys, ["eval", str(out)], "has none")  # a running run without a checkpoint yet
    finally:
        first.kill()
        first.wait()
    # SIGKILL released the lock; --resume auto finds no checkpoint: a fresh start, the killed run's records gone
    assert main(_train(shards, out, "train.epochs=1", flags=("--resume", "auto"))) == 0
    assert _epochs(out) == [0]


@pytest.mark.dist
def test_workers_exit_when_the_torchrun_agent_is_killed(shards, tmp_path):
    out = tmp_path / "run"
    agent = start(torchrun(2, train_args("quickstart", LONG, shards, out)))
    workers: list[psutil.Process] = []
    try:
        _wait_for(lambda: (out / "train.jsonl").is_file(), agent)  # both workers are training
        workers = psutil.Process(agent.pid).children()
        assert len(workers) == 2
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphaned workers still running: {[p.pid for p in alive]}"
    finally:
        for p in workers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if agent.poll() is None:
            agent.kill()
            agent.wait()
