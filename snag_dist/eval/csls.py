"""Exact CSLS ranking for entity alignment, chunked: hubness, gold ranks in both directions, Hits@k / MRR.

CSLS (cross-domain similarity local scaling, Conneau et al. 2018) discounts "hub" entities that are
close to everything:

    csls(x, y) = 2 cos(x, y) - r_tgt(x) - r_src(y)

where r_tgt(x) is the mean cosine of x to its k nearest targets and r_src(y) the mean cosine of y to
its k nearest sources. k = 0 means plain cosine.

Memory is O(chunk x m) for n queries and m candidates, about 2.3 x chunk x m x 4 bytes (two
float32 blocks, a bool mask and a small scratch); the n x m score matrix is never held.
Exact ranks without it take two passes over row chunks of the cosine matrix:
  pass 1 (hubness): r_tgt from each chunk's row top-k, r_src from a running column top-k;
  pass 2 (ranks):   per query, count the candidates that score strictly above the gold one.
The matmuls dominate, so pass 1 walks the chunks backwards and leaves its last two blocks (the first
rows) in the two chunk buffers; pass 2 starts with them instead of recomputing them. Both directions
of an alignment are counted from the same blocks. Within a row r_tgt(x) is constant and drops out,
within a column r_src(y) does: each direction compares cos - r/2 of the other side.

Ties follow `metrics.Ties`. The gold score is the directly computed cosine of the gold pair; the
gold candidate itself is never counted against itself. Scores are float32, so candidates within
about 1e-7 of the gold score may fall either way (a dense float32 computation has the same limit).

Across processes (``comm``, a `shards.Collective` the engine injects; nothing here imports a
distributed API): rank r takes the r-th contiguous block of source rows for both passes. Pass 1
gathers the per-row penalties (n floats) and merges every rank's running column top-k ((W x k, m)
floats); pass 2 counts its rows' l2r ranks in full and every column's r2l counts over its rows,
summed across ranks (m float64). Per rank: 1/W of the matmuls, memory O(chunk x m); the result
equals one process (tested with real processes).

Nearest-neighbour queries over the same passes (mutual nearest pairs, top-n) are in
`neighbours.py`; the approximate faiss protocol for large N in `topk.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from snag_dist.eval.metrics import DEFAULT_HITS, AlignmentRanks, RankMetrics, Ties
from snag_dist.eval.shards import Collective, QueryShard, many_ranks, shard_bounds

# Legend: n queries (source side), m candidates (target side), c rows in a chunk, s rows in a
# scoring sub-block, D dim, L links, k CSLS neighbourhood size.

# Best cosines pass 1 keeps per row and column (alignment ranks): most queries then need no pass 2.
_KEEP = 32
# Rows scored at a time in pass 2: 512 x 10,500 floats (21 MB) stay in cache between the
# subtract / compare / sum steps, which a whole chunk would not.
_SUB_ROWS = 512
# Rows per group maximum in the running column top-k, columns per group in the row top-k.
_GROUP = 16
_ROW_GROUP = 64


@dataclass(frozen=True)
class _Top:
    """The best cosines of rows (n, t) or columns (t, m), best first, and their column / row indices."""

    values: Tensor
    rows: Tensor  # for columns: source row of each value; for rows: target column


@dataclass(frozen=True)
class Hubness:
    """CSLS penalties of both sides (zeros when k = 0), and optionally the kept best cosines."""

    r_tgt_n: Tensor  # (n,) mean cos of each source to its k nearest targets
    r_src_m: Tensor  # (m,) mean cos of each target to its k nearest sources
    row_top: _Top | None = None  # (n', t) of this process's source rows
    col_top: _Top | None = None  # (t, m) over all source rows


@dataclass
class _Workspace:
    """Reused buffers (fresh multi-MB tensors cost page faults on every chunk): two chunk x m
    cosine blocks, a chunk x m mask for pass 1 and an s x m score scratch for pass 2."""

    blocks: list[Tensor]  # flat
    mask: Tensor  # flat bool
    scratch: Tensor  # flat
    cached: dict[tuple[int, int], int] = field(default_factory=dict)  # source rows -> block index

    @classmethod
    def create(cls, like: Tensor, chunk: int, n: int, m: int) -> _Workspace:
        rows = max(1, min(chunk, n))
        blocks = [like.new_empty(rows * m) for _ in range(1 if rows >= n else 2)]
        mask = torch.empty(rows * m, dtype=torch.bool, device=like.device)
        return cls(blocks, mask, like.new_empty(min(rows, _SUB_ROWS) * m))

    def fresh(self, rows: int, cols: int) -> tuple[int, Tensor]:
        """A (rows, cols) view of a block no cache entry needs; evicts the oldest if none is free."""
        busy = set(self.cached.values())
        free = [i for i in range(len(self.blocks)) if i not in busy]
        if not free:
            free = [self.cached.pop(next(iter(self.cached)))]
        return free[0], self.blocks[free[0]][: rows * cols].view(rows, cols)

    def take(self, rows: tuple[int, int], cols: int) -> Tensor | None:
        """The cached cosine block of these source rows, if any; its buffer is free afterwards."""
        idx = self.cached.pop(rows, None)
        return None if idx is None else self.blocks[idx][: (rows[1] - rows[0]) * cols].view(-1, cols)

    def score(self, rows: int, cols: int) -> Tensor:
        return self.scratch[: rows * cols].view(rows, cols)


@dataclass
class _Problem:
    """Normalised inputs, halved hubness and the buffers both passes share."""

    src_n: Tensor  # (n, D) unit rows
    tgt_n: Tensor  # (m, D) unit rows
    hub: Hubness
    half_r_tgt_n: Tensor  # (n,)
    half_r_src_m: Tensor  # (m,)
    ws: _Workspace
    chunk: int
    equal: bool  # also count exact ties (non-optimistic rules)


@dataclass
class _Counts:
    greater: Tensor  # float64, other candidates scoring strictly above gold
    equal: Tensor | None  # float64, other candidates scoring exactly the gold score


def _unit(x: Tensor) -> Tensor:
    # fp32 even under bf16 autocast: CSLS differences are small and ranks compare them exactly.
    return F.normalize(x.float(), dim=1)


def _spans(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def _descending_key(vals: Tensor) -> Tensor:
    """int64 in [0, 2**32) that sorts float32 values in descending order (IEEE bits, negatives
    flipped): one integer sort is much cheaper on CPU than stable float sorts."""
    bits = vals.contiguous().view(torch.int32).to(torch.int64)
    ascending = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (2**31 - 1) - ascending


def _merge_sparse(top: _Top, rows: Tensor, cols: Tensor, cos_cm: Tensor, row0: int) -> _Top:
    """Running top-k (k, m) updated with the few entries (rows, cols) of cos_cm above its k-th."""
    k, m = top.values.shape
    touched = torch.zeros(m, dtype=torch.bool, device=cos_cm.device)
    touched[cols] = True
    t_cols = touched.nonzero().squeeze(1)
    vals = torch.cat([top.values[:, t_cols].reshape(-1), cos_cm[rows, cols]])
    ids = torch.cat([top.rows[:, t_cols].reshape(-1), rows + row0])
    col_ids = torch.cat([t_cols.repeat(k), cols])
    # Column-major, best first within a column.
    order = (col_ids * 2**32 + _descending_key(vals)).argsort()
    vals, col_ids, ids = vals[order], col_ids[order], ids[order]
    per_col = torch.bincount(col_ids, minlength=m)
    pos = torch.arange(vals.numel(), device=vals.device) - (per_col.cumsum(0) - per_col)[col_ids]
    keep = pos < k
    out = _Top(top.values.clone(), top.rows.clone())
    out.values[pos[keep], col_ids[keep]] = vals[keep]
    out.rows[pos[keep], col_ids[keep]] = ids[keep]
    return out


def _merge_block(top: _Top, cos_cm: Tensor, mask_cm: Tensor, dense: bool, row0: int) -> _Top:
    """Running top-k (k, m) of every column, best first, updated with the rows of cos_cm."""
    k = top.values.shape[0]
    c, m = cos_cm.shape
    if not dense:
        # topk along dim 0 is slow on CPU; once seeded, few entries beat the running k-th value.
        # Compare group maxima of _GROUP rows first: nonzero() over the whole block dominated.
        full = c // _GROUP * _GROUP
        gmax = cos_cm[:full].unflatten(0, (full // _GROUP, _GROUP)).amax(1)
        mask_gm = mask_cm.view(-1)[: gmax.numel()].view_as(gmax)
        torch.gt(gmax, top.values[-1], out=mask_gm)
        gi, gc = mask_gm.nonzero(as_tuple=True)
        rows = (gi.unsqueeze(1) * _GROUP + torch.arange(_GROUP, device=gi.device)).reshape(-1)
        cols = gc.repeat_interleave(_GROUP)
        if full < c:  # the last rows, not a whole group
            mask_t = mask_cm.view(-1)[: (c - full) * m].view(c - full, m)
            tr, tc = torch.gt(cos_cm[full:], top.values[-1], out=mask_t).nonzero(as_tuple=True)
            rows, cols = torch.cat([rows, tr + full]), torch.cat([cols, tc])
        beats = cos_cm[rows, cols] > top.values[-1, cols]
        rows, cols = rows[beats], cols[beats]
        if rows.numel() == 0:
            return top
        dense = rows.numel() * 16 > cos_cm.numel()  # e.g. rows sorted by similarity
        if not dense:
            return _merge_sparse(top, rows, cols, cos_cm, row0)
    block = cos_cm.topk(min(k, cos_cm.shape[0]), dim=0)
    both = torch.cat([top.values, block.values])
    both_rows = torch.cat([top.rows, block.indices + row0])
    best = both.topk(k, dim=0)
    return _Top(best.values, both_rows.gather(0, best.indices))


def _row_topk(cos_cm: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """(values, column indices) of the t best entries of each row, best first.

    topk over long rows costs several times a comparison on CPU, so it runs on the t best groups of
    _ROW_GROUP columns by group maximum (a row's t best entries lie there: any other group has t
    better group maxima) and on the columns past the last whole group.
    """
    c, m = cos_cm.shape
    g = _ROW_GROUP
    if m < 8 * g * t:
        return cos_cm.topk(t, dim=1)
    full = m // g * g
    gmax = cos_cm[:, :full].unflatten(1, (full // g, g)).amax(2)
    groups = gmax.topk(t, dim=1).indices
    cols = (groups.unsqueeze(2) * g + torch.arange(g, device=cos_cm.device)).reshape(c, t * g)
    if full < m:
        cols = torch.cat([cols, torch.arange(full, m, device=cos_cm.device).expand(c, m - full)], dim=1)
    best = cos_cm.gather(1, cols).topk(t, dim=1)
    return best.values, cols.gather(1, best.indices)


def _merge_column_topk(top: _Top, cos_cm: Tensor, mask_flat: Tensor, seeded: bool, row0: int) -> _Top:
    # Unseeded (first chunk): row blocks growing 4x, the first, small one seeding the running
    # top-k with a cheap dense top-k, so that few entries of each bigger block beat the running
    # k-th value. Seeded: the whole chunk at once (fewer, larger ops).
    a, size, m = 0, 256 if not seeded else cos_cm.shape[0], cos_cm.shape[1]
    while a < cos_cm.shape[0]:
        b = min(cos_cm.shape[0], a + size)
        mask_cm = mask_flat[: (b - a) * m].view(b - a, m)
        top = _merge_block(top, cos_cm[a:b], mask_cm, not seeded, row0 + a)
        a, size, seeded = b, size * 4, True
    return top


def _hubness(src_n: Tensor, tgt_n: Tensor, k: int, ws: _Workspace, chunk: int,
             rows: tuple[int, int] | None = None, comm: Collective | None = None, keep: int = 0) -> Hubness:
    """Pass 1 over source rows ``rows`` (all by default), leaving its last blocks cached in the
    workspace; with ``comm``, every rank's rows are combined into the penalties of all rows. With
    ``keep`` > k, also the ``keep`` best cosines of each row and column (and where they are)."""
    n, m = src_n.shape[0], tgt_n.shape[0]
    if k == 0 or n == 0 or m == 0:
        return Hubness(src_n.new_zeros(n), tgt_n.new_zeros(m))
    lo, hi = rows or (0, n)
    r_tgt_n = src_n.new_empty(hi - lo)
    kk, t_row, t_col = min(k, n), min(max(k, keep), m), min(max(k, keep), n)
    row_top = _Top(src_n.new_empty(hi - lo, t_row), torch.empty(hi - lo, t_row, dtype=torch.long, device=src_n.device))
    top = _Top(tgt_n.new_full((t_col, m), float("-inf")), torch.full((t_col, m), -1, dtype=torch.long,
                                                                      device=tgt_n.device))
    # Backwards, so the blocks left in the buffers are the first ones, where pass 2 starts.
    for i, (a, b) in enumerate(reversed(_spans(lo, hi, chunk))):
        idx, cos_cm = ws.fresh(b - a, m)
        torch.mm(src_n[a:b], tgt_n.T, out=cos_cm)
        ws.cached[(a, b)] = idx
        values, at = _row_topk(cos_cm, t_row)
        r_tgt_n[a - lo:b - lo] = values[:, :min(k, m)].mean(1)
        row_top.values[a - lo:b - lo], row_top.rows[a - lo:b - lo] = values, at
        top = _merge_column_topk(top, cos_cm, ws.mask, i > 0, a)
    if many_ranks(comm):  # a rank with fewer than k rows leaves -inf rows: the union has n >= kk real ones
        r_tgt_n = comm.gather_rows(r_tgt_n)
        values, at = comm.gather_rows(top.values), comm.gather_rows(top.rows)
        best = values.topk(t_col, dim=0)
        top = _Top(best.values, at.gather(0, best.indices))
    return Hubness(r_tgt_n, top.values[:kk].mean(0), row_top if keep else None, top if keep else None)


def csls_hubness(src: Tensor, tgt: Tensor, k: int, chunk: int) -> Hubness:
    """Pass 1 alone: r_tgt (n,) and r_src (m,) of src (n, D) and tgt (m, D), chunk rows at a time."""
    src_n, tgt_n = _unit(src), _unit(tgt)
    return _hubness(src_n, tgt_n, k, _Workspace.create(src_n, chunk, len(src_n), len(tgt_n)), chunk)


def _problem(src: Tensor, tgt: Tensor, k: int, chunk: int, ties: Ties,
             rows: tuple[int, int] | None = None, comm: Collective | None = None, keep: int = 0) -> _Problem:
    if chunk < 1 or k < 0:
        raise ValueError(f"need chunk >= 1 and k >= 0, got chunk={chunk} k={k}")
    src_n, tgt_n = _unit(src), _unit(tgt)
    own = src_n.shape[0] if rows is None else rows[1] - rows[0]
    ws = _Workspace.create(src_n, chunk, own, tgt_n.shape[0])
    hub = _hubness(src_n, tgt_n, k, ws, chunk, rows, comm, keep)
    half_r_tgt, half_r_src = 0.5 * hub.r_tgt_n, 0.5 * hub.r_src_m
    return _Problem(src_n, tgt_n, hub, half_r_tgt, half_r_src, ws, chunk, ties != "optimistic")


def _cos_block(p: _Problem, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """Cosines (c, m') of source rows x target columns, taken from the pass-1 cache if there."""
    (a, b), (j0, j1) = rows, cols
    cached = p.ws.take(rows, p.tgt_n.shape[0])
    if cached is not None:
        return cached[:, j0:j1]
    _, out = p.ws.fresh(b - a, j1 - j0)
    return torch.mm(p.src_n[a:b], p.tgt_n[j0:j1].T, out=out)


def _count_beats(score_sm: Tensor, gold_score: Tensor, dim: int, equal: bool) -> _Counts:
    """Per row (dim=1) or column (dim=0): how many scores beat / equal the gold score."""
    if equal:
        greater = (score_sm > gold_score).sum(dim, dtype=torch.float64)
        return _Counts(greater, (score_sm == gold_score).sum(dim, dtype=torch.float64))
    # In place, as 0/1 floats: summing floats is several times faster than summing bools on CPU.
    # The float32 sums are exact below 2**24 candidates.
    return _Counts(score_sm.gt_(gold_score).sum(dim).double(), None)


def _self_beats(score: Tensor, gold_score: Tensor, equal: bool) -> _Counts:
    """The gold entry compared with its own directly computed score, to take it out of the count."""
    return _Counts((score > gold_score).double(), (score == gold_score).double() if equal else None)


def _minus(counts: _Counts, own: _Counts) -> _Counts:
    equal = None if counts.equal is None or own.equal is None else counts.equal - own.equal
    return _Counts(counts.greater - own.greater, equal)


def _row_counts(p: _Problem, cos_cm: Tensor, gold_c: Tensor, pair_c: Tensor) -> _Counts:
    """Source queries (rows of cos_cm, all targets) against their gold targets gold_c."""
    gold_score_c = pair_c - p.half_r_src_m[gold_c]
    greater, equal = [], []
    for r0, r1 in _spans(0, cos_cm.shape[0], _SUB_ROWS):
        score_sm = p.ws.score(r1 - r0, cos_cm.shape[1])
        torch.sub(cos_cm[r0:r1], p.half_r_src_m, out=score_sm)
        gold_s = gold_score_c[r0:r1]
        own = _self_beats(score_sm.gather(1, gold_c[r0:r1].unsqueeze(1)).squeeze(1), gold_s, p.equal)
        counts = _minus(_count_beats(score_sm, gold_s.unsqueeze(1), 1, p.equal), own)
        greater.append(counts.greater)
        if counts.equal is not None:
            equal.append(counts.equal)
    return _Counts(torch.cat(greater), torch.cat(equal) if equal else None)


def _col_counts(
    p: _Problem, rows: tuple[int, int], cos_cm: Tensor, cols: tuple[int, int], pair_l: Tensor, total: _Counts
) -> None:
    """Add to `total` the counts of target queries cols[0]:cols[1] against source rows
    rows[0]:rows[1] of a link table, where the gold source of target j is source j."""
    (a, _), (j0, j1) = rows, cols
    gold_score = pair_l[j0:j1] - p.half_r_tgt_n[j0:j1]
    for r0, r1 in _spans(0, cos_cm.shape[0], _SUB_ROWS):
        half_r_tgt_s = p.half_r_tgt_n[a + r0 : a + r1].unsqueeze(1)
        score_sm = torch.sub(cos_cm[r0:r1], half_r_tgt_s, out=p.ws.score(r1 - r0, j1 - j0))
        lo, hi = max(a + r0, j0), min(a + r1, j1)  # gold entries (j, j) inside this sub-block
        idx = torch.arange(lo, max(lo, hi), device=cos_cm.device)
        own = _self_beats(score_sm[idx - a - r0, idx - j0], gold_score[idx - j0], p.equal)
        counts = _count_beats(score_sm, gold_score.unsqueeze(0), 0, p.equal)
        counts.greater[idx - j0] -= own.greater
        total.greater += counts.greater
        if total.equal is not None and counts.equal is not None and own.equal is not None:
            counts.equal[idx - j0] -= own.equal
            total.equal += counts.equal


def _ranks(counts: _Counts, ties: Ties) -> Tensor:
    if ties == "optimistic" or counts.equal is None:
        return 1.0 + counts.greater
    if ties == "pessimistic":
        return 1.0 + counts.greater + counts.equal
    return 1.0 + counts.greater + 0.5 * counts.equal


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
        cos_cm = _cos_block(p, (a, b), (0, p.tgt_n.shape[0]))
        out.append(_ranks(_row_counts(p, cos_cm, gold_c, pair_c), ties))
    return torch.cat(out) if out else p.src_n.new_zeros(0, dtype=torch.float64)


def csls_rank_metrics(
    src: Tensor, tgt: Tensor, gold: Tensor, k: int, chunk: int,
    ties: Ties = "optimistic", hits_at: Sequence[int] = DEFAULT_HITS,
) -> RankMetrics:
    """Hits@k, MRR and mean rank of gold (n,) targets for source queries src (n, D) vs tgt (m, D)."""
    return RankMetrics.from_ranks(csls_ranks(src, tgt, gold, k, chunk, ties), hits_at)


def alignment_ranks(
    emb: Tensor, links: Tensor, k: int, chunk: int,
    ties: Ties = "optimistic", comm: Collective | None = None,
) -> AlignmentRanks:
    """Ranks of the test links (L, 2) in both directions; candidates are the links' own entities.

    Link i's left entity must find link i's right entity among all L right entities (l2r), and
    vice versa (r2l), as in the standard DBP15K protocol. Both directions share one pass 2. With
    ``comm``, this rank returns the ranks of its block of links (`shard_bounds`), both directions,
    having computed 1/W of both passes; every rank must call it.
    """
    links = links.to(emb.device, torch.long)
    n_links = links.shape[0]
    lo, hi = shard_bounds(n_links, comm)
    p = _problem(emb[links[:, 0]], emb[links[:, 1]], k, chunk, ties, (lo, hi), comm, _KEEP if k else 0)
    pair_l = (p.src_n * p.tgt_n).sum(1)  # cos of each gold pair
    if p.hub.row_top is not None:
        return _ranks_from_kept(p, pair_l, (lo, hi), ties, comm)
    zeros = pair_l.new_zeros(n_links, dtype=torch.float64)
    cols = _Counts(zeros, zeros.clone() if p.equal else None)  # r2l counts of every column over my rows
    l2r = [zeros[:0]]
    for a, b in _spans(lo, hi, chunk):
        cos_cm = _cos_block(p, (a, b), (0, n_links))
        gold_c = torch.arange(a, b, device=emb.device)
        l2r.append(_ranks(_row_counts(p, cos_cm, gold_c, pair_l[a:b]), ties))
        _col_counts(p, (a, b), cos_cm, (0, n_links), pair_l, cols)
    if many_ranks(comm):
        cols = _Counts(comm.reduce_sum(cols.greater), None if cols.equal is None else comm.reduce_sum(cols.equal))
    return AlignmentRanks(torch.cat(l2r), _ranks(cols, ties)[lo:hi])


def _kept_counts(values: Tensor, at: Tensor, own: Tensor, half_r: Tensor, gold: Tensor, dim: int,
                 ) -> tuple[Tensor, Tensor]:
    """Kept cosines that beat / equal each query's gold score (its own entry excluded)."""
    score = values - half_r[at.clamp_min(0)]
    other = at != own
    g = gold.unsqueeze(dim)
    return ((score > g) & other).sum(dim).double(), ((score == g) & other).sum(dim).double()


def _ranks_from_kept(p: _Problem, pair_l: Tensor, rows: tuple[int, int], ties: Ties,
                     comm: Collective | None) -> AlignmentRanks:
    """Pass 2 only where pass 1's kept cosines cannot decide the rank, and only against the
    candidates that can matter.

    A query's rank is decided by its kept best cosines when even the best cosine it did not keep
    (<= the last kept one), minus the smallest penalty, stays below its gold score: float
    subtraction is monotonic, so no dropped candidate can beat or tie the gold. For the others, a
    dropped candidate y can only matter if last kept - penalty(y) >= gold score, i.e. if its penalty
    is below a threshold: with candidates sorted by penalty that is a prefix, usually a few percent
    of them. Those are recomputed (the kept ones are counted from pass 1), rows of this rank for l2r
    and, for r2l, columns against this rank's rows (summed over ranks).
    """
    (lo, hi), dev = rows, pair_l.device
    n, m = p.src_n.shape[0], p.tgt_n.shape[0]
    half_src, half_tgt = p.half_r_src_m, p.half_r_tgt_n
    cap = p.ws.blocks[0].numel()
    # l2r: this rank's rows; gold of row i is column i
    top = p.hub.row_top
    own = torch.arange(lo, hi, device=dev)
    gold_r = pair_l[lo:hi] - half_src[lo:hi]
    greater, equal = _kept_counts(top.values, top.rows, own[:, None], half_src, gold_r, 1)
    if top.values.shape[1] < m:
        undecided = ~(top.values[:, -1] - half_src.min() < gold_r)
        part = _recount(p.tgt_n, half_src, p.src_n[lo:hi], top.rows, own, top.values[:, -1] - gold_r,
                        gold_r, undecided, cap, p.equal)
        greater[undecided] += part.greater
        if part.equal is not None:
            equal[undecided] += part.equal
    l2r = _ranks(_Counts(greater, equal if p.equal else None), ties)
    # r2l: every column; gold of column j is row j
    top = p.hub.col_top
    cols = torch.arange(m, device=dev)
    gold_c = pair_l - half_tgt[:m]
    c_greater, c_equal = _kept_counts(top.values, top.rows, cols[None], half_tgt, gold_c, 0)
    if top.values.shape[0] < n:
        undecided = ~(top.values[-1] - half_tgt.min() < gold_c)  # the same on every rank
        # Against this rank's rows only: kept rows (and the gold row) of other ranks are skipped
        # there, so map them out of range.
        kept = top.rows.T.clone()
        kept[(kept < lo) | (kept >= hi)] = -1
        part = _recount(p.src_n[lo:hi], half_tgt[lo:hi], p.tgt_n, torch.where(kept >= 0, kept - lo, kept),
                        cols - lo, top.values[-1] - gold_c, gold_c, undecided, cap, p.equal)
        if many_ranks(comm):
            part = _Counts(comm.reduce_sum(part.greater), None if part.equal is None else comm.reduce_sum(part.equal))
        c_greater[undecided] += part.greater
        if part.equal is not None:
            c_equal[undecided] += part.equal
    r2l = _ranks(_Counts(c_greater, c_equal if p.equal else None), ties)[lo:hi]
    return AlignmentRanks(l2r, r2l)


# Slack on the penalty threshold: float rounding of (last kept - gold) is ~1e-7, so a candidate
# outside the prefix by this margin can never beat or tie the gold.
_PREFIX_SLACK = 1e-5


def _recount(cand: Tensor, half_pen: Tensor, query: Tensor, kept: Tensor, own: Tensor, room: Tensor,
             gold: Tensor, redo: Tensor, cap: int, equal: bool) -> _Counts:
    """Counts of the non-kept candidates that beat / tie the gold score, for the queries ``redo``.

    cand (C, D) unit candidates with half penalties half_pen (C,); query (Q, D) unit queries;
    kept (Q, t) candidate indices counted already from pass 1 (-1: none); own (Q,) index of each
    query's gold candidate (outside [0, C): none); room (Q,) = last kept cosine - gold score: only
    candidates with half penalty <= room can matter. Work: per query its prefix of the candidates
    sorted by penalty, in groups of queries that fit ``cap`` floats.
    """
    dev = query.device
    order = half_pen.argsort()
    pen_sorted = half_pen[order]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order), device=dev)
    ids = redo.nonzero().squeeze(1)
    prefix = torch.searchsorted(pen_sorted, room[ids] + _PREFIX_SLACK, right=True)
    by_len = prefix.argsort(descending=True)
    greater = torch.zeros(len(ids), dtype=torch.float64, device=dev)
    ties = torch.zeros_like(greater) if equal else None
    nan = float("nan")
    a = 0
    while a < len(ids):
        width = int(prefix[by_len[a]])
        if width == 0:
            break
        # Queries of at least half this width, as many as fit: at most 2x the needed work.
        b = min(len(ids), a + max(1, cap // width))
        b = a + max(1, int((prefix[by_len[a:b]] * 2 > width).sum()))
        sel = by_len[a:b]
        q = ids[sel]
        score = torch.mm(query[q], cand[order[:width]].T).sub_(pen_sorted[:width])
        # Kept candidates (counted from pass 1) and the gold itself are not counted here.
        skip = torch.cat([kept[q], own[q, None]], dim=1)
        valid = (skip >= 0) & (skip < len(order))
        at = torch.where(valid, pos[skip.clamp(0, len(order) - 1)], width)
        hit = at < width
        score[torch.arange(len(q), device=dev)[:, None].expand_as(at)[hit], at[hit]] = nan
        g = gold[q].unsqueeze(1)
        greater[sel] = (score > g).sum(1, dtype=torch.float64)
        if ties is not None:
            ties[sel] = (score == g).sum(1, dtype=torch.float64)
        a = b
    return _Counts(greater, ties)


def alignment_metrics(
    emb: Tensor, links: Tensor, k: int, chunk: int,
    ties: Ties = "optimistic", hits_at: Sequence[int] = DEFAULT_HITS,
) -> dict[str, float]:
    """{"hits@1", "hits@10", "mrr", "mean_rank"} left-to-right, the same prefixed "r2l/" right-to-left."""
    ranks = alignment_ranks(emb, links, k, chunk, ties)
    out = RankMetrics.from_ranks(ranks.l2r, hits_at).as_dict()
    out.update(RankMetrics.from_ranks(ranks.r2l, hits_at).as_dict("r2l/"))
    return out
