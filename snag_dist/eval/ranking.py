"""Chunked CSLS ranking for entity alignment: Hits@k, MRR, mean rank, mutual nearest neighbours.

CSLS (cross-domain similarity local scaling, Conneau et al. 2018) discounts "hub" entities that are
close to everything:

    csls(x, y) = 2 cos(x, y) - r_tgt(x) - r_src(y)

where r_tgt(x) is the mean cosine of x to its k nearest targets and r_src(y) the mean cosine of y to
its k nearest sources. k = 0 means plain cosine.

Memory is O(chunk x m) for n queries and m candidates: the n x m score matrix is never held.
Two passes over row chunks of the cosine matrix are the minimum for exact ranks without it:
  pass 1 (hubness): r_tgt from each chunk's row top-k; r_src from a running column top-k;
  pass 2 (ranks):   count, per query, the candidates that score strictly above the gold one.
Pass 1 walks the chunks backwards and keeps its last block (the first rows) so that pass 2 starts
with it instead of recomputing it; both directions of an alignment are counted from the same blocks.

Tie rule: rank = 1 + number of candidates whose score is strictly greater than the gold's
("optimistic"). "pessimistic" also counts equal scores, "realistic" is the mean of the two (what the
completion literature reports). The gold score is the directly computed cosine of the gold pair;
the gold candidate itself is never counted against itself.

Nothing here talks to other processes: a `QueryShard` picks which queries this process ranks, and
`rank_stats` gives sums the engine can all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# Legend: n queries (source side), m candidates (target side), c rows in a chunk, D dim,
# L links, P pairs, k CSLS neighbourhood size.

Ties = Literal["optimistic", "realistic", "pessimistic"]
DEFAULT_HITS: tuple[int, ...] = (1, 10)


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


@dataclass(frozen=True)
class TopK:
    values: Tensor  # (n, t) CSLS scores, best first
    indices: Tensor  # (n, t) candidate indices into tgt


@dataclass(frozen=True)
class Hubness:
    """CSLS penalties of both sides."""

    r_tgt_n: Tensor  # (n,) mean cos of each source to its k nearest targets (0 when k = 0)
    r_src_m: Tensor  # (m,) mean cos of each target to its k nearest sources (0 when k = 0)


@dataclass
class _Workspace:
    """Two reused chunk x m buffers: fresh multi-MB tensors cost page faults on every chunk."""

    cos_flat: Tensor  # holds the current cosine block
    score_flat: Tensor  # scratch for scores / comparisons
    cached_rows: tuple[int, int] | None = None  # source rows whose full cosine block is in cos_flat

    @classmethod
    def create(cls, like: Tensor, chunk: int, n: int, m: int) -> _Workspace:
        size = min(chunk, n) * m
        return cls(like.new_empty(size), like.new_empty(size))

    def cos(self, rows: int, cols: int) -> Tensor:
        return self.cos_flat[: rows * cols].view(rows, cols)

    def score(self, rows: int, cols: int) -> Tensor:
        return self.score_flat[: rows * cols].view(rows, cols)


@dataclass
class _Problem:
    """Normalised inputs, their hubness and the buffers both passes share."""

    src_n: Tensor  # (n, D) unit rows
    tgt_n: Tensor  # (m, D) unit rows
    hub: Hubness
    ws: _Workspace
    chunk: int
    equal: bool  # also count exact ties (non-optimistic rules)


@dataclass
class _Counts:
    greater: Tensor  # float64, candidates scoring strictly above gold
    equal: Tensor | None  # float64, other candidates scoring exactly the gold score


def rank_stats(ranks_n: Tensor, hits_at: Sequence[int] = DEFAULT_HITS) -> Tensor:
    """[count, sum rank, sum 1/rank, hits@k counts...] in float64; sums add across shards."""
    r = ranks_n.double()
    hits = [(r <= k).sum().double() for k in hits_at]
    head = [r.new_tensor(float(r.numel())), r.sum(), r.reciprocal().sum()]
    return torch.stack(head + hits)


def _unit(x: Tensor) -> Tensor:
    # fp32 even under bf16 autocast: CSLS differences are small and ranks compare them exactly.
    return F.normalize(x.float(), dim=1)


def _spans(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, stop)) for a in range(start, stop, chunk)]


def _merge_block(top_km: Tensor, cos_cm: Tensor, scratch_cm: Tensor) -> Tensor:
    """Running top-k (k, m) of every column, best first, updated with the rows of cos_cm."""
    k, m = top_km.shape
    torch.gt(cos_cm, top_km[-1], out=scratch_cm)  # 1.0 where an entry beats the running k-th
    n_above = int(torch.count_nonzero(scratch_cm).item())
    if n_above == 0:
        return top_km
    if n_above * 16 > cos_cm.numel():  # dense: no threshold yet, or a chunk of new leaders
        both = torch.cat([top_km, cos_cm.topk(min(k, cos_cm.shape[0]), dim=0).values])
        return both.topk(k, dim=0).values
    # Sparse: merge only the entries above the k-th value (topk along dim 0 is slow on CPU).
    rows, cols = scratch_cm.nonzero(as_tuple=True)
    vals = torch.cat([top_km.reshape(-1), cos_cm[rows, cols]])
    col_ids = torch.cat([torch.arange(m, device=cos_cm.device).repeat(k), cols])
    # Sort by value, then stably by column: each column's entries end up best first.
    by_val = vals.argsort(descending=True, stable=True)
    order = by_val[col_ids[by_val].argsort(stable=True)]
    vals, col_ids = vals[order], col_ids[order]
    per_col = torch.bincount(col_ids, minlength=m)
    pos = torch.arange(vals.numel(), device=vals.device) - (per_col.cumsum(0) - per_col)[col_ids]
    keep = pos < k
    out = torch.empty_like(top_km)
    out[pos[keep], col_ids[keep]] = vals[keep]
    return out


def _merge_column_topk(top_km: Tensor, cos_cm: Tensor, scratch_flat: Tensor) -> Tensor:
    # Row blocks growing 4x: the first, small one seeds the threshold with a cheap dense top-k;
    # after it few entries of the bigger blocks beat the running k-th value.
    a, size, m = 0, 128, cos_cm.shape[1]
    while a < cos_cm.shape[0]:
        b = min(cos_cm.shape[0], a + size)
        top_km = _merge_block(top_km, cos_cm[a:b], scratch_flat[: (b - a) * m].view(b - a, m))
        a, size = b, size * 4
    return top_km


def _cos_into(p: _Problem, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """Cosines (c, m') of source rows x target columns, reusing the block already in the buffer."""
    (a, b), (j0, j1) = rows, cols
    full = (j0, j1) == (0, p.tgt_n.shape[0])
    if p.ws.cached_rows == rows:
        return p.ws.cos(b - a, p.tgt_n.shape[0])[:, j0:j1]
    out = p.ws.cos(b - a, j1 - j0)
    torch.mm(p.src_n[a:b], p.tgt_n[j0:j1].T, out=out)
    p.ws.cached_rows = rows if full else None
    return out


def _hubness(src_n: Tensor, tgt_n: Tensor, k: int, ws: _Workspace, chunk: int) -> Hubness:
    n, m = src_n.shape[0], tgt_n.shape[0]
    if k == 0 or n == 0 or m == 0:
        return Hubness(src_n.new_zeros(n), tgt_n.new_zeros(m))
    r_tgt_n = src_n.new_empty(n)
    top_km = tgt_n.new_full((min(k, n), m), float("-inf"))
    # Backwards, so the block left in the buffer is the first one, where pass 2 starts.
    for a, b in reversed(_spans(0, n, chunk)):
        cos_cm = ws.cos(b - a, m)
        torch.mm(src_n[a:b], tgt_n.T, out=cos_cm)
        ws.cached_rows = (a, b)
        r_tgt_n[a:b] = cos_cm.topk(min(k, m), dim=1).values.mean(1)
        top_km = _merge_column_topk(top_km, cos_cm, ws.score_flat)
    return Hubness(r_tgt_n, top_km.mean(0))


def csls_hubness(src: Tensor, tgt: Tensor, k: int, chunk: int) -> Hubness:
    """Pass 1 alone: r_tgt (n,) and r_src (m,) of src (n, D) and tgt (m, D), chunk rows at a time."""
    src_n, tgt_n = _unit(src), _unit(tgt)
    ws = _Workspace.create(src_n, chunk, src_n.shape[0], tgt_n.shape[0])
    return _hubness(src_n, tgt_n, k, ws, chunk)


def _count_beats(score_cm: Tensor, gold_score: Tensor, dim: int, equal: bool) -> _Counts:
    """Per row (dim=1) or column (dim=0): how many scores beat / equal the gold score."""
    if equal:
        greater = (score_cm > gold_score).sum(dim, dtype=torch.float64)
        return _Counts(greater, (score_cm == gold_score).sum(dim, dtype=torch.float64))
    # In place, as 0/1 floats: summing floats is several times faster than summing bools on CPU.
    # A chunk's float32 sums are exact below 2**24 candidates.
    return _Counts(score_cm.gt_(gold_score).sum(dim).double(), None)


def _self_beats(score: Tensor, gold_score: Tensor, equal: bool) -> _Counts:
    """The gold entry compared with its own directly computed score, to take it out of the count."""
    return _Counts((score > gold_score).double(), (score == gold_score).double() if equal else None)


def _row_counts(p: _Problem, cos_cm: Tensor, gold_c: Tensor, pair_c: Tensor) -> _Counts:
    """Source queries (rows of cos_cm) against all targets; r_tgt(x) is constant in a row and drops."""
    half_r_src_m = 0.5 * p.hub.r_src_m
    score_cm = torch.sub(cos_cm, half_r_src_m, out=p.ws.score(*cos_cm.shape))  # cos_cm stays intact
    gold_score = (pair_c - half_r_src_m[gold_c]).unsqueeze(1)
    own = _self_beats(score_cm.gather(1, gold_c.unsqueeze(1)), gold_score, p.equal)
    counts = _count_beats(score_cm, gold_score, 1, p.equal)
    return _subtract(counts, own, squeeze=True)


def _subtract(counts: _Counts, own: _Counts, squeeze: bool) -> _Counts:
    g = own.greater.squeeze(1) if squeeze else own.greater
    e = None if own.equal is None else (own.equal.squeeze(1) if squeeze else own.equal)
    return _Counts(counts.greater - g, None if counts.equal is None else counts.equal - e)


def _ranks(counts: _Counts, ties: Ties) -> Tensor:
    if ties == "optimistic" or counts.equal is None:
        return 1.0 + counts.greater
    if ties == "pessimistic":
        return 1.0 + counts.greater + counts.equal
    return 1.0 + counts.greater + 0.5 * counts.equal


def _problem(src: Tensor, tgt: Tensor, k: int, chunk: int, ties: Ties) -> _Problem:
    if chunk < 1 or k < 0:
        raise ValueError(f"need chunk >= 1 and k >= 0, got chunk={chunk} k={k}")
    src_n, tgt_n = _unit(src), _unit(tgt)
    ws = _Workspace.create(src_n, chunk, src_n.shape[0], tgt_n.shape[0])
    return _Problem(src_n, tgt_n, _hubness(src_n, tgt_n, k, ws, chunk), ws, chunk, ties != "optimistic")


def csls_ranks(
    src: Tensor, tgt: Tensor, gold: Tensor, k: int, chunk: int,
    ties: Ties = "optimistic", shard: QueryShard | None = None,
) -> Tensor:
    """Rank (n',) of gold[i] among all targets for each source query i (of the shard, if given)."""
    p = _problem(src, tgt, k, chunk, ties)
    lo, hi = shard.bounds(p.src_n.shape[0]) if shard else (0, p.src_n.shape[0])
    gold = gold.to(p.src_n.device, torch.long)
    out = []
    for a, b in _spans(lo, hi, chunk):
        gold_c = gold[a:b]
        pair_c = (p.src_n[a:b] * p.tgt_n[gold_c]).sum(1)
        cos_cm = _cos_into(p, (a, b), (0, p.tgt_n.shape[0]))
        out.append(_ranks(_row_counts(p, cos_cm, gold_c, pair_c), ties))
    return torch.cat(out) if out else p.src_n.new_zeros(0, dtype=torch.float64)


def csls_rank_metrics(
    src: Tensor, tgt: Tensor, gold: Tensor, k: int, chunk: int,
    ties: Ties = "optimistic", hits_at: Sequence[int] = DEFAULT_HITS,
) -> RankMetrics:
    """Hits@k, MRR and mean rank of gold (n,) targets for source queries src (n, D) vs tgt (m, D)."""
    return RankMetrics.from_ranks(csls_ranks(src, tgt, gold, k, chunk, ties), hits_at)


def _col_counts(
    p: _Problem, rows: tuple[int, int], cos_cm: Tensor, cols: tuple[int, int], pair_l: Tensor
) -> _Counts:
    """Target queries cols[0]:cols[1] against source rows rows[0]:rows[1] of a link table, where
    the gold source of target j is source j; r_src(y) is constant in a column and drops."""
    (a, b), (j0, j1) = rows, cols
    half_r_tgt_c = 0.5 * p.hub.r_tgt_n[a:b].unsqueeze(1)
    score_cm = torch.sub(cos_cm, half_r_tgt_c, out=p.ws.score(*cos_cm.shape))
    gold_score = pair_l[j0:j1] - 0.5 * p.hub.r_tgt_n[j0:j1]
    lo, hi = max(a, j0), min(b, j1)
    idx = torch.arange(lo, max(lo, hi), device=cos_cm.device)
    own = _self_beats(score_cm[idx - a, idx - j0], gold_score[idx - j0], p.equal)
    counts = _count_beats(score_cm, gold_score.unsqueeze(0), 0, p.equal)
    counts.greater[idx - j0] -= own.greater
    if counts.equal is not None and own.equal is not None:
        counts.equal[idx - j0] -= own.equal
    return counts


def _add(total: _Counts, part: _Counts) -> None:
    total.greater += part.greater
    if total.equal is not None and part.equal is not None:
        total.equal += part.equal


def alignment_ranks(
    emb: Tensor, links: Tensor, k: int, chunk: int,
    ties: Ties = "optimistic", shard: QueryShard | None = None,
) -> AlignmentRanks:
    """Ranks of the test links (L, 2) in both directions; candidates are the links' own entities.

    Link i's left entity must find link i's right entity among all L right entities (l2r), and
    vice versa (r2l), as in the standard DBP15K protocol. Both directions share one pass 2.
    """
    links = links.to(emb.device, torch.long)
    p = _problem(emb[links[:, 0]], emb[links[:, 1]], k, chunk, ties)
    n_links = links.shape[0]
    lo, hi = shard.bounds(n_links) if shard else (0, n_links)
    pair_l = (p.src_n * p.tgt_n).sum(1)  # cos of each gold pair
    zeros = pair_l.new_zeros(hi - lo, dtype=torch.float64)
    cols = _Counts(zeros, zeros.clone() if p.equal else None)
    l2r = []
    for a, b in _spans(0, n_links, chunk):
        ra, rb = max(a, lo), min(b, hi)
        if ra < rb:  # these rows are l2r queries: they need every column
            cos_cm = _cos_into(p, (a, b), (0, n_links))
            gold_c = torch.arange(ra, rb, device=emb.device)
            l2r.append(_ranks(_row_counts(p, cos_cm[ra - a : rb - a], gold_c, pair_l[ra:rb]), ties))
            cos_cm = cos_cm[:, lo:hi]
        else:
            cos_cm = _cos_into(p, (a, b), (lo, hi))
        _add(cols, _col_counts(p, (a, b), cos_cm, (lo, hi), pair_l))
    l2r_ranks = torch.cat(l2r) if l2r else zeros
    return AlignmentRanks(l2r_ranks, _ranks(cols, ties))


def alignment_metrics(
    emb: Tensor, links: Tensor, k: int, chunk: int,
    ties: Ties = "optimistic", hits_at: Sequence[int] = DEFAULT_HITS,
) -> dict[str, float]:
    """{"hits@1", "hits@10", "mrr", "mean_rank"} left-to-right, the same prefixed "r2l/" right-to-left."""
    ranks = alignment_ranks(emb, links, k, chunk, ties)
    out = RankMetrics.from_ranks(ranks.l2r, hits_at).as_dict()
    out.update(RankMetrics.from_ranks(ranks.r2l, hits_at).as_dict("r2l/"))
    return out


def mutual_nearest_pairs(emb: Tensor, left_ids: Tensor, right_ids: Tensor, k: int, chunk: int) -> Tensor:
    """Entity-id pairs (P, 2) that are each other's CSLS nearest neighbour (iterative pseudo links).

    Ties go to the lowest index on both sides, so the result is deterministic.
    """
    left_ids = left_ids.to(emb.device, torch.long)
    right_ids = right_ids.to(emb.device, torch.long)
    n, m = left_ids.numel(), right_ids.numel()
    if n == 0 or m == 0:
        return left_ids.new_zeros((0, 2))
    p = _problem(emb[left_ids], emb[right_ids], k, chunk, "optimistic")
    half_r_src_m, half_r_tgt_n = 0.5 * p.hub.r_src_m, 0.5 * p.hub.r_tgt_n
    best_col_n = left_ids.new_empty(n)
    best_val_m = p.tgt_n.new_full((m,), float("-inf"))
    best_row_m = left_ids.new_zeros(m)
    for a, b in _spans(0, n, chunk):
        cos_cm = _cos_into(p, (a, b), (0, m))
        score_cm = p.ws.score(b - a, m)
        best_col_n[a:b] = torch.sub(cos_cm, half_r_src_m, out=score_cm).argmax(1)
        val_m, row_m = torch.sub(cos_cm, half_r_tgt_n[a:b].unsqueeze(1), out=score_cm).max(0)
        better = val_m > best_val_m  # strict: an earlier (lower) row keeps a tie
        best_val_m = torch.where(better, val_m, best_val_m)
        best_row_m = torch.where(better, row_m + a, best_row_m)
    rows_n = torch.arange(n, device=emb.device)
    mutual = best_row_m[best_col_n] == rows_n
    return torch.stack([left_ids[mutual], right_ids[best_col_n[mutual]]], dim=1)


def csls_topk(src: Tensor, tgt: Tensor, k: int, chunk: int, topn: int) -> TopK:
    """The topn best targets for every source row by full CSLS score (cosine when k = 0)."""
    p = _problem(src, tgt, k, chunk, "optimistic")
    t = min(topn, p.tgt_n.shape[0])
    values, indices = [], []
    for a, b in _spans(0, p.src_n.shape[0], chunk):
        cos_cm = _cos_into(p, (a, b), (0, p.tgt_n.shape[0]))
        score_cm = cos_cm if k == 0 else 2.0 * cos_cm - p.hub.r_tgt_n[a:b].unsqueeze(1) - p.hub.r_src_m
        top = score_cm.topk(t, dim=1)
        values.append(top.values)
        indices.append(top.indices)
    if not values:
        return TopK(p.src_n.new_zeros(0, t), torch.zeros(0, t, dtype=torch.long, device=src.device))
    return TopK(torch.cat(values), torch.cat(indices))
