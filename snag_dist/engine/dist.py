"""Rank information and seeded generators (every random choice is seeded from seed, epoch, rank)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> RankInfo:
        """torchrun / SLURM+torchrun / accelerate launch / deepspeed all export these."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))


def generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *parts), e.g. (seed, epoch, rank)."""
    g = torch.Generator()
    g.manual_seed(hash((seed, *parts)) & 0x7FFFFFFFFFFFFFFF)
    return g
