"""AdamW with the reference's no-decay groups, and linear warm-up + cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

NO_DECAY_MARKERS = ("bias", "global_weights", "log_var", "norm", "LayerNorm")


def build_optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if any(m in name for m in NO_DECAY_MARKERS) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=1e-8)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                  segment: tuple[int, float, float] = (0, 0.0, 1.0)) -> LambdaLR:
    """Linear warm-up then cosine decay to 0 over ``total_steps`` (schedule steps).

    ``segment = (done, position, rate)``: optimizer step ``done`` sits at schedule position
    ``position`` and later steps advance ``rate`` positions each. When a phase's steps per epoch
    change (iterative learning adds pseudo links) the loop re-segments so the lr continues from where
    it is and still reaches 0 at the phase's end.
    """
    warmup = int(total_steps * warmup_ratio)
    done, position, rate = segment

    def factor(step: int) -> float:
        pos = position + (step - done) * rate
        if pos < warmup:
            return (pos + 1) / max(1, warmup)
        progress = (pos - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor, last_epoch=done - 1 if done else -1)


def schedule_position(total_steps: int, segment: tuple[int, float, float], step: int) -> float:
    done, position, rate = segment
    return min(float(total_steps), position + (step - done) * rate)
