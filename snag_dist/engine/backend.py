"""The backend protocol: what the training loop needs from Accelerate or DeepSpeed, nothing more."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
from torch import nn

from snag_dist.config import EngineConfig, TrainConfig
from snag_dist.engine.registry import BACKENDS


class Backend(Protocol):
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def setup(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> tuple: ...

    def autocast(self) -> AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, optimizer, scheduler, max_norm: float, boundary: bool = True) -> float:
        """Called after every micro-batch; updates weights when ``boundary`` (accumulation done)."""
        ...

    def full_params(self, module: nn.Module, modify: bool = False) -> AbstractContextManager:
        """Whole parameters inside (ZeRO-3 gathers them; ``modify``: changes made inside persist)."""
        ...

    def optimizer_shards(self, optimizer) -> dict[str, torch.Tensor]:
        """This rank's optimizer state when it is partitioned over ranks ({} when rank 0 holds all)."""
        ...

    def load_optimizer_shards(self, optimizer, path) -> None: ...

    def scaler_state(self, optimizer) -> dict:
        """fp16 loss-scaler state as JSON values ({} without fp16)."""
        ...

    def load_scaler_state(self, optimizer, state: dict) -> None: ...

    def unwrap(self, module: nn.Module) -> nn.Module: ...

    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def reduce_mean(self, value: float) -> float: ...

    def barrier(self) -> None: ...

    def close(self) -> None: ...


class ReplicatedState:
    """Mix-in for backends whose every rank holds whole parameters and optimizer state."""

    def full_params(self, module: nn.Module, modify: bool = False) -> AbstractContextManager:
        return nullcontext()

    def optimizer_shards(self, optimizer) -> dict[str, torch.Tensor]:
        return {}

    def load_optimizer_shards(self, optimizer, path) -> None:
        return None

    def scaler_state(self, optimizer) -> dict:
        return {}

    def load_scaler_state(self, optimizer, state: dict) -> None:
        return None


def build_backend(cfg: EngineConfig, train: TrainConfig | None = None) -> Backend:
    """The backend ``engine.backend`` names (``engine/registry.py``; its module is imported here only)."""
    return BACKENDS.get(cfg.backend)(cfg, train or TrainConfig())
