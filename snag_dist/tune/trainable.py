"""The Ray Tune trial: one real training run of the engine, reporting every validation with a checkpoint.

A trial's config is the base config + the space's fixed values + the sampled params, with a checkpoint
saved at every validation (``train.checkpoint_every = train.eval_every``) so each report carries one.
The run folder lives in the trial's folder (``TRIAL/run``: metrics.jsonl, plots, summary.json).
A retried trial (FailureConfig) or a resumed search (Tuner.restore) copies the last reported checkpoint
back into ``TRIAL/run/checkpoints`` and continues with ``train(..., resume=True)``.

With ``tune.workers_per_trial`` N > 1 the trial function only drives a Ray Train ``TorchTrainer``
(``run_trial_workers``): N workers (gloo on CPU, nccl on GPU) each call the same ``train``; Accelerate
joins the process group Ray Train set up (RANK/WORLD_SIZE/LOCAL_RANK), so the engine runs with world
size N. Every rank calls ``ray.train.report`` after each validation, rank 0 with the checkpoint; Ray
Train keeps them in ``TRIAL/train`` and ``TuneReportCallback`` forwards rank 0's metrics to Tune. A
retried trial starts a TorchTrainer with the same name and storage, which restores its latest checkpoint
(``ray.train.get_checkpoint``); rank 0 copies it back into ``TRIAL/run/checkpoints`` as above.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snag_dist.config import Config, replace
from snag_dist.config.load import build
from snag_dist.logging import LOGS, trim_jsonl
from snag_dist.tune.space import apply

OnReport = Callable[[Path, dict[str, Any]], None]
"""``on_report(trial_dir, metrics)``: called in a trial after each report (``Reporter``, ``runner.run_search``)."""


def trial_config(base: dict[str, Any], fixed: dict[str, Any], params: dict[str, Any]) -> Config:
    cfg = apply(build(base), fixed, params)
    return replace(cfg, {"train": {"checkpoint_every": cfg.train.eval_every}})


def _epoch_of(folder: Path) -> int:
    return int(folder.name.split("_")[1])


def restored_epochs(run_dir: Path) -> int:
    return max((_epoch_of(p) for p in (run_dir / "checkpoints").glob("epoch_*")), default=0)


def restore(checkpoint_dir: Path | None, run_dir: Path) -> int:
    """Put a reported checkpoint back into ``run_dir``; return the epochs it holds (0 = fresh start)."""
    if checkpoint_dir is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of an attempt that died before reporting
        return 0
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts, ignore_errors=True)
    shutil.copytree(checkpoint_dir, ckpts)
    epochs = restored_epochs(run_dir)
    for name in LOGS:  # drop what the failed attempt logged after the checkpoint
        trim_jsonl(run_dir / name, epochs)
    return epochs


class Reporter:
    """Engine callback: ``ray.tune.report`` every validation, with ``epoch_N`` (+ ``best``) as checkpoint;
    then ``on_report(trial_dir, metrics)`` if the search was given one (``runner.run_search``)."""

    stages = True  # this process sends the checkpoint (and calls on_report)

    def __init__(self, run_dir: Path, trial_dir: Path, resumed_from: int, on_report: OnReport | None = None) -> None:
        self.run_dir, self.trial_dir = run_dir, trial_dir
        self.resumed_from, self.on_report = resumed_from, on_report

    def metrics(self, info: dict[str, Any]) -> dict[str, Any]:
        metrics = {k: v for k, v in info.items() if k != "checkpoint"}
        metrics.update(epochs=info["epoch"] + 1, resumed_from=self.resumed_from)
        return metrics

    def __call__(self, info: dict[str, Any]) -> None:
        metrics = self.metrics(info)
        if info.get("checkpoint") is None or not self.stages:
            self.report(metrics, None)
        else:
            stage = Path(tempfile.mkdtemp(prefix=".report-", dir=self.trial_dir))
            try:
                self._stage(Path(info["checkpoint"]), stage)
                self.report(metrics, stage)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        if self.stages and self.on_report is not None:
            self.on_report(self.trial_dir, metrics)

    def report(self, metrics: dict[str, Any], stage: Path | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=None if stage is None else tune.Checkpoint.from_directory(str(stage)))

    def _stage(self, epoch_dir: Path, stage: Path) -> None:
        # Hard links: Ray copies the files into checkpoint_00000K; the engine replaces folders, never files.
        shutil.copytree(epoch_dir, stage / epoch_dir.name, copy_function=os.link)
        best = self.run_dir / "checkpoints" / "best"
        if (best / "model.safetensors").is_file():
            shutil.copytree(best, stage / "best", copy_function=os.link)


def run_trial(params: dict[str, Any], base: dict[str, Any], fixed: dict[str, Any], exp_dir: str,
              on_report: OnReport | None = None) -> None:
    """Ray Tune function trainable (bind the rest with ``tune.with_parameters``).

    The trial folder is named from the experiment folder and the trial name (the runner makes the
    folder name the trial name): ``get_trial_dir()`` points at a scratch folder when Ray reuses the
    process of a finished trial, so it is not used.
    """
    from ray import tune

    from snag_dist.engine.run import train

    trial_dir = Path(exp_dir) / tune.get_context().get_trial_name()
    run_dir = trial_dir / "run"
    cfg = trial_config(base, fixed, params)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        resumed_from = restore(None, run_dir)
    else:
        with checkpoint.as_directory() as src:
            resumed_from = restore(Path(src), run_dir)
    reporter = Reporter(run_dir, trial_dir, resumed_from, on_report)
    train(cfg, run_dir, resume=resumed_from > 0, progress=False, callbacks=[reporter])


TRAIN_RUN = "train"  # Ray Train's run folder (its checkpoints and state) in the trial folder


class WorkerReporter(Reporter):
    """In a Ray Train worker: every rank calls ``ray.train.report`` (a barrier across workers); rank 0
    passes the checkpoint and calls on_report. ``world_size`` is the process group the engine used."""

    def __init__(self, run_dir: Path, trial_dir: Path, resumed_from: int, on_report: OnReport | None, rank: int,
                 world_size: int) -> None:
        super().__init__(run_dir, trial_dir, resumed_from, on_report)
        self.stages, self.world_size = rank == 0, world_size

    def metrics(self, info: dict[str, Any]) -> dict[str, Any]:
        return {**super().metrics(info), "world_size": self.world_size}

    def report(self, metrics: dict[str, Any], stage: Path | None) -> None:
        import ray.train

        checkpoint = None if stage is None else ray.train.Checkpoint.from_directory(str(stage))
        ray.train.report(metrics, checkpoint=checkpoint)


def train_worker(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer: restore (rank 0), then the engine's ``train``."""
    import ray.train
    import torch.distributed as dist

    from snag_dist.engine.run import train

    trial_dir = Path(loop_config["trial_dir"])
    run_dir = trial_dir / "run"
    cfg = trial_config(loop_config["base"], loop_config["fixed"], loop_config["params"])
    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    if rank == 0:  # the run folder is shared (one machine, or a filesystem every node sees)
        if checkpoint is None:
            restore(None, run_dir)
        else:
            with checkpoint.as_directory() as src:
                restore(Path(src), run_dir)
    dist.barrier()
    resumed_from = restored_epochs(run_dir) if checkpoint is not None else 0
    reporter = WorkerReporter(run_dir, trial_dir, resumed_from, loop_config["on_report"], rank,
                              dist.get_world_size())
    train(cfg, run_dir, resume=resumed_from > 0, progress=False, callbacks=[reporter])


def run_trial_workers(params: dict[str, Any], base: dict[str, Any], fixed: dict[str, Any], exp_dir: str,
                      on_report: OnReport | None = None, workers: int = 2, cpus: float = 1.0,
                      gpus: float = 0.0) -> None:
    """Ray Tune function trainable of a multi-worker trial: it drives a ``TorchTrainer`` of ``workers``
    processes (``cpus``/``gpus`` each; gloo on CPU, nccl on GPU) and needs no resources itself.

    Ray Train's run is ``TRIAL/train`` (name and storage fixed per trial): a retried trial or a resumed
    search starts it again and Ray Train hands the workers its latest checkpoint. Worker failures are
    not retried by Ray Train: the trial fails and Tune's FailureConfig retries it (one retry count).
    """
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_dir = Path(exp_dir) / tune.get_context().get_trial_name()
    per_worker = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"params": params, "base": base, "fixed": fixed, "trial_dir": str(trial_dir),
                           "on_report": on_report},
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=TRAIN_RUN, storage_path=str(trial_dir), callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
