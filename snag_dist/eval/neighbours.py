"""Nearest neighbours by exact CSLS: mutual nearest pairs (iterative pseudo links) and each source's top-n.

Both take the exact ranking's pass 1 (`csls.py`: unit vectors, CSLS penalties, the first cosine
blocks left cached) and walk the cosine matrix in row chunks, memory O(chunk x m); the n x m score
matrix is never held. The faiss counterpart of the mutual pairs for large N is
`topk.topk_mutual_pairs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The exact ranking's setup and cosine blocks, shared rather than copied.
from snag_dist.eval.csls import _SUB_ROWS, _cos_block, _problem, _spans
from snag_dist.eval.shards import Collective, many_ranks, shard_bounds

# Legend: n queries (source side), m candidates (target side), c rows in a chunk, s rows in a
# scoring sub-block, D dim, P pairs, k CSLS neighbourhood size, t = topn.


@dataclass(frozen=True)
class TopK:
    values: Tensor  # (n, t) scores, best first
    indices: Tensor  # (n, t) candidate indices into tgt


def mutual_nearest_pairs(emb: Tensor, left_ids: Tensor, right_ids: Tensor, k: int, chunk: int,
                         comm: Collective | None = None) -> Tensor:
    """Entity-id pairs (P, 2) that are each other's CSLS nearest neighbour (iterative pseudo links).

    Ties go to the lowest index on both sides, so the result is deterministic. With ``comm`` each
    rank scores its block of left rows (both passes) and every rank returns all pairs.
    """
    left_ids = left_ids.to(emb.device, torch.long)
    right_ids = right_ids.to(emb.device, torch.long)
    n, m = left_ids.numel(), right_ids.numel()
    if n == 0 or m == 0:
        return left_ids.new_zeros((0, 2))
    lo, hi = shard_bounds(n, comm)
    p = _problem(emb[left_ids], emb[right_ids], k, chunk, "optimistic", (lo, hi), comm)
    best_col_n = left_ids.new_empty(hi - lo)
    best_val_m = p.tgt_n.new_full((m,), float("-inf"))
    best_row_m = left_ids.new_zeros(m)
    for a, b in _spans(lo, hi, chunk):
        cos_cm = _cos_block(p, (a, b), (0, m))
        for r0, r1 in _spans(a, b, _SUB_ROWS):
            score_sm = p.ws.score(r1 - r0, m)
            best_col_n[r0 - lo:r1 - lo] = torch.sub(cos_cm[r0 - a:r1 - a], p.half_r_src_m, out=score_sm).argmax(1)
            torch.sub(cos_cm[r0 - a:r1 - a], p.half_r_tgt_n[r0:r1].unsqueeze(1), out=score_sm)
            val_m, row_m = score_sm.max(0)
            better = val_m > best_val_m  # strict: an earlier (lower) row keeps a tie
            best_val_m = torch.where(better, val_m, best_val_m)
            best_row_m = torch.where(better, row_m + r0, best_row_m)
    if many_ranks(comm):
        # Ranks hold increasing row blocks: the first rank reaching a column's best keeps the lowest row.
        vals_wm = comm.gather_rows(best_val_m[None])
        first = (vals_wm == vals_wm.max(0).values).float().argmax(0)
        best_row_m = comm.gather_rows(best_row_m[None]).gather(0, first[None])[0]
    mutual = best_row_m[best_col_n] == torch.arange(lo, hi, device=emb.device)
    pairs = torch.stack([left_ids[lo:hi][mutual], right_ids[best_col_n[mutual]]], dim=1)
    return comm.gather_rows(pairs) if many_ranks(comm) else pairs


def csls_topk(src: Tensor, tgt: Tensor, k: int, chunk: int, topn: int) -> TopK:
    """The topn best targets for every source row by full CSLS score (cosine when k = 0)."""
    p = _problem(src, tgt, k, chunk, "optimistic")
    t = min(topn, p.tgt_n.shape[0])
    values, indices = [], []
    for a, b in _spans(0, p.src_n.shape[0], chunk):
        cos_cm = _cos_block(p, (a, b), (0, p.tgt_n.shape[0]))
        score_cm = cos_cm if k == 0 else 2.0 * cos_cm - p.hub.r_tgt_n[a:b].unsqueeze(1) - p.hub.r_src_m
        top = score_cm.topk(t, dim=1)
        values.append(top.values)
        indices.append(top.indices)
    if not values:
        return TopK(p.src_n.new_zeros(0, t), torch.zeros(0, t, dtype=torch.long, device=src.device))
    return TopK(torch.cat(values), torch.cat(indices))
