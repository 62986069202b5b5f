"""The Ray Tune trial: one real training run of the engine, reporting every validation with a checkpoint.

A trial's config is the base config + the space's fixed values + the sampled params, with a checkpoint
saved at every validation (``train.checkpoint_every = train.eval_every``) so each report carries one.
The run folder lives in the trial's folder (``TRIAL/run``: metrics.jsonl, plots, summary.json).
A retried trial (FailureConfig) or a resumed search (Tuner.restore) copies the last reported checkpoint
back into ``TRIAL/run/checkpoints`` and continues with ``train(..., resume=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snag_dist.config import Config, replace
from snag_dist.config.load import build
from snag_dist.errors import ConfigError
from snag_dist.tune.space import apply

FAULT_MARKER = "fault_injected"  # in the trial folder: how many injected faults fired so far


@dataclass(frozen=True)
class Fault:
    """Testing hook: a trial raises after reporting epoch >= ``epoch``, ``times`` times in all (a retried
    attempt raises again at its first report until the count is reached); only trials whose name ends
    with ``trial`` (e.g. ``00000``, the first), every trial when empty. ``epoch`` 0 = off."""

    epoch: int = 0
    times: int = 1
    trial: str = ""

    def hits(self, trial_name: str, epochs: int, fired: int) -> bool:
        return bool(self.epoch) and trial_name.endswith(self.trial) and epochs >= self.epoch and fired < self.times

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``EPOCH[:TIMES[:TRIAL]]`` (the SNAG_TUNE_FAULT environment variable)."""
        parts = text.split(":") if text else ["0"]
        try:
            return cls(int(parts[0]), *([int(parts[1])] if len(parts) > 1 else []), *parts[2:3])
        except ValueError:
            raise ConfigError(f"fault spec '{text}' must be EPOCH[:TIMES[:TRIAL]] (integers, trial suffix)") from None


NO_FAULT = Fault()


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook (tests of retries from checkpoints)."""


def trial_config(base: dict[str, Any], fixed: dict[str, Any], params: dict[str, Any]) -> Config:
    cfg = apply(build(base), fixed, params)
    return replace(cfg, {"train": {"checkpoint_every": cfg.train.eval_every}})


def _epoch_of(folder: Path) -> int:
    return int(folder.name.split("_")[1])


def restore(checkpoint_dir: Path | None, run_dir: Path) -> int:
    """Put a reported checkpoint back into ``run_dir``; return the epochs it holds (0 = fresh start)."""
    if checkpoint_dir is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of an attempt that died before reporting
        return 0
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts, ignore_errors=True)
    shutil.copytree(checkpoint_dir, ckpts)
    epochs = max((_epoch_of(p) for p in ckpts.glob("epoch_*")), default=0)
    for name in ("metrics.jsonl", "train.jsonl"):  # drop what the failed attempt logged after the checkpoint
        _trim_jsonl(run_dir / name, epochs)
    return epochs


def _trim_jsonl(path: Path, epochs: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("epoch", 0) < epochs]
    path.write_text("".join(line + "\n" for line in keep))


class Reporter:
    """Engine callback: ``ray.tune.report`` every validation, with ``epoch_N`` (+ ``best``) as checkpoint."""

    def __init__(self, run_dir: Path, trial_dir: Path, resumed_from: int, fault: Fault = NO_FAULT) -> None:
        self.run_dir, self.trial_dir = run_dir, trial_dir
        self.resumed_from, self.fault = resumed_from, fault

    def __call__(self, info: dict[str, Any]) -> None:
        from ray import tune

        metrics = {k: v for k, v in info.items() if k != "checkpoint"}
        metrics.update(epochs=info["epoch"] + 1, resumed_from=self.resumed_from)
        if info.get("checkpoint") is None:
            tune.report(metrics)
        else:
            stage = Path(tempfile.mkdtemp(prefix=".report-", dir=self.trial_dir))
            try:
                self._stage(Path(info["checkpoint"]), stage)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(stage)))
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        self._maybe_fail(metrics["epochs"])

    def _stage(self, epoch_dir: Path, stage: Path) -> None:
        # Hard links: Ray copies the files into checkpoint_00000K; the engine replaces folders, never files.
        shutil.copytree(epoch_dir, stage / epoch_dir.name, copy_function=os.link)
        best = self.run_dir / "checkpoints" / "best"
        if (best / "model.safetensors").is_file():
            shutil.copytree(best, stage / "best", copy_function=os.link)

    def _maybe_fail(self, epochs: int) -> None:
        marker = self.trial_dir / FAULT_MARKER
        fired = int(marker.read_text().split()[0]) if marker.is_file() else 0
        if self.fault.hits(self.trial_dir.name, epochs, fired):
            marker.write_text(f"{fired + 1} {epochs}")
            raise InjectedFault(f"injected fault {fired + 1}/{self.fault.times} after epoch {epochs}")


def run_trial(params: dict[str, Any], base: dict[str, Any], fixed: dict[str, Any], exp_dir: str,
              fault: Fault = NO_FAULT) -> None:
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
    reporter = Reporter(run_dir, trial_dir, resumed_from, fault)
    train(cfg, run_dir, resume=resumed_from > 0, progress=False, callbacks=[reporter])
