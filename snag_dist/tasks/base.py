"""What the engine needs from a task (alignment, completion): its losses and its evaluation.

The training loop is task-agnostic: it calls `losses(batch, out)` and backpropagates ["loss"],
logs the other (detached, scalar) entries, and calls `evaluate` on a named split to get `Metrics`.
A task never talks to other processes; the engine does (and reduces what must be reduced).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

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
