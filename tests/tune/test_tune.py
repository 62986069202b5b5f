"""Ray Tune search on the shipped alignment sample: real trials of the engine on a 2-CPU local Ray.

Trials are tiny (hidden 32, structure + relation, 4-6 one-epoch evaluations) so the file runs in
about a minute and a half on 2 busy cores. Ray is shut down after every search.
"""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from snag_dist.cli import main
from snag_dist.config import load_config
from snag_dist.data.prepare import PrepareOptions, prepare
from snag_dist.errors import TrainingError
from snag_dist.tune import load_space, validate
from snag_dist.tune.runner import run_search
from snag_dist.tune.trainable import FAULT_MARKER, NO_FAULT, Fault
from tests.conftest import ROOT, SAMPLE

EPOCHS = 4
TINY = {"train.eval_every": 1, "train.batch_size": 512, "model.hidden": 32,
        "model.modalities": ["structure", "relation"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "fr_en_mini"
    prepare(SAMPLE / "dbp15k_fr_en_mini", out, PrepareOptions(text="chargram"), show_progress=False)
    return out


def write_space(path: Path, params: dict, **fixed) -> Path:
    path.write_text(yaml.safe_dump({"fixed": {**TINY, **fixed}, "params": params}))
    return path


@contextmanager
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


def search(space: Path, shards: Path, out: Path, *sets: str, fault: Fault = NO_FAULT, resume: bool = False):
    cfg = load_config("quickstart", [f"data.shards={shards}", *sets])
    return run_search(cfg, load_space(space), out, resume=resume, fault=fault, verbose=0, show=False)


@pytest.fixture(scope="module")
def asha_search(shards, tmp_path_factory):
    """4 trials: lr 3e-3 (learns) and 1e-6 (does not) twice each; ASHA may stop after 1 evaluation."""
    tmp = tmp_path_factory.mktemp("asha")
    space = write_space(tmp / "space.yaml", {"train.lr": {"grid": [3.0e-3, 1.0e-6]},
                                             "noise.noise_ratio": {"uniform": [0.0, 0.5]},
                                             "noise.mask_ratio": {"uniform": [0.2, 0.9]}},
                        **{"train.epochs": EPOCHS})
    with local_ray():
        return search(space, shards, tmp / "exp", "tune.num_samples=2", "tune.grace_period=1",
                      "tune.max_concurrent=2")


def test_search_finishes_and_asha_stops_a_bad_trial_early(asha_search):
    rows, out = asha_search.rows, asha_search.out
    assert len(rows) == 4 and all(r["status"] != "error" for r in rows), rows
    stopped = [r for r in rows if r["status"] == "stopped"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert stopped and all(r["epochs"] < EPOCHS for r in stopped), rows
    assert completed and all(r["epochs"] == EPOCHS for r in completed)
    assert all((Path(r["run_dir"]) / "summary.json").is_file() for r in completed)
    assert all(not (Path(r["run_dir"]) / "summary.json").exists() for r in stopped)
    # The learning rate that trains wins, by far; every stopped trial is a non-learning one.
    assert rows[0]["params"]["train.lr"] == 3.0e-3 and rows[0]["hits@1"] > 0.5
    assert all(r["params"]["train.lr"] == 1.0e-6 for r in stopped)
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [row["trial"] for row in table] == [r["trial"] for r in rows]
    values = [float(row["hits@1"]) for row in table]
    assert values == sorted(values, reverse=True)
    assert {"train.lr", "noise.noise_ratio", "noise.mask_ratio", "status", "epochs"} <= set(table[0])
    assert {p.name for p in (out / "plots").iterdir()} == {"metric_vs_noise.png", "learning_curves.png"}
    # Every report carried a checkpoint: the trial's run folder logged one evaluation per epoch.
    evals = [json.loads(x) for x in (Path(rows[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals if e["split"] == "valid"] == list(range(EPOCHS))


def test_best_config_trains_unchanged_and_reproduces_the_trial(asha_search, tmp_path):
    best = asha_search.out / "best.yaml"
    chosen = yaml.safe_load(best.read_text())
    assert chosen["train"]["lr"] == asha_search.rows[0]["params"]["train.lr"]
    assert chosen["noise"]["noise_ratio"] == asha_search.rows[0]["params"]["noise.noise_ratio"]
    run = tmp_path / "run"
    assert main(["train", "--config", str(best), "--out", str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_valid"] == pytest.approx(asha_search.rows[0]["hits@1"], abs=1e-6)
    assert "base" in summary["test"]


def test_failed_trial_is_retried_from_its_checkpoint_then_the_search_resumes(shards, tmp_path):
    """Attempt 1 raises after epoch 1, FailureConfig retries it from the epoch-1 checkpoint; attempt 2
    raises after epoch 2 (max_failures spent: the search ends with an error); Tuner.restore resumes it
    from the epoch-2 checkpoint and it finishes. Optuna proposes the trial."""
    space = write_space(tmp_path / "space.yaml", {"noise.noise_ratio": {"uniform": [0.1, 0.3]}},
                        **{"train.epochs": 4})
    sets = ("tune.num_samples=1", "tune.scheduler=none", "tune.search=optuna", "tune.max_failures=1",
            "eval.test_at_end=false")
    with local_ray():
        with pytest.raises(TrainingError, match="injected fault 2/2 after epoch 2"):
            search(space, shards, tmp_path / "exp", *sets, fault=Fault(epoch=1, times=2))
        outcome = search(space, shards, tmp_path / "exp", *sets, resume=True)
    (row,) = outcome.rows
    assert row["status"] == "completed" and row["epochs"] == 4, row
    trial = Path(row["run_dir"]).parent
    assert (trial / FAULT_MARKER).read_text() == "2 2"  # the second fault fired after epoch 2
    progress = list(csv.DictReader(open(trial / "progress.csv")))
    # No epoch trained twice: each attempt continued from the previous attempt's last checkpoint.
    assert [int(p["epochs"]) for p in progress] == [1, 2, 3, 4]
    assert [int(p["resumed_from"]) for p in progress] == [0, 1, 2, 2]
    evals = [json.loads(x) for x in (trial / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 1, 2, 3]


BAD_SPACES = [
    ("params:\n  noise.nosie_ratio: {uniform: [0.1, 0.2]}\n", "noise.nosie_ratio", "did you mean 'noise.noise_ratio'"),
    ("params:\n  noise.mask_ratio: {uniform: [0.1, 1.5]}\n", "noise.mask_ratio", "1.5"),
    ("params:\n  train.lr: {logunifrm: [1.0e-4, 1.0e-3]}\n", "train.lr", "unknown distribution 'logunifrm'"),
    ("params:\n  train.lr: {loguniform: [0.0, 1.0e-3]}\n", "train.lr", "0 < low"),
    ("params:\n  model.hidden: {choice: []}\n", "model.hidden", "choice takes"),
    ("params:\n  train.lr: {uniform: [1, 2]\n", "invalid YAML", ""),
    ("params: {}\n", "nothing to search", ""),
    ("parms:\n  train.lr: {uniform: [1, 2]}\n", "unknown top-level key 'parms'", ""),
]


@pytest.mark.parametrize("text,key,detail", BAD_SPACES)
def test_bad_search_space_is_a_one_line_error(text, key, detail, tmp_path, capsys):
    space = tmp_path / "bad.yaml"
    space.write_text(text)
    code = main(["tune", "--space", str(space), "--config", "quickstart", "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert str(space) in err and key in err and detail in err, err
    assert not (tmp_path / "exp").exists()  # nothing started


def test_grid_needs_random_search(tmp_path):
    space = write_space(tmp_path / "s.yaml", {"train.lr": {"grid": [1.0e-3, 2.0e-3]}})
    with pytest.raises(Exception, match="grid works with --search random only"):
        validate(load_space(space), load_config("quickstart"), "optuna")


@pytest.mark.parametrize("space,preset", [("alignment", "dbp15k_fr_en"), ("completion", "db15k"),
                                          ("quickstart", "quickstart")])
def test_shipped_spaces_are_valid_for_their_presets(space, preset):
    validate(load_space(ROOT / "tuning" / f"{space}.yaml"), load_config(preset))
