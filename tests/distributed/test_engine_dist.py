"""The distributed engine with real processes (torchrun, gloo): 2 processes train what 1 does, for
both backends; SIGKILL mid-epoch + --resume auto ends bit-identical; DeepSpeed ZeRO 1/2/3 train,
checkpoint and resume; evaluation split over ranks equals one process; a two-node launch (two
torchrun agents, c10d rendezvous on 127.0.0.1) trains and checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from snag_dist.config import load_config
from snag_dist.engine.run import train
from tests.distributed.launch import (
    ENV,
    ROOT,
    evals,
    free_port,
    kill_when,
    losses,
    run,
    start,
    torchrun,
    train_args,
    weights,
)
from tests.tasks.test_alignment_task import sample_shards  # noqa: F401  (module-scoped fixture)

# Small and dropout-free: the global batch of 2 x 50 pairs is the 1-process batch of 100.
TINY = ["model.modalities=[structure,relation]", "model.hidden=32", "model.dropout=0", "train.batch_size=100",
        "train.epochs=3", "train.eval_every=1", "train.checkpoint_every=1", "train.checkpoint_every_steps=2",
        "train.keep_last=20"]


def _cli(shards: Path, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return train_args("quickstart", TINY, shards, out, extra)


@pytest.fixture(scope="module")
def reference(sample_shards, tmp_path_factory):  # noqa: F811
    """One process, Accelerate, in this process."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(load_config("quickstart", [*TINY, f"data.shards={sample_shards}"]), out, progress=False)
    return out


def _same_curve(run_dir: Path, ref: Path, rel: float = 1e-5, metric_tol: float = 2e-3) -> None:
    """Same losses (relative ``rel``) and validation/test metrics (``metric_tol``: the loss rows are
    split over ranks and summed in another order, so weights differ in the last float32 bits)."""
    a, b = losses(run_dir), losses(ref)
    assert len(a) == len(b) == 3
    assert all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b)), (a, b)
    ea, eb = evals(run_dir), evals(ref)
    assert [(e["epoch"], e["split"]) for e in ea] == [(e["epoch"], e["split"]) for e in eb]
    for x, y in zip(ea, eb):
        assert x["hits@1"] == pytest.approx(y["hits@1"], abs=metric_tol), (x, y)
        assert x["mrr"] == pytest.approx(y["mrr"], abs=metric_tol), (x, y)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_accelerate_two_processes_match_one_and_sigkill_resume_is_exact(sample_shards, reference, tmp_path):  # noqa: F811
    full = tmp_path / "full"
    run(torchrun(2, _cli(sample_shards, full)))
    _same_curve(full, reference)
    assert (full / "checkpoints" / "epoch_3" / "model.safetensors").is_file()
    assert any(e["split"] == "test" for e in evals(full))

    killed = tmp_path / "killed"
    proc = start(torchrun(2, _cli(sample_shards, killed)))
    kill_when(proc, killed / "checkpoints" / "epoch_1_step_4")  # mid-epoch 1 of 3 (6 steps per epoch)
    assert not (killed / "checkpoints" / "epoch_3").exists()
    run(torchrun(2, _cli(sample_shards, killed) + ["--resume", "auto"]))
    _same_weights(weights(killed, "epoch_3"), weights(full, "epoch_3"))
    assert losses(killed) == losses(full)
    assert evals(killed) == evals(full)


@pytest.mark.slow
def test_deepspeed_zero_stages_match_one_process_resume_and_shard_eval(sample_shards, reference, tmp_path):  # noqa: F811
    run(torchrun(2, [str(sample_shards), str(tmp_path), "1,2,3", *TINY], script=str(ROOT / "tests/distributed/ds_driver.py")),
        timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())
    for stage in ("1", "2", "3"):
        full = tmp_path / f"z{stage}"
        _same_curve(full, reference, rel=1e-4)  # ZeRO also sums in another order
        # Cut back to a mid-epoch checkpoint (epoch 1, step 2) and resumed: the same final weights.
        _same_weights(weights(tmp_path / f"z{stage}_resumed", "epoch_3"), weights(full, "epoch_3"))
        assert (full / "checkpoints" / "epoch_3" / "optim.rank1.safetensors").is_file()  # rank 1's ZeRO partition
        sharded, single = result[stage]["sharded"], result[stage]["single"]
        assert sharded == pytest.approx(single, abs=1e-9) and single["hits@1"] > 0.1


@pytest.mark.slow
def test_two_node_launch_with_c10d_rendezvous(sample_shards, reference, tmp_path):  # noqa: F811
    out, port = tmp_path / "two_node", free_port()
    rdzv = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "snag-test"]
    agents = [subprocess.Popen(torchrun(1, _cli(sample_shards, out), extra=rdzv), env=ENV, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), logs[0][-3000:] + logs[1][-3000:]
    _same_curve(out, reference)
    assert (out / "checkpoints" / "epoch_3" / "model.safetensors").is_file()


@pytest.mark.slow
def test_accelerate_fsdp_two_processes_match_one(sample_shards, reference, tmp_path):  # noqa: F811
    out = tmp_path / "fsdp"
    run(torchrun(2, _cli(sample_shards, out, ("engine.fsdp=true", "train.checkpoint_every_steps=0"))))
    _same_curve(out, reference, rel=1e-4)
    saved = weights(out, "epoch_3")  # whole parameters, not this rank's shard
    assert saved.keys() == weights(reference, "epoch_3").keys()
    assert all(saved[k].shape == v.shape for k, v in weights(reference, "epoch_3").items())
