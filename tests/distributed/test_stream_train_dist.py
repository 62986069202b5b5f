"""The stream path with real processes (torchrun, gloo): 2 processes with the entity table sharded
over them train what 1 process trains (same losses and metrics, fixed data.stream_splits), under
Accelerate and DeepSpeed; SIGKILL mid-epoch + --resume auto ends with bit-identical weights and
table rows; each rank holds half the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snag_dist.config import load_config
from snag_dist.engine.run import train
from tests.distributed.launch import evals, kill_when, losses, run, start, torchrun, train_args, weights
from tests.tasks.test_stream_path import stream_shards  # noqa: F401  (module-scoped fixture)

SETS = ["data.mode=stream", "data.stream_splits=2", "model.hidden=32", "model.dropout=0",
        "model.structure_encoder=gat", "model.gat_fanout=[4,4]", "noise.enabled=true", "noise.noise_ratio=0.5",
        "train.batch_size=256", "train.epochs=2", "train.eval_every=1", "train.checkpoint_every=1",
        "train.checkpoint_every_steps=2", "train.keep_last=20", "task.completion.negative_chunk=16",
        "task.completion.kernel=eager"]


def _cli(shards: Path, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return train_args("quickstart_completion", SETS, shards, out, extra)


@pytest.fixture(scope="module")
def one_process(stream_shards, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("stream1") / "run"
    train(load_config("quickstart_completion", [*SETS, f"data.shards={stream_shards}"]), out, progress=False)
    return out


def _same(run_dir: Path, ref: Path) -> None:
    a, b = losses(run_dir), losses(ref)
    assert len(a) == len(b) == 2
    assert all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a, b)), (a, b)
    for x, y in zip(evals(run_dir), evals(ref), strict=True):
        assert (x["epoch"], x["split"]) == (y["epoch"], y["split"])
        assert x["mrr"] == pytest.approx(y["mrr"], abs=2e-3), (x, y)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["accelerate", "deepspeed"])
def test_two_processes_with_a_sharded_table_train_what_one_does(stream_shards, one_process, tmp_path,  # noqa: F811
                                                                 backend):
    out = tmp_path / "run"
    run(torchrun(2, _cli(stream_shards, out, (f"engine.backend={backend}",))), timeout=400)
    _same(out, one_process)
    final = sorted((out / "checkpoints").glob("epoch_2"))[0]
    shards = [load_file(str(final / f"table.rank{r}.0.safetensors")) for r in (0, 1)]
    whole = load_file(str(one_process / "checkpoints" / "epoch_2" / "table.rank0.0.safetensors"))
    assert [s["weight"].shape[0] for s in shards] == [math.ceil(whole["weight"].shape[0] / 2),
                                                       whole["weight"].shape[0] // 2]  # half the rows each
    # Adam turns last-bit differences of near-zero gradients into whole steps: rows agree to ~1 %.
    both = torch.cat([s["weight"] for s in shards])
    assert (both - whole["weight"]).norm() / whole["weight"].norm() < 2e-2


@pytest.mark.slow
def test_sigkill_mid_epoch_in_stream_mode_resumes_bit_identical(stream_shards, tmp_path):  # noqa: F811
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run(torchrun(2, _cli(stream_shards, ref)), timeout=400)
    proc = start(torchrun(2, _cli(stream_shards, out)))
    kill_when(proc, out / "checkpoints" / "epoch_1_step_2" / "state.json")
    run(torchrun(2, [*_cli(stream_shards, out), "--resume", "auto"]), timeout=400)
    assert losses(out) == losses(ref)
    a, b = weights(out, "epoch_2"), weights(ref, "epoch_2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in (0, 1):
        ta = load_file(str(out / "checkpoints" / "epoch_2" / f"table.rank{r}.0.safetensors"))
        tb = load_file(str(ref / "checkpoints" / "epoch_2" / f"table.rank{r}.0.safetensors"))
        assert all(torch.equal(ta[k], tb[k]) for k in tb)
    state = json.loads((out / "checkpoints" / "epoch_2" / "state.json").read_text())
    assert state["fit"]["epoch"] == 2
