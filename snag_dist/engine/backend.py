"""The backend protocol: what the training loop needs from Accelerate or DeepSpeed, nothing more."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from snag_dist.config import EngineConfig
from snag_dist.registry import Registry


class Backend(Protocol):
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def setup(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> tuple: ...

    def autocast(self) -> AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, optimizer, scheduler, max_norm: float) -> float: ...

    def unwrap(self, module: nn.Module) -> nn.Module: ...

    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def reduce_mean(self, value: float) -> float: ...

    def barrier(self) -> None: ...

    def close(self) -> None: ...


BACKENDS: Registry = Registry("backend")


def build_backend(cfg: EngineConfig, grad_accum: int = 1) -> Backend:
    # Importing registers the backends; deferred so `snag-dist prepare` never loads them.
    from snag_dist.engine import accelerate_backend  # noqa: F401

    try:
        from snag_dist.engine import deepspeed_backend  # noqa: F401
    except ImportError:  # pragma: no cover - deepspeed is a dependency, but keep accelerate usable
        pass
    return BACKENDS.get(cfg.backend)(cfg, grad_accum)
