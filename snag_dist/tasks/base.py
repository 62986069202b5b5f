"""What the engine needs from a task (alignment, completion): its losses and its evaluation.

The training loop is task-agnostic: it calls `losses(batch, out)` and backpropagates ["loss"],
logs the other (detached, scalar) entries, and calls `evaluate` on a named split to get `Metrics`.
A task never talks to other processes; the engine does (and reduces what must be reduced).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

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
