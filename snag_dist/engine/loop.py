"""The training loop: one loop for every task and backend (it never branches on either).

A task is a ``TrainTask``: a module whose ``forward(batch)`` returns a dict of losses, batches per
epoch, an evaluation, and its training phases (e.g. alignment's iterative phase, which restarts
from the best weights at a lower lr). Model selection uses the validation split only; the test
split is evaluated once per phase, on the best weights.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from snag_dist.config import EvalConfig, TrainConfig
from snag_dist.engine.backend import Backend
from snag_dist.engine.checkpoint import (
    latest,
    load_checkpoint,
    load_rank_files,
    load_rng,
    load_task_state,
    save_checkpoint,
)
from snag_dist.engine.optim import build_optimizer, schedule_position, warmup_cosine
from snag_dist.errors import TrainingError
from snag_dist.logging import MetricsLogger
from snag_dist.tasks.base import Phase, TrainTask  # noqa: F401  (the task protocol lives with the tasks)


@dataclass
class FitState:
    epoch: int = 0  # next epoch to run (global over phases)
    phase: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    bad_evals: int = 0
    results: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> test metrics
    step: int = 0  # batches of `epoch` already trained (a mid-epoch checkpoint resumes after them)
    global_step: int = 0  # optimizer steps over the whole run (train.max_steps)
    sums: dict[str, float] = field(default_factory=dict)  # loss sums over those batches
    schedule_steps: int = 0  # length of the phase's lr schedule in optimizer steps at its start
    schedule_segment: tuple[float, float, float] = (0, 0.0, 1.0)  # see optim.warmup_cosine


class Trainer:
    def __init__(self, task: TrainTask, backend: Backend, train: TrainConfig, eval_cfg: EvalConfig,
                 run_dir: Path, logger: MetricsLogger, progress: bool = True,
                 callbacks: Sequence[Callable[[dict[str, Any]], None]] = ()) -> None:
        self.task, self.backend, self.cfg, self.eval_cfg = task, backend, train, eval_cfg
        self.callbacks = tuple(callbacks)  # called on every rank after each validation (e.g. Ray Tune)
        self.run_dir, self.logger, self.progress = run_dir, logger, progress and backend.is_main
        self.ckpt = run_dir / "checkpoints"
        self.state = FitState()
        self.phases = task.phases(train.epochs)
        self.table = getattr(task, "table", None)  # row-sharded entity table: stepped and saved per rank
        self._phase_lr_scale = 1.0

    # -- set-up per phase -------------------------------------------------------------------
    def _setup_phase(self, phase: Phase, first_epoch: int, end_epoch: int) -> None:
        module = self.backend.unwrap(self.module) if hasattr(self, "module") else self.task.module
        optimizer = build_optimizer(module, self.cfg.lr * phase.lr_scale, self.cfg.weight_decay,
                                    self.cfg.embedding_lr_scale, self.cfg.lr_scales)
        self._phase_lr_scale = phase.lr_scale
        total = max(1, (end_epoch - first_epoch) * self.task.steps_per_epoch() // self.cfg.grad_accum)
        if self.cfg.max_steps:
            total = max(1, min(total, self.cfg.max_steps // self.cfg.grad_accum))
        self.state.schedule_steps, self.state.schedule_segment = total, (0, 0.0, 1.0)
        self._raw_optimizer = optimizer
        scheduler = self._schedule(optimizer, total, self.state.schedule_segment)
        self.module, self.optimizer, self.scheduler = self.backend.setup(module, optimizer, scheduler)

    def _schedule(self, optimizer: torch.optim.Optimizer, total: int, segment: tuple) -> torch.optim.lr_scheduler.LambdaLR:
        return warmup_cosine(optimizer, total, self.cfg.warmup_ratio, segment, self.cfg.lr_schedule)

    def _resize_schedule(self, epochs_left: int) -> None:
        """Keep the lr schedule ending with the phase when an epoch's step count changed (pseudo links)."""
        done = self.scheduler.last_epoch
        total, segment = self.state.schedule_steps, self.state.schedule_segment
        position = schedule_position(total, segment, done)
        left = epochs_left * (self.task.steps_per_epoch() // self.cfg.grad_accum)
        rate = (total - position) / max(1, left)
        if abs(rate - segment[2]) > 1e-9:
            self.state.schedule_segment = (done, position, rate)
            self.scheduler = self._schedule(self._raw_optimizer, total, self.state.schedule_segment)

    def _phase_bounds(self, index: int) -> tuple[int, int]:
        start = sum(p.epochs for p in self.phases[:index])
        return start, start + self.phases[index].epochs

    # -- checkpoints ------------------------------------------------------------------------
    def _save(self, tag: str, with_optim: bool = True) -> Path:
        # Every rank's torch RNG (dropout) so a resumed run draws what the uninterrupted one did.
        rng_all = self.backend.gather(torch.get_rng_state().to(self.backend.device)[None]).cpu()
        with self.backend.full_params(self.module):
            model_state = self.backend.unwrap(self.module).state_dict() if self.backend.is_main else {}
        # Optimizer state the backend may hold per rank (ZeRO partitions); {} = rank 0's is complete.
        shards = self.backend.optimizer_shards(self.optimizer) if with_optim else {}
        # Loss sums of a part-trained epoch differ per rank (each logs its share): keep their mean,
        # which is what the epoch's record (a mean over ranks) needs from every rank on resume.
        fit = {**self.state.__dict__, "sums": {k: self.backend.reduce_mean(v) for k, v in self.state.sums.items()}}
        # ... and every rank's own sums, so a resume on as many ranks continues them bit for bit.
        fit["rank_sums"] = {k: self.backend.gather(torch.tensor([v], dtype=torch.float64, device=self.backend.device)
                                                   ).cpu().tolist() for k, v in self.state.sums.items()}
        state = {"fit": fit, "scheduler": self.scheduler.state_dict(),
                 "scaler": self.backend.scaler_state(self.optimizer)}
        optim = self.optimizer.state_dict() if with_optim and not shards else None
        rng = {f"torch_cpu.rank{r}": rng_all[r] for r in range(rng_all.shape[0])}
        task_state = self.task.state_dict() if hasattr(self.task, "state_dict") else None
        rank_files = {"table": self.table.state_chunks(with_optim)} if self.table is not None else {}
        return save_checkpoint(self.ckpt, model_state, optim, state,
                               keep_last=self.cfg.keep_last if tag.startswith("epoch_") else 0, tag=tag, rng=rng,
                               task_state=task_state, rank_shards=shards, rank=self.backend.rank,
                               is_main=self.backend.is_main, barrier=self.backend.barrier, rank_files=rank_files)

    def resume(self) -> bool:
        path = latest(self.ckpt)
        if path is None:
            return False
        model, optim, state = load_checkpoint(path)
        rank_sums = state["fit"].pop("rank_sums", None) or {}
        self.state = FitState(**state["fit"])
        if rank_sums and all(len(v) == self.backend.world_size for v in rank_sums.values()):
            self.state.sums = {k: v[self.backend.rank] for k, v in rank_sums.items()}
        if self.state.phase >= len(self.phases):
            if self.state.epoch >= self._phase_bounds(len(self.phases) - 1)[1]:
                return True  # the run had finished: nothing left to train
            # A finished run extended by a raised train.epochs (engine/run.py checked that its checkpoint
            # holds the last epoch's weights and that its lr does not depend on the run's length).
            self.state.phase = len(self.phases) - 1
        self.logger.rewind(self.state.epoch)
        start, end = self._phase_bounds(self.state.phase)
        self.task.module.load_state_dict(model)
        if self.table is not None:
            self.table.load_shards(load_rank_files(path, "table"))
        if hasattr(self.task, "load_state_dict"):
            self.task.load_state_dict(load_task_state(path))
        self._setup_phase(self.phases[self.state.phase], start, end)
        if optim is not None:
            self.optimizer.load_state_dict(optim)
        self.backend.load_optimizer_shards(self.optimizer, path)
        self.backend.load_scaler_state(self.optimizer, state.get("scaler", {}))
        fit = state["fit"]
        if "schedule_steps" in fit:  # the schedule as it was (re-segmented for pseudo links, maybe)
            self.state.schedule_steps, self.state.schedule_segment = fit["schedule_steps"], tuple(fit["schedule_segment"])
            self.scheduler = self._schedule(self._raw_optimizer, self.state.schedule_steps, self.state.schedule_segment)
        self.scheduler.load_state_dict(state["scheduler"])
        # The lr the schedule had reached (a backend's partitioned optimizer state carries no groups).
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        rng = load_rng(path).get(f"torch_cpu.rank{self.backend.rank}")
        if rng is not None:
            torch.set_rng_state(rng)
        return True

    def _load_best(self) -> None:
        best = self.ckpt / "best"
        self.backend.barrier()
        if (best / "model.safetensors").is_file():
            model, _, _ = load_checkpoint(best)
            with self.backend.full_params(self.module, modify=True):
                self.backend.unwrap(self.module).load_state_dict(model)
            if self.table is not None:
                self.table.load_shards(load_rank_files(best, "table"))

    # -- epochs -----------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch from batch ``state.step`` (0, or where a mid-epoch checkpoint stopped)."""
        self.module.train()
        sums = self.state.sums
        t0 = time.perf_counter()
        total = self.task.steps_per_epoch()
        every = self.cfg.checkpoint_every_steps * self.cfg.grad_accum
        batches = iter(self.task.batches(epoch, self.state.step))
        rows, t_rows = 0, time.perf_counter()
        bar = self._step_bar(epoch, total)
        step_times, wait = [], 0.0
        step = self.state.step
        while not self._out_of_steps():
            t_step = time.perf_counter()
            batch = next(batches, None)  # the time spent here is the data wait
            if batch is None:
                break
            wait += time.perf_counter() - t_step
            with self.backend.autocast():
                losses = self.module(batch)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss {loss.item()} at epoch {epoch} step {step}; "
                                    "lower train.lr or check the input features")
            self.backend.backward(loss / self.cfg.grad_accum)
            boundary = (step + 1) % self.cfg.grad_accum == 0
            if boundary and self.table is not None:  # the schedule's lr before the scheduler moves on
                self.table.step(self.scheduler.lr_lambdas[0](self.scheduler.last_epoch) * self._phase_lr_scale)
            self.backend.step(self.optimizer, self.scheduler, self.cfg.grad_clip, boundary)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            self.state.step = step + 1
            if boundary:
                self.state.global_step += 1
            rows += batch_rows(batch)
            step_times.append(time.perf_counter() - t_step)
            if _FIRST_STEP[0] is None:
                _FIRST_STEP[0] = time.time()
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step + 1 == total:
                    bar.set_postfix(loss=f"{float(loss):.4f}", rows_s=f"{rows / (time.perf_counter() - t_rows):.0f}")
            if every and boundary and self.state.step % every == 0 and self.state.step < total:
                self._save(f"epoch_{epoch}_step_{self.state.step}")
        if bar is not None:
            bar.close()
        steps = max(self.state.step, 1)
        record = {f"loss/{k}" if k != "loss" else "loss": self.backend.reduce_mean(v / steps)
                  for k, v in sums.items()}
        self.state.step, self.state.sums = 0, {}
        record["seconds"] = time.perf_counter() - t0
        record["steps"] = steps
        if step_times:  # medians skip the first steps (compilation, cold page cache)
            warm = step_times[min(3, len(step_times) - 1):]
            record["step_seconds"] = statistics.median(warm)
            record["data_wait_share"] = wait / max(1e-9, sum(step_times))
        if _FIRST_STEP[0] is not None and not _FIRST_STEP[1]:
            _FIRST_STEP[1] = True  # once per process: seconds from process start to the first step's end
            record["time_to_first_step"] = _FIRST_STEP[0] - _process_start()
        record["rows_per_s"] = self.backend.reduce_mean(rows / max(1e-9, time.perf_counter() - t_rows)
                                                        ) * self.backend.world_size
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        return record

    def _out_of_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.state.global_step >= self.cfg.max_steps

    def _step_bar(self, epoch: int, total: int):
        """Per-step progress (rank 0) for epochs long enough to wait on: steps and rows/s."""
        if not self.progress or total < 50:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.state.step, desc=f"epoch {epoch}", unit="step", leave=False)

    def _validate(self, epoch: int, phase: Phase) -> bool:
        """Evaluate on validation; save best; return True when early stopping triggers."""
        with self.backend.full_params(self.module):
            metrics = self.task.evaluate(self.backend.unwrap(self.module), self.eval_cfg.split)
        self._last_eval = {"epoch": epoch, "phase": phase.name, **metrics}
        value = metrics[self.task.metric]
        self.logger.eval({"epoch": epoch, "split": self.eval_cfg.split, "phase": phase.name, **metrics})
        if value > self.state.best:
            self.state.best, self.state.best_epoch, self.state.bad_evals = value, epoch, 0
            self._save("best", with_optim=False)
        else:
            self.state.bad_evals += 1
        self.backend.barrier()
        return self.cfg.patience > 0 and self.state.bad_evals >= self.cfg.patience

    def _end_phase(self, phase: Phase, end: int) -> None:
        self._load_best()
        if self.eval_cfg.test_at_end:
            with self.backend.full_params(self.module):
                metrics = self.task.evaluate(self.backend.unwrap(self.module), "test")
            self.state.results[phase.name] = {**metrics, "best_epoch": self.state.best_epoch}
            self.logger.eval({"epoch": end - 1, "split": "test", "phase": phase.name,
                              "best_epoch": self.state.best_epoch, **metrics})

    def fit(self, resume: bool = False) -> FitState:
        resumed = resume and self.resume()
        if self.state.phase >= len(self.phases):
            return self.state
        if not resumed:
            self._setup_phase(self.phases[0], *self._phase_bounds(0))
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.epochs, initial=self.state.epoch, desc="train", unit="ep",
                   disable=not self.progress)
        while self.state.phase < len(self.phases):
            phase = self.phases[self.state.phase]
            start, end = self._phase_bounds(self.state.phase)
            if self.state.epoch == start and start > 0 and not resumed:
                if phase.reload_best:
                    self._load_best()
                self._setup_phase(phase, start, end)
                self.state.best, self.state.best_epoch = -math.inf, -1
            resumed = False
            stop = False
            while self.state.epoch < end and not stop and not self._out_of_steps():
                epoch = self.state.epoch
                if self.state.step == 0:  # mid-epoch resumes restored what the epoch start set up
                    with self.backend.full_params(self.module):
                        self.task.on_epoch_start(epoch, self.backend.unwrap(self.module), phase)
                    self._resize_schedule(end - epoch)
                record = self._train_epoch(epoch)
                record.update(self.task.epoch_stats(self.backend.unwrap(self.module)))
                self.logger.train({"epoch": epoch, "phase": phase.name, **record})
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", s_per_ep=f"{record['seconds']:.2f}",
                                best=f"{self.state.best:.4f}")
                self._last_eval = None
                evaluate = self.cfg.eval_every > 0 and (
                    (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == end or self._out_of_steps())
                if evaluate:
                    stop = self._validate(epoch, phase)
                self.state.epoch += 1
                saved = None
                if self.cfg.checkpoint_every and self.state.epoch % self.cfg.checkpoint_every == 0:
                    saved = self._save(f"epoch_{self.state.epoch}")
                if self._last_eval is not None:
                    for callback in self.callbacks:
                        callback({**self._last_eval, "checkpoint": saved})
            self._end_phase(phase, end)
            self.state.phase += 1
            if self._out_of_steps():  # train.max_steps reached: no later phase starts
                self.state.phase = len(self.phases)
            self.state.epoch = max(self.state.epoch, end)
            self.state.bad_evals = 0
        bar.close()
        self._save(f"epoch_{self.state.epoch}")
        return self.state


_FIRST_STEP: list = [None, False]  # wall time the process's first training step ended; reported yet


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def batch_rows(batch: Any) -> int:
    """Training rows (triples, pairs) in a batch, for the rows/s the progress shows."""
    rows = getattr(batch, "triples", batch)
    return int(rows.shape[0]) if hasattr(rows, "shape") else 0
