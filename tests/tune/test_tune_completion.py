"""Ray Tune on KG completion: Optuna + ASHA over real trials of the shipped DB15K sample.

Completion's selection metric depends on the config (full filtered MRR, or a sampled-candidates MRR), so
it is computed from the config; before, the search received a property object and Optuna's searcher
could not checkpoint (`cannot pickle 'property' object`) on the first trial.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from snag_dist.config import load_config
from snag_dist.data.prepare import PrepareOptions, prepare
from snag_dist.tune import load_space
from snag_dist.tune.runner import run_search, task_metric
from tests.conftest import SAMPLE


def test_completion_metric_is_the_configured_string():
    assert task_metric(load_config("quickstart_completion")) == "mrr"
    assert task_metric(load_config("quickstart_completion", ["eval.completion_candidates=50"])) == "sampled-50/mrr"
    assert task_metric(load_config("quickstart")) == "hits@1"


@pytest.mark.ray
def test_optuna_asha_search_on_completion_finishes_and_ranks_by_mrr(tmp_path):
    import ray

    shards = tmp_path / "db15k_mini"
    prepare(SAMPLE / "db15k_mini", shards, PrepareOptions(), show_progress=False)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "fixed": {"train.epochs": 2, "train.eval_every": 1, "train.patience": 0, "model.hidden": 32,
                  "model.modalities": ["structure", "relation"], "noise.enabled": True},
        "params": {"train.lr": {"loguniform": [1.0e-4, 3.0e-3]}, "noise.noise_ratio": {"uniform": [0.0, 0.5]}},
    }))
    cfg = load_config("quickstart_completion", [f"data.shards={shards}", "tune.search=optuna", "tune.scheduler=asha",
                                                "tune.num_samples=2", "tune.max_concurrent=1"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        outcome = run_search(cfg, load_space(space), tmp_path / "exp", verbose=0, show=False)
    finally:
        ray.shutdown()
    assert outcome.metric == "mrr"
    rows = list(csv.DictReader(open(outcome.out / "results.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"completed", "stopped"}, rows
    assert any(r["status"] == "completed" for r in rows)
    scores = [float(r["mrr"]) for r in rows]
    assert all(0.0 < s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)
    assert list(Path(outcome.out).glob("searcher-state*.pkl"))  # Optuna's state was checkpointed
    assert outcome.best_config.is_file()
