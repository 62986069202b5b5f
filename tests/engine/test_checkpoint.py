"""Checkpoints: safetensors round trip, resume continues exactly, bad checkpoints give clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from snag_dist.cli import main
from snag_dist.config import load_config
from snag_dist.engine.checkpoint import (
    flatten_optimizer,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from snag_dist.engine.run import evaluate_run, train
from snag_dist.errors import CheckpointError
from tests.tasks.test_alignment_task import sample_shards  # noqa: F401  (module-scoped fixture)


def test_optimizer_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, skeleton = flatten_optimizer(opt.state_dict())
    path = save_checkpoint(tmp_path, model.state_dict(), opt.state_dict(), {"x": 1}, tag="t")
    m, o, s = load_checkpoint(path)
    assert s["x"] == 1 and torch.equal(m["weight"], model.weight)
    restored = unflatten_optimizer(tensors, skeleton)
    assert torch.equal(restored["state"][0]["exp_avg"], o["state"][0]["exp_avg"])
    opt.load_state_dict(o)


def test_corrupt_or_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        load_checkpoint(tmp_path / "nope")
    path = save_checkpoint(tmp_path, {"w": torch.ones(2)}, None, {}, tag="t")
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_resume_from_epoch_checkpoint_is_exact(sample_shards, tmp_path):  # noqa: F811
    over = [f"data.shards={sample_shards}", "model.modalities=[structure,relation]", "train.epochs=6",
            "train.eval_every=2", "train.checkpoint_every=3", "train.keep_last=5", "train.batch_size=256", "model.hidden=64"]
    cfg = load_config("quickstart", over)
    full = tmp_path / "full"
    train(cfg, full, progress=False)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "epoch_6")  # as if killed after epoch 3's checkpoint
    train(cfg, part, resume=True, progress=False)
    a = load_file(str(full / "checkpoints" / "epoch_6" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "epoch_6" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_eval_of_non_run_folder_is_one_line_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a run folder" in err and len(err.splitlines()) == 1


def test_nan_loss_is_a_clear_error(sample_shards, tmp_path, capsys):  # noqa: F811
    assert main(["train", "--config", "quickstart", "--shards", str(sample_shards), "--out", str(tmp_path / "r"),
                 "--set", "train.lr=1e30", "--set", "train.grad_clip=0", "--set", "train.epochs=4",
                 "--set", "model.modalities=[structure,relation]", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "non-finite loss" in err and len(err.splitlines()) == 1


def test_resume_from_corrupt_checkpoint_is_a_one_line_error(sample_shards, tmp_path, capsys):  # noqa: F811
    args = ["train", "--config", "quickstart", "--shards", str(sample_shards), "--out", str(tmp_path / "r"), "--quiet",
            "--set", "model.modalities=[structure,relation]", "--set", "model.hidden=32", "--set", "train.epochs=2",
            "--set", "train.eval_every=2", "--set", "train.checkpoint_every=1"]
    assert main(args) == 0
    latest = tmp_path / "r" / "checkpoints" / "epoch_2"
    (latest / "optim.safetensors").write_bytes(b"\x00" * 64)
    capsys.readouterr()
    assert main([*args, "--resume", "auto"]) == 1
    err = capsys.readouterr().err.strip()
    assert "corrupt" in err and str(latest) in err and len(err.splitlines()) == 1


def test_iterative_phase_lr_follows_pseudo_links_and_resumes_exactly(sample_shards, tmp_path):  # noqa: F811
    """Pseudo links add steps per epoch: the lr schedule stretches to still end with the phase, and a run
    resumed from a checkpoint inside the iterative phase (pseudo links restored) ends identically."""
    over = [f"data.shards={sample_shards}", "model.modalities=[structure,relation,name]", "model.hidden=32",
            "train.epochs=8", "train.eval_every=2", "train.batch_size=64", "train.checkpoint_every=1",
            "train.keep_last=10", "task.alignment.iterative=true", "task.alignment.iterative_start=3",
            "task.alignment.mnn_every=1", "task.alignment.pseudo_every=2"]
    cfg = load_config("quickstart", over)
    full = tmp_path / "full"
    train(cfg, full, progress=False)
    records = [json.loads(x) for x in (full / "train.jsonl").read_text().splitlines()]
    it = [r for r in records if r["phase"] == "iterative"]
    evals = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    pseudo = [m["pseudo_links"] for m in evals]
    assert max(pseudo) > 64  # enough pseudo links to add steps per epoch
    # The first links come pseudo_every (2) epochs into the iterative phase (start 3), not at its start.
    assert min(m["epoch"] for m in evals if m["pseudo_links"] > 0) == 5
    # `snag-dist eval` restores the best checkpoint's task state: its pseudo links, as logged at that epoch.
    best = next(m["best_epoch"] for m in evals if m["split"] == "test" and m["phase"] == "iterative")
    logged = next(m for m in evals if m["split"] == "valid" and m["epoch"] == best)
    again = evaluate_run(full, ("test",))["test"]
    assert again["pseudo_links"] == logged["pseudo_links"]
    assert again.get("pseudo_precision") == logged.get("pseudo_precision")
    # Reported precision of the pseudo links against the held-out links: far above chance (1 / #entities).
    precision = [m["pseudo_precision"] for m in evals if m["pseudo_links"] > 0]
    assert precision and all(0.5 < p <= 1.0 for p in precision)
    assert all("pseudo_precision" not in m for m in evals if m["pseudo_links"] == 0)
    assert all(r["lr"] > 0 for r in it[:-1]) and it[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert all(a["lr"] >= b["lr"] for a, b in zip(it[1:], it[2:]))  # decays, never restarts
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for name in ("epoch_7", "epoch_8"):
        shutil.rmtree(part / "checkpoints" / name)  # killed after epoch 6 (iterative, with pseudo links)
    train(cfg, part, resume=True, progress=False)
    a = load_file(str(full / "checkpoints" / "epoch_8" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "epoch_8" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_table_rows_read_in_blocks_from_rank_files(tmp_path):
    """eval loads a rank's table rows block by block from whichever rank files cover them."""
    import numpy as np
    from safetensors.torch import save_file

    from snag_dist.engine.checkpoint import map_rank_rows, read_rank_rows

    weight = torch.arange(40 * 3, dtype=torch.float32).view(40, 3)
    for name, (a, b) in (("table.rank0.0", (0, 15)), ("table.rank0.1", (15, 25)), ("table.rank1.0", (25, 40))):
        save_file({"range": torch.tensor([a, b]), "weight": weight[a:b].clone()}, str(tmp_path / f"{name}.safetensors"))
    out = torch.zeros(22, 3)
    read_rank_rows(tmp_path, "table", (10, 32), out, block=4)
    assert torch.equal(out, weight[10:32])
    spill = tmp_path / "spill"
    spill.mkdir()
    spanning = map_rank_rows(tmp_path, "table", (10, 32), spill)  # two files: a contiguous copy, mapped
    inside = map_rank_rows(tmp_path, "table", (16, 24), spill)  # one file: a map of the checkpoint itself
    assert torch.equal(torch.from_numpy(np.array(spanning)), weight[10:32]) and len(list(spill.iterdir())) == 1
    assert torch.equal(torch.from_numpy(np.array(inside)), weight[16:24]) and str(inside.filename).endswith("rank0.1.safetensors")
    (tmp_path / "table.rank1.0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="hold 15 of rows"):
        read_rank_rows(tmp_path, "table", (10, 32), torch.zeros(22, 3))
