"""Filtered link-prediction ranking (head and tail prediction): MRR, Hits@k, mean rank.

Protocol (Bordes et al. 2013, "filtered"): for an evaluated triple (h, r, t), tail prediction ranks t
among all N entities as answers to (h, r, ?) after removing every other entity e for which (h, r, e)
is a known true triple (train, valid or test: whatever `KnownTriples` was built from); head
prediction ranks h among the answers to (?, r, t) likewise. Metrics average over both directions
(2Q ranks) and are also reported per direction ("head/mrr", "tail/hits@10", ...).

Ties, with g = #unfiltered candidates scoring strictly above the target and q = #unfiltered others
scoring exactly the target's score:
    optimistic = 1 + g,   pessimistic = 1 + g + q,
    realistic  = (optimistic + pessimistic) / 2 = 1 + g + q / 2
i.e. rank = #greater + (#equal including the target - 1) / 2 + 1 (the default, as in PyKEEN), so a
constant scorer ranks (N + 1) / 2, not 1. The target's score is read from the same score block as
the others, so rounding can never make it beat or lose to itself. NaN scores never count.

Memory: queries go `chunk` at a time; a chunk holds one (chunk, N) float32 score block, its
(chunk, N) bool comparison and the filter's (row, col) pairs for that chunk (plus whatever the score
function needs). The filter is a CSR index: per direction, the sorted unique (anchor, relation) keys
and, per key, its sorted answers; a chunk's known answers come from `searchsorted` and
`repeat_interleave`, never from a Python loop over queries or entities.

Nothing here talks to other processes: `shard=QueryShard(i, n)` ranks only the i-th contiguous
block of each direction's queries, and `filtered_rank_stats` returns sums (count, sum of ranks, sum
of reciprocal ranks, hits counts) that add across processes; `metrics_from_stats` turns the
(reduced) sums into metrics. Legend: Q evaluated triples, c queries in a chunk, N entities, R
relations, S distinct (anchor, relation) keys, T known triples.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from snag_dist.eval.metrics import RankMetrics, Ties, rank_stats
from snag_dist.eval.shards import QueryShard

_EXACT_FLOAT_SUM = 2**24  # float32 sums of +-1 / 0 stay exact over fewer columns than this

COMPLETION_HITS: tuple[int, ...] = (1, 3, 10)
DIRECTIONS: tuple[str, ...] = ("head", "tail")

ScoreFn = Callable[[Tensor, Tensor, bool], Tensor]
"""score_fn(anchor_c, relation_c, predict_head) -> (c, N) scores of every entity as the missing one.
The anchor is the known entity: the head for tail prediction, the tail for head prediction. Higher
is better."""


@dataclass(frozen=True)
class _Index:
    """One direction of the filter: answers of each (anchor, relation) key, CSR-style."""

    keys_S: Tensor  # sorted unique anchor * R + relation
    ptr_S1: Tensor  # answers of key s are flat_T[ptr[s]:ptr[s + 1]]
    flat_T: Tensor  # sorted s * N + answer


class KnownTriples:
    """All known true triples (T, 3) of (head, relation, tail), indexed for both directions.

    Keys stay in int64 for any realistic graph: s * N + answer < T * N (1e9 triples x 1e8 entities
    is 1e17 < 9.2e18).
    """

    def __init__(self, triples_T3: Tensor, num_entities: int, num_relations: int) -> None:
        triples = triples_T3.to(torch.long).cpu()
        if triples.numel() and (triples[:, [0, 2]].min() < 0 or triples[:, [0, 2]].max() >= num_entities
                                or triples[:, 1].min() < 0 or triples[:, 1].max() >= num_relations):
            raise ValueError(f"known triples have ids outside {num_entities} entities / {num_relations} relations")
        self.num_entities, self.num_relations = num_entities, num_relations
        self.num_triples = len(triples)
        self._tail = self._build(triples[:, 0], triples[:, 1], triples[:, 2])  # (h, r) -> tails
        self._head = self._build(triples[:, 2], triples[:, 1], triples[:, 0])  # (t, r) -> heads

    def _build(self, anchor: Tensor, rel: Tensor, answer: Tensor) -> _Index:
        keys_S, seg_T = torch.unique(anchor * self.num_relations + rel, return_inverse=True)
        flat_T = torch.unique(seg_T * self.num_entities + answer)  # sorted, duplicates dropped
        counts = torch.bincount(flat_T // self.num_entities, minlength=len(keys_S))
        ptr = torch.zeros(len(keys_S) + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(counts, 0)
        return _Index(keys_S, ptr, flat_T)

    # -- on disk: built once, then memory-mapped by every process (no rank holds the triples) ---
    _FILES = ("keys_S", "ptr_S1", "flat_T")

    def save(self, folder: Path) -> None:
        """Write the index as .npy files into ``folder`` (which must exist)."""
        for side, idx in (("tail", self._tail), ("head", self._head)):
            for name in self._FILES:
                np.save(folder / f"{side}.{name}.npy", getattr(idx, name).numpy())
        (folder / "known.json").write_text(json.dumps({"num_entities": self.num_entities, "num_triples":
                                                       self.num_triples, "num_relations": self.num_relations}))

    @classmethod
    def load(cls, folder: Path) -> KnownTriples:
        """The index ``save`` wrote, memory-mapped: the OS page cache holds it, not the heap."""
        meta = json.loads((folder / "known.json").read_text())
        self = cls.__new__(cls)
        self.num_entities, self.num_relations = meta["num_entities"], meta["num_relations"]
        self.num_triples = meta["num_triples"]
        with warnings.catch_warnings():  # read-only maps: torch warns that writes would be undefined
            warnings.simplefilter("ignore", UserWarning)
            for side in ("tail", "head"):
                arrays = [torch.from_numpy(np.load(folder / f"{side}.{n}.npy", mmap_mode="r")) for n in cls._FILES]
                setattr(self, f"_{side}", _Index(*arrays))
        return self

    def _segments(self, anchor_c: Tensor, rel_c: Tensor, predict_head: bool) -> tuple[_Index, Tensor, Tensor]:
        """(index, segment of each query clamped into range, whether the query's key is known)."""
        idx = self._head if predict_head else self._tail
        key = anchor_c.cpu().long() * self.num_relations + rel_c.cpu().long()
        if len(idx.keys_S) == 0:
            return idx, torch.zeros_like(key), torch.zeros_like(key, dtype=torch.bool)
        seg = torch.searchsorted(idx.keys_S, key).clamp_max(len(idx.keys_S) - 1)
        return idx, seg, idx.keys_S[seg] == key

    def answers(self, anchor_c: Tensor, rel_c: Tensor, predict_head: bool) -> tuple[Tensor, Tensor]:
        """(rows, cols) of every known answer: query rows[i] has known answer entity cols[i]."""
        idx, seg, found = self._segments(anchor_c, rel_c, predict_head)
        if len(idx.keys_S) == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        start = idx.ptr_S1[seg]
        count = torch.where(found, idx.ptr_S1[seg + 1] - start, 0)
        rows = torch.repeat_interleave(torch.arange(len(seg)), count)
        first = torch.cumsum(count, 0) - count  # position of each query's first answer in the output
        offset = torch.arange(len(rows)) - first[rows]
        cols = idx.flat_T[start[rows] + offset] % self.num_entities
        return rows, cols

    def contains(self, heads: Tensor, rels: Tensor, tails: Tensor) -> Tensor:
        """Bool tensor of the broadcast shape: is (heads, rels, tails) a known triple?"""
        h, r, t = torch.broadcast_tensors(heads.cpu().long(), rels.cpu().long(), tails.cpu().long())
        idx, seg, found = self._segments(h.flatten(), r.flatten(), predict_head=False)
        if len(idx.flat_T) == 0:
            return torch.zeros(h.shape, dtype=torch.bool)
        key = seg * self.num_entities + t.flatten()
        pos = torch.searchsorted(idx.flat_T, key).clamp_max(len(idx.flat_T) - 1)
        return ((idx.flat_T[pos] == key) & found).view(h.shape)


@dataclass(frozen=True)
class DirectionRanks:
    """Filtered ranks (float64) of this process's queries: head prediction and tail prediction."""

    head: Tensor
    tail: Tensor


def _spans(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def chunk_ranks(scores_cN: Tensor, target_c: Tensor, rows: Tensor, cols: Tensor, ties: Ties) -> Tensor:
    """Filtered ranks of target_c in each row of scores_cN (modified in place: filtered -> NaN)."""
    target = target_c.to(scores_cN.device, torch.long)
    gold_c1 = scores_cN.gather(1, target[:, None]).clone()
    if torch.isnan(gold_c1).any():
        raise ValueError("score function returned NaN for a target entity")
    n = scores_cN.shape[1]
    # Realistic ties in one in-place pass: with the filtered entries at -inf, sign(s - gold) is
    # +1 / 0 / -1 for greater / equal / less, so greater + equal / 2 = (sum of signs + N) / 2 (the
    # float32 sum of +-1 and 0 is exact below 2^24 columns). Otherwise filtered entries are NaN,
    # which no comparison counts.
    one_pass = ties == "realistic" and n < _EXACT_FLOAT_SUM and bool(torch.isfinite(gold_c1).all())
    fill = -math.inf if one_pass else math.nan
    scores_cN[rows.to(scores_cN.device), cols.to(scores_cN.device)] = fill
    scores_cN[torch.arange(len(target), device=scores_cN.device), target] = fill
    if one_pass:
        if bool(torch.isnan(scores_cN).any()):  # sign(NaN) is 0: it would count as a tie
            raise ValueError("score function returned NaN for a candidate entity")
        signs = scores_cN.sub_(gold_c1).sign_().sum(1)
        return 1.0 + 0.5 * (signs.to(torch.float64) + n)
    # count_nonzero over the bool block: no float64 copy of the (c, N) comparison
    greater = torch.count_nonzero(scores_cN > gold_c1, dim=1).to(torch.float64)
    if ties == "optimistic":
        return 1.0 + greater
    equal = torch.count_nonzero(scores_cN == gold_c1, dim=1).to(torch.float64)
    return 1.0 + greater + (equal if ties == "pessimistic" else 0.5 * equal)


def filtered_ranks(
    score_fn: ScoreFn, triples_Q3: Tensor, known: KnownTriples, chunk: int,
    ties: Ties = "realistic", shard: QueryShard | None = None,
) -> DirectionRanks:
    """Filtered ranks of each triple's head (given relation and tail) and tail (given head and relation)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    triples = triples_Q3.to(torch.long).cpu()
    lo, hi = shard.bounds(len(triples)) if shard else (0, len(triples))
    out: dict[str, Tensor] = {}
    for direction in DIRECTIONS:
        predict_head = direction == "head"
        anchor_col, target_col = (2, 0) if predict_head else (0, 2)
        parts = [torch.zeros(0, dtype=torch.float64)]
        for a, b in _spans(lo, hi, chunk):
            anchor, rel, target = triples[a:b, anchor_col], triples[a:b, 1], triples[a:b, target_col]
            scores_cN = score_fn(anchor, rel, predict_head)
            if tuple(scores_cN.shape) != (b - a, known.num_entities):
                raise ValueError(f"score_fn returned shape {tuple(scores_cN.shape)}, "
                                 f"want ({b - a}, {known.num_entities})")
            rows, cols = known.answers(anchor, rel, predict_head)
            parts.append(chunk_ranks(scores_cN, target, rows, cols, ties).cpu())
        out[direction] = torch.cat(parts)
    return DirectionRanks(out["head"], out["tail"])


def filtered_rank_stats(
    score_fn: ScoreFn, triples_Q3: Tensor, known: KnownTriples, chunk: int,
    ties: Ties = "realistic", hits_at: Sequence[int] = COMPLETION_HITS, shard: QueryShard | None = None,
) -> dict[str, Tensor]:
    """{"head": sums, "tail": sums}, sums = `rank_stats` (add them across shards before metrics)."""
    ranks = filtered_ranks(score_fn, triples_Q3, known, chunk, ties, shard)
    return {"head": rank_stats(ranks.head, hits_at), "tail": rank_stats(ranks.tail, hits_at)}


def metrics_from_stats(stats: dict[str, Tensor], hits_at: Sequence[int] = COMPLETION_HITS) -> dict[str, float]:
    """{"mrr", "hits@k", "mean_rank"} over both directions, plus the same prefixed "head/" and "tail/"."""
    out = RankMetrics.from_stats(stats["head"] + stats["tail"], hits_at).as_dict()
    for direction in DIRECTIONS:
        out.update(RankMetrics.from_stats(stats[direction], hits_at).as_dict(f"{direction}/"))
    return out


def filtered_metrics(
    score_fn: ScoreFn, triples_Q3: Tensor, known: KnownTriples, chunk: int,
    ties: Ties = "realistic", hits_at: Sequence[int] = COMPLETION_HITS, shard: QueryShard | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Metrics of `filtered_rank_stats`; with a shard, `reduce_sum` (e.g. an all-reduce) adds the sums."""
    stats = filtered_rank_stats(score_fn, triples_Q3, known, chunk, ties, hits_at, shard)
    if reduce_sum is not None:
        stats = {k: reduce_sum(v) for k, v in stats.items()}
    return metrics_from_stats(stats, hits_at)
