"""The search: a Ray Tune ``Tuner`` over trials of the engine, then the results table, best config and plots.

Ray is local by default; with ``RAY_ADDRESS`` set (or ``ray start --head`` run on this machine) the
Tuner joins that cluster. The experiment folder is ``--out``: Ray's state (so ``--resume auto`` can
``Tuner.restore`` it), one folder per trial (``TRIAL/run`` is a normal run folder), ``results.csv``,
``best.yaml`` and ``plots/``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snag_dist.config import Config, TuneConfig, replace, to_dict
from snag_dist.errors import CheckpointError, ConfigError, TrainingError
from snag_dist.tune.space import SearchSpace, apply, validate
from snag_dist.tune.trainable import OnReport

# task name -> the class whose `metric` is its validation metric (hits@1 / mrr)
_TASK_CLASSES = {"alignment": "snag_dist.tasks.alignment:AlignmentTask",
                 "completion": "snag_dist.tasks.completion:CompletionTask"}
DRIVER_MEMORY = 64 * 2**20  # bytes Tune reserves for a multi-worker trial's driver (it takes no CPU)
REDUCTION_FACTOR = 2  # ASHA keeps the top half at each rung (small searches need a gentle cut)
TUNER_STATE = "tuner.pkl"  # Ray's experiment state in the experiment folder (what Tuner.restore reads)


@dataclass(frozen=True)
class TuneOutcome:
    out: Path
    metric: str
    rows: list[dict[str, Any]]  # one per trial, best first (see outputs.trial_rows)
    best_config: Path
    plots: list[Path]


def task_metric(cfg: Config) -> str:
    """The metric trials report and ASHA / the searcher maximise, as the task computes it for ``cfg``
    (completion's depends on eval.completion_candidates)."""
    module, cls = _TASK_CLASSES[cfg.task.name].split(":")
    metric = getattr(importlib.import_module(module), cls).metric_for(cfg)
    if not isinstance(metric, str):
        raise TypeError(f"{cls}.metric_for returned {type(metric).__name__}, want str")
    return metric


def absolute_paths(cfg: Config) -> Config:
    """Trials run in Ray's working folders: make every path of the config absolute first."""
    fix = {}
    for section, key in (("data", "shards"), ("data", "store_dir"), ("engine", "ds_config")):
        value = getattr(getattr(cfg, section), key)
        if value:
            fix.setdefault(section, {})[key] = str(Path(value).expanduser().resolve())
    return replace(cfg, fix) if fix else cfg


def _search_alg(tcfg: TuneConfig, seed: int):
    """Metric and mode come from TuneConfig (Ray refuses them twice)."""
    if tcfg.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # optuna is optional
            raise ConfigError(f"--search optuna needs optuna installed (pip install optuna): {exc}") from None
        return OptunaSearch(seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # A SearchGenerator ignores TuneConfig.max_concurrent_trials: it takes the limit itself.
    return BasicVariantGenerator(random_state=seed, max_concurrent=tcfg.max_concurrent)


def _scheduler(tcfg: TuneConfig, cfg: Config, space: SearchSpace):
    if tcfg.scheduler == "none":
        return None
    from snag_dist.tune.asha import FinishingASHA

    # Time is epochs trained (of the trials' config: the space may fix or search train.epochs);
    # grace_period counts evaluations, so it is scaled by eval_every.
    trial = apply(cfg, space.fixed, {})
    searched = [p for p in space.params if p.key == "train.epochs"]
    max_t = max(searched[0].extremes()) if searched else trial.train.epochs
    grace = min(tcfg.grace_period * trial.train.eval_every, max_t)
    # a trial at max_t finishes its run (test split, summary): asha.py says why this is not just stop_last_trials
    return FinishingASHA(time_attr="epochs", max_t=max_t, grace_period=grace, reduction_factor=REDUCTION_FACTOR)


def trial_name(trial) -> str:
    """Short trial names and folders (Ray's default packs every param into the folder name)."""
    return f"trial_{trial.trial_id}"


def holds_search(out: Path) -> bool:
    """Whether ``out`` holds a search Ray can restore."""
    return (out / TUNER_STATE).is_file()


def _trainable(cfg: Config, space: SearchSpace, out: Path, on_report: OnReport | None):
    from ray import tune

    from snag_dist.tune.trainable import run_trial, run_trial_workers

    tcfg = cfg.tune
    common = {"base": to_dict(cfg), "fixed": space.fixed, "exp_dir": str(out), "on_report": on_report}
    if tcfg.workers_per_trial == 1:
        bound = tune.with_parameters(run_trial, **common)
        return tune.with_resources(bound, {"cpu": tcfg.cpus_per_trial, "gpu": tcfg.gpus_per_trial})
    # The trial only drives a TorchTrainer: its workers hold the CPUs/GPUs, the driver takes no CPU
    # (Tune refuses an empty request: it asks for a little memory instead).
    bound = tune.with_parameters(run_trial_workers, **common, workers=tcfg.workers_per_trial,
                                 cpus=tcfg.cpus_per_trial, gpus=tcfg.gpus_per_trial)
    return tune.with_resources(bound, {"cpu": 0, "memory": DRIVER_MEMORY})


def build_tuner(cfg: Config, space: SearchSpace, out: Path, resume: bool = False,
                on_report: OnReport | None = None, verbose: int = 1):
    from ray import tune

    # Every report carries a checkpoint and num_to_keep forces a state snapshot: expected, not a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = _trainable(cfg, space, out, on_report)
    if resume:
        if not tune.Tuner.can_restore(str(out)):
            raise CheckpointError(f"{out} holds no Ray Tune experiment to restore")
        return tune.Tuner.restore(str(out), trainable, resume_unfinished=True, resume_errored=True)
    if holds_search(out):
        raise ConfigError(f"{out} already holds a search: pass --resume auto to continue it or choose another --out")
    metric = task_metric(cfg)
    tcfg = cfg.tune
    tune_config = tune.TuneConfig(
        metric=metric, mode="max", num_samples=tcfg.num_samples, search_alg=_search_alg(tcfg, cfg.train.seed),
        scheduler=_scheduler(tcfg, cfg, space),
        max_concurrent_trials=tcfg.max_concurrent if tcfg.search != "random" else None,
        trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        # A new trial reuses a finished trial's process: no second torch import. Not for multi-worker
        # trials: a stopped trial's driver is ended, and its Ray Train workers with it.
        reuse_actors=tcfg.workers_per_trial == 1,
    )
    run_config = tune.RunConfig(
        name=out.name, storage_path=str(out.parent), verbose=verbose,
        failure_config=tune.FailureConfig(max_failures=tcfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
    )
    return tune.Tuner(trainable, param_space=space.to_ray(), tune_config=tune_config, run_config=run_config)


def run_search(cfg: Config, space: SearchSpace, out: str | Path, resume: bool = False,
               on_report: OnReport | None = None, verbose: int = 1, show: bool = True) -> TuneOutcome:
    """Run the search of ``space`` around ``cfg`` (``resume``: restore the one in ``out``); write
    results.csv, best.yaml and plots/.

    ``on_report(trial_dir, metrics)`` (picklable: Ray ships it to the trials) runs in each trial after
    every report, on the process that sent the checkpoint; what it raises fails the trial, which Tune
    then retries from that checkpoint (``tune.max_failures``) or a later ``resume`` restores.
    """
    from snag_dist.tune import outputs

    out = Path(out).expanduser().resolve()
    cfg = absolute_paths(cfg)
    validate(space, cfg, cfg.tune.search)
    metric = task_metric(cfg)
    grid = build_tuner(cfg, space, out, resume, on_report, verbose).fit()
    rows = outputs.trial_rows(grid, cfg, space, metric)
    if not any(r["status"] != "error" for r in rows):
        first = next((r["error"] for r in rows if r["error"]), "no trial reported")
        raise TrainingError(f"every trial failed; first error: {first}")
    best = outputs.write_best_config(rows, cfg, space, out / "best.yaml")
    outputs.write_csv(rows, space, metric, out / "results.csv")
    plots = outputs.plot_search(rows, space, cfg, metric, out / "plots")
    if show:
        outputs.print_table(rows, space, metric, out)
    return TuneOutcome(out, metric, rows, best, plots)
