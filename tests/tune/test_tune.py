"""Ray Tune search on the shipped alignment sample: real trials of the engine on a 2-CPU local Ray.

Trials are tiny (hidden 32, structure + relation, 4 one-epoch evaluations). One Ray session serves the
search and its resume (a ray.init costs ~10 s on 2 busy cores); it is shut down right after.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from snag_dist.cli import main
from snag_dist.config import load_config
from snag_dist.data.prepare import PrepareOptions, prepare
from snag_dist.tune import load_space, validate
from snag_dist.tune.runner import run_search
from tests.conftest import ROOT, SAMPLE
from tests.tune.faults import FAULT_MARKER, Fault

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


def search(space: Path, shards: Path, out: Path, *sets: str, fault: Fault | None = None, resume: bool = False):
    cfg = load_config("quickstart", [f"data.shards={shards}", *sets])
    return run_search(cfg, load_space(space), out, resume=resume, on_report=fault, verbose=0, show=False)


@pytest.fixture(scope="module")
def searched(shards, tmp_path_factory):
    """One Ray session (shut down after it): 4 trials, lr 3e-3 (learns) and 1e-6 (does not) twice each,
    ASHA may stop a trial after its first evaluation. The third trial (lr 3e-3) raises after epoch 1,
    is retried from its epoch-1 checkpoint (max_failures=1), raises again after epoch 2 and ends in
    error; the search is then resumed (Tuner.restore) and that trial finishes from its epoch-2 checkpoint.
    (The third, not the first: a failed trial's process is not reused, a finished one's is.)
    """
    import ray

    tmp = tmp_path_factory.mktemp("search")
    space = write_space(tmp / "space.yaml", {"train.lr": {"grid": [3.0e-3, 1.0e-6]},
                                             "noise.noise_ratio": {"uniform": [0.0, 0.5]},
                                             "noise.mask_ratio": {"uniform": [0.2, 0.9]}},
                        **{"train.epochs": EPOCHS})
    sets = ("tune.num_samples=2", "tune.grace_period=1", "tune.max_concurrent=2", "tune.max_failures=1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        first = search(space, shards, tmp / "exp", *sets, fault=Fault(epoch=1, times=2, trial="00002"))
        resumed = search(space, shards, tmp / "exp", *sets, resume=True)
    finally:
        ray.shutdown()
    return first, resumed


def test_search_finishes_and_asha_stops_a_bad_trial_early(searched):
    _, outcome = searched
    rows, out = outcome.rows, outcome.out
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
    # Every report carried a checkpoint: each completed run logged one evaluation per epoch.
    for r in completed:
        evals = [json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert [e["epoch"] for e in evals if e["split"] == "valid"] == list(range(EPOCHS))


def test_failed_trial_is_retried_from_its_checkpoint_then_the_search_resumes(searched):
    first, resumed = searched
    failed = [r for r in first.rows if r["status"] == "error"]
    assert [r["trial"][-5:] for r in failed] == ["00002"], first.rows
    assert failed[0]["error"].endswith("injected fault 2/2 after epoch 2"), failed[0]["error"]
    assert failed[0]["epochs"] == 2
    row = next(r for r in resumed.rows if r["trial"] == failed[0]["trial"])
    assert row["status"] == "completed" and row["epochs"] == EPOCHS, row
    trial = Path(row["run_dir"]).parent
    assert (trial / FAULT_MARKER).read_text() == "2 2"  # the second fault fired after epoch 2
    progress = list(csv.DictReader(open(trial / "progress.csv")))
    # No epoch trained twice: each attempt continued from the previous attempt's last checkpoint.
    assert [int(p["epochs"]) for p in progress] == [1, 2, 3, 4]
    assert [int(p["resumed_from"]) for p in progress] == [0, 1, 2, 2]


def test_best_config_trains_unchanged_and_reproduces_the_trial(searched, tmp_path):
    _, outcome = searched
    best = outcome.out / "best.yaml"
    chosen = yaml.safe_load(best.read_text())
    assert chosen["train"]["lr"] == outcome.rows[0]["params"]["train.lr"]
    assert chosen["noise"]["noise_ratio"] == outcome.rows[0]["params"]["noise.noise_ratio"]
    run = tmp_path / "run"
    assert main(["train", "--config", str(best), "--out", str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_valid"] == pytest.approx(outcome.rows[0]["hits@1"], abs=1e-6)
    assert "base" in summary["test"]


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


def test_optuna_proposes_valid_trial_configs_from_a_shipped_space():
    """Without Ray workers: OptunaSearch takes the converted space and its proposals are valid configs."""
    from snag_dist.tune.runner import _search_alg
    from snag_dist.tune.space import apply

    cfg = load_config("dbp15k_fr_en", ["tune.search=optuna"])
    space = load_space(ROOT / "tuning" / "alignment.yaml")
    searcher = _search_alg(cfg.tune, seed=0)
    assert type(searcher).__name__ == "OptunaSearch"
    assert searcher.set_search_properties("hits@1", "max", space.to_ray())
    proposals = [searcher.suggest(f"t{i}") for i in range(3)]
    for params in proposals:
        assert set(params) == set(space.keys())
        trial = apply(cfg, space.fixed, params)
        assert 0.0 <= trial.noise.noise_ratio <= 0.8 and trial.model.hidden in (200, 300, 400)
        assert trial.noise.per_modality["image"].mask_ratio == params["noise.per_modality.image.mask_ratio"]
    assert len({p["train.lr"] for p in proposals}) == 3  # it samples, not repeats
