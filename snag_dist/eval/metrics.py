"""Rank statistics and the result types every ranking protocol shares: Hits@k, MRR, mean rank.

Tie rule (``Ties``): rank = 1 + number of candidates whose score is strictly greater than the gold's
("optimistic"). "pessimistic" also counts equal scores, "realistic" is the mean of the two (what the
completion literature reports).

`rank_stats` reduces ranks to sums (count, sum of ranks, sum of reciprocal ranks, hits@k counts) that
add across processes; `RankMetrics` turns them into shares and means. Used by exact CSLS
(`csls.py`), the faiss top-k protocol (`topk.py`) and filtered completion ranking (`filtered.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Ties = Literal["optimistic", "realistic", "pessimistic"]
DEFAULT_HITS: tuple[int, ...] = (1, 10)


@dataclass(frozen=True)
class RankMetrics:
    """Ranking quality of one direction: hits[k] = share of queries with rank <= k."""

    hits: dict[int, float]
    mrr: float
    mean_rank: float
    count: int

    @classmethod
    def from_ranks(cls, ranks_n: Tensor, hits_at: Sequence[int] = DEFAULT_HITS) -> RankMetrics:
        return cls.from_stats(rank_stats(ranks_n, hits_at), hits_at)

    @classmethod
    def from_stats(cls, stats: Tensor, hits_at: Sequence[int] = DEFAULT_HITS) -> RankMetrics:
        """From `rank_stats` output, possibly summed over processes."""
        count = int(stats[0].item())
        denom = max(count, 1)
        hits = {k: float(stats[3 + i].item()) / denom for i, k in enumerate(hits_at)}
        return cls(hits, float(stats[2].item()) / denom, float(stats[1].item()) / denom, count)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}hits@{k}": v for k, v in self.hits.items()}
        out[f"{prefix}mrr"] = self.mrr
        out[f"{prefix}mean_rank"] = self.mean_rank
        return out


@dataclass(frozen=True)
class AlignmentRanks:
    """Gold ranks of the (sharded) test links in both directions."""

    l2r: Tensor  # (L',) rank of the right entity for each left query
    r2l: Tensor  # (L',) rank of the left entity for each right query


def rank_stats(ranks_n: Tensor, hits_at: Sequence[int] = DEFAULT_HITS) -> Tensor:
    """[count, sum rank, sum 1/rank, hits@k counts...] in float64; sums add across shards."""
    r = ranks_n.double()
    hits = [(r <= k).sum().double() for k in hits_at]
    head = [r.new_tensor(float(r.numel())), r.sum(), r.reciprocal().sum()]
    return torch.stack(head + hits)
