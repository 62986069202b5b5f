"""What the engine needs from a task (alignment, completion): its losses and its evaluation.

The training loop is task-agnostic: it calls `losses(batch, out)` and backpropagates ["loss"],
logs the other (detached, scalar) entries, and calls `evaluate` on a named split to get `Metrics`.
A task never talks to other processes; the engine does (and reduces what must be reduced).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from snag_dist.config import Config, DataConfig, ModelConfig, NoiseConfig

Metrics = dict[str, float]
"""Evaluation results by stable name, e.g. {"hits@1": .., "hits@10": .., "mrr": ..}; higher is better
unless the name says otherwise ("mean_rank"). Plain floats so they go straight to JSON and loggers."""

LossDict = dict[str, Tensor]
"""{"loss": scalar to backpropagate, <name>: detached scalar for logging, ...}."""

LOSS_KEY = "loss"


@runtime_checkable
class Task(Protocol):
    """A training objective plus its evaluation protocol."""

    def losses(self, batch: Any, out: Any) -> LossDict:
        """Loss terms of one batch given the model output `out`; must contain LOSS_KEY."""
        ...

    def evaluate(self, module: Any, split: str) -> Metrics:
        """Metrics of the model (eval mode, clean features) on split "valid" or "test"."""
        ...


def check_losses(losses: LossDict) -> LossDict:
    """The contract of `Task.losses`: a scalar "loss" and detached scalar logs."""
    if LOSS_KEY not in losses:
        raise KeyError(f"task losses need a '{LOSS_KEY}' entry, got {sorted(losses)}")
    for name, value in losses.items():
        if value.dim() != 0:
            raise ValueError(f"loss entry '{name}' must be a scalar, got shape {tuple(value.shape)}")
        if name != LOSS_KEY and value.requires_grad:
            raise ValueError(f"loss entry '{name}' is for logging and must be detached")
    return losses


# -- what a task is given besides its own config section --------------------------------------
@dataclass(frozen=True)
class TrainFields:
    """The ``train.*`` settings a task reads."""

    batch_size: int  # global batch: pairs or triples per step over all processes
    seed: int  # every draw of the task (batch order, negatives, sampling, dropout and GMNM keys)
    epochs: int  # of the whole run (completion sizes its kernel choice by the run's steps)
    steps_per_epoch: int  # cap on the batches of an epoch (0 = the whole split)
    table_lr: float  # the row-sharded structure table's lr (stream path): train.lr x train.embedding_lr_scale


@dataclass(frozen=True)
class EvalFields:
    """The ``eval.*`` settings a task reads (``eval.split`` and ``eval.test_at_end`` are the engine's)."""

    chunk_size: int
    protocol: str  # alignment: auto | exact | topk
    exact_max_links: int
    topk: int
    index: str
    ivf_lists: int
    ivf_probe: int
    max_queries: int  # completion
    completion_candidates: int
    spill_mib: int


@dataclass(frozen=True)
class TaskContext:
    """Everything a task takes from outside its own section (``task.alignment`` / ``task.completion``);
    the engine builds it from the whole config with ``from_config``."""

    data: DataConfig
    model: ModelConfig
    noise: NoiseConfig | None  # None: no GMNM (decided in ``from_config`` only)
    train: TrainFields
    eval: EvalFields
    precision: str  # engine.precision: the stream path refuses fp16 (its sparse table gradients are not unscaled)

    @classmethod
    def from_config(cls, cfg: Config) -> TaskContext:
        """The context of a run of ``cfg``. The one place that switches GMNM on: ``noise`` is
        ``cfg.noise`` when ``noise.enabled``, else None (the model is then built without a noise module)."""
        t = cfg.train
        train = TrainFields(batch_size=t.batch_size, seed=t.seed, epochs=t.epochs, steps_per_epoch=t.steps_per_epoch,
                            table_lr=t.lr * t.embedding_lr_scale)
        evaluation = EvalFields(**{f.name: getattr(cfg.eval, f.name) for f in fields(EvalFields)})
        return cls(cfg.data, cfg.model, cfg.noise if cfg.noise.enabled else None, train, evaluation,
                   cfg.engine.precision)


class FromConfig:
    """``Task.from_config(cfg, ...)`` for callers holding a whole config: the task's own section of
    ``cfg.task`` (named by ``section``) and ``TaskContext.from_config(cfg)``."""

    section: str  # the task's sub-section of cfg.task ("alignment", "completion")

    @classmethod
    def from_config(cls, cfg: Config, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                    comm: Comm | None = None):
        return cls(getattr(cfg.task, cls.section), TaskContext.from_config(cfg), rank, world_size, device, comm=comm)


# -- the training protocol a task implements (the engine's loop drives it) -------------------------
@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    lr_scale: float = 1.0
    reload_best: bool = False  # start from the best weights of the previous phase


class Comm(Protocol):
    """What a task may ask of the other processes. The engine injects the implementation
    (``engine.dist.Collectives``, torch.distributed); ``LocalComm`` is the one-process identity."""

    rank: int
    world_size: int

    @property
    def active(self) -> bool: ...

    def sizes(self, n: int, device: torch.device) -> list[int]: ...

    def gather_rows(self, x: Tensor, sizes: list[int] | None = None) -> Tensor: ...

    def reduce_sum(self, x: Tensor) -> Tensor: ...

    def all_to_all(self, x: Tensor, send_counts: list[int]) -> tuple[Tensor, list[int]]:
        """Rows ``x`` cut by ``send_counts`` (one count per rank, in rank order) go to those ranks;
        returns the rows received (rank order) and their counts."""
        ...


class LocalComm:
    """One process: every collective is the identity."""

    rank, world_size = 0, 1
    active = False

    def sizes(self, n: int, device: torch.device) -> list[int]:
        return [n]

    def gather_rows(self, x: Tensor, sizes: list[int] | None = None) -> Tensor:
        return x

    def reduce_sum(self, x: Tensor) -> Tensor:
        return x

    def all_to_all(self, x: Tensor, send_counts: list[int]) -> tuple[Tensor, list[int]]:
        return x, list(send_counts)


class TrainTask(Protocol):
    """A task as the training loop sees it: a module whose ``forward(batch)`` returns a LossDict,
    batches per epoch, an evaluation and its training phases. ``attach(comm)`` is the one injection
    point for collectives; ``table`` is the task's row-sharded entity table (None on the full path)."""

    module: nn.Module
    metric: str  # validation metric to maximise

    def attach(self, comm: Comm) -> None: ...

    def phases(self, epochs: int) -> list[Phase]: ...

    def steps_per_epoch(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterable[Any]:
        """The epoch's batches from batch ``start`` on (a mid-epoch resume)."""
        ...

    def on_epoch_start(self, epoch: int, module: nn.Module, phase: Phase) -> None: ...

    def evaluate(self, module: nn.Module, split: str) -> dict[str, float]: ...

    def epoch_stats(self, module: nn.Module) -> dict[str, Any]: ...
