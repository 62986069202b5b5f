"""Which queries a process ranks, and the collectives evaluation asks of the engine.

Across processes, rank r of W takes the r-th of W contiguous blocks of the queries (`QueryShard`,
`shard_bounds`), ranks them and the rank sums add up (`metrics.rank_stats`). The cross-process
gathers and sums come in as ``comm``, a `Collective` the engine injects (``tasks.base.Comm`` is one);
nothing in eval/ imports a distributed API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


class Collective(Protocol):
    """Cross-process row gathers and sums (``tasks.base.Comm`` is one; the engine injects it)."""

    rank: int
    world_size: int

    def gather_rows(self, x: Tensor, sizes: list[int] | None = None) -> Tensor: ...

    def reduce_sum(self, x: Tensor) -> Tensor: ...


def many_ranks(comm: Collective | None) -> bool:
    """Whether ``comm`` spans more than one process."""
    return comm is not None and comm.world_size > 1


@dataclass(frozen=True)
class QueryShard:
    """This process ranks the `index`-th of `count` contiguous blocks of the queries."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"bad shard {self.index}/{self.count}")

    def bounds(self, n: int) -> tuple[int, int]:
        per = -(-n // self.count)
        return min(n, self.index * per), min(n, (self.index + 1) * per)


def shard_bounds(n: int, comm: Collective | None) -> tuple[int, int]:
    """This process's contiguous block of n rows (all of them without ``comm``)."""
    return QueryShard(comm.rank, comm.world_size).bounds(n) if many_ranks(comm) else (0, n)
