"""Multi-worker trials: each trial is a Ray Train TorchTrainer of 2 gloo workers, each running the engine.

One trial on the shipped alignment sample (hidden 32, structure + relation, 2 one-epoch evaluations) on a
2-CPU local Ray: the trial's driver takes no CPU, the 2 workers one each. Ray Train's start-up dominates
(~25 s for the worker group on 2 busy cores, after ~15 s for the trial's driver). The ``retried`` case
(slow: a second start-up) raises once on rank 0 after epoch 1; Tune retries the trial and Ray Train hands
the workers its epoch-1 checkpoint, which rank 0 restores into the run folder.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from snag_dist.tune.trainable import TRAIN_RUN
from tests.tune.faults import FAULT_MARKER, Fault
from tests.tune.test_tune import search, shards, write_space  # noqa: F401  (shards: module fixture)

EPOCHS = 2


# The retried case pays Ray Train's start-up twice (~2 min on 2 cores): run it with SNAG_LONG_TESTS=1.
# (Retries from checkpoints of single-worker trials run every time, in test_tune.py.)
LONG = pytest.mark.skipif(not os.environ.get("SNAG_LONG_TESTS"), reason="long test: set SNAG_LONG_TESTS=1")


@pytest.mark.parametrize("fault", [None, pytest.param(Fault(epoch=1, times=1), marks=[pytest.mark.slow, LONG])],
                         ids=["plain", "retried"])
def test_two_worker_trial_reports_every_evaluation_with_world_size_2(fault, shards, tmp_path):  # noqa: F811
    import ray

    space = write_space(tmp_path / "space.yaml", {"noise.noise_ratio": {"uniform": [0.0, 0.5]}},
                        **{"train.epochs": EPOCHS, "train.lr": 3.0e-3})
    sets = ("tune.num_samples=1", "tune.scheduler=none", "tune.workers_per_trial=2", "tune.cpus_per_trial=1",
            "tune.max_concurrent=1", "tune.max_failures=1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        outcome = search(space, shards, tmp_path / "exp", *sets, fault=fault)
    finally:
        ray.shutdown()
    [row] = outcome.rows
    assert row["status"] == "completed" and row["epochs"] == EPOCHS, row
    trial, run = Path(row["run_dir"]).parent, Path(row["run_dir"])
    progress = list(csv.DictReader(open(trial / "progress.csv")))
    # Every evaluation reached Tune (rank 0's metrics through TuneReportCallback), from a 2-rank process
    # group; a retried trial continued from the checkpoint of epoch 1: no epoch trained twice.
    assert [int(p["epochs"]) for p in progress] == list(range(1, EPOCHS + 1)), progress
    assert [int(p["resumed_from"]) for p in progress] == ([0, 1] if fault else [0, 0])
    assert all(int(p["world_size"]) == 2 and float(p["hits@1"]) > 0 for p in progress)
    if fault:
        assert (trial / FAULT_MARKER).read_text() == "1 1"  # raised once, after epoch 1
    assert (trial / TRAIN_RUN / "checkpoint_manager_snapshot.json").is_file()  # Ray Train's run of the trial
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals if e["split"] == "valid"] == list(range(EPOCHS))
    assert json.loads((run / "summary.json").read_text())["best_valid"] == pytest.approx(row["hits@1"])
    # The engine itself ran with 2 ranks: its checkpoint holds both ranks' RNG states.
    with safe_open(str(run / "checkpoints" / f"epoch_{EPOCHS}" / "rng.safetensors"), "pt") as fh:
        assert set(fh.keys()) == {"torch_cpu.rank0", "torch_cpu.rank1"}
    assert (outcome.out / "best.yaml").is_file()
