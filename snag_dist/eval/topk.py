"""Approximate alignment evaluation and pseudo links for large N: faiss top-k candidates, CSLS re-scored.

Exact CSLS (`eval.csls`) costs two n x m matmuls; at 2 x 1M entities that is hours on a few
cores. Here each side is searched for its K best cosine candidates with a faiss index, the CSLS
penalties are taken from those neighbourhoods (r(x) = mean of the k_csls best candidate cosines,
k_csls <= K) and the K candidates are re-ranked by CSLS. The result is a *truncated* protocol
("topk-K/<index>"): a gold entity outside a query's K candidates counts as a miss (rank > K), so
Hits@k is exact for k <= K when the gold is among the candidates, and the MRR is MRR@K (reciprocal
rank, 0 beyond K). It is never reported under the full-ranking name "mrr".

Indexes (inner product on unit vectors, i.e. cosine):
  flat  exact search (brute force, faiss's blocked GEMM); with K = n it reproduces exact CSLS,
  ivf   IndexIVFFlat: k-means into `lists` cells (default 4 sqrt(n)), `probe` cells searched,
  hnsw  IndexHNSWFlat: graph search, M = 32 links, efSearch = max(`ef`, 2K).

Across processes (``comm``: row gathers, sums and an all-to-all, injected by the engine): rank r
holds only its block of each side's rows and indexes them; every query block is gathered, searched
against each rank's index and the per-rank top-K lists go back to the query's owner to be merged. Per
rank: memory O(n/W x D) for the vectors and index, plus one gathered query block.

faiss is an optional dependency (``pip install 'snag-dist[ann]'`` or ``faiss-cpu``); the GPU build is
used when importable with GPUs present (not exercised in CI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from snag_dist.errors import ConfigError
from snag_dist.eval.metrics import DEFAULT_HITS, AlignmentRanks
from snag_dist.eval.shards import shard_bounds
from snag_dist.seeding import numpy_rng

IndexKind = Literal["flat", "ivf", "ivf_sq8", "hnsw"]
_MISS = math.inf  # rank of a gold entity outside the candidates
_REFINE = 2  # ivf_sq8: candidates re-scored exactly per result kept


class Exchange(Protocol):
    """Cross-process collectives (``tasks.base.Comm`` is one)."""

    rank: int
    world_size: int

    def sizes(self, n: int, device: torch.device) -> list[int]: ...

    def gather_rows(self, x: Tensor, sizes: list[int] | None = None) -> Tensor: ...

    def reduce_sum(self, x: Tensor) -> Tensor: ...

    def all_to_all(self, x: Tensor, send_counts: list[int]) -> tuple[Tensor, list[int]]: ...


@dataclass(frozen=True)
class IndexSpec:
    kind: IndexKind = "ivf"
    lists: int = 0  # ivf cells; 0 = 4 sqrt(n), at most n / 39 (faiss wants >= 39 points per cell)
    probe: int = 32  # ivf cells searched per query
    hnsw_m: int = 32
    ef: int = 128  # hnsw efSearch (at least 2K)
    seed: int = 0

    def describe(self, k: int) -> str:
        return f"topk-{k}/{self.kind}"


@dataclass(frozen=True)
class Candidates:
    """K best base rows (global row ids, rank order) of each of this rank's queries, best first."""

    ids: Tensor  # (q, K) int64, -1 where fewer than K exist
    cos: Tensor  # (q, K) float32, -inf where ids is -1


def faiss_module():
    """faiss, or a one-line error naming the package."""
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError("eval.protocol=topk needs the package 'faiss-cpu' (pip install faiss-cpu, or "
                          f"pip install 'snag-dist[ann]'); import failed: {exc}") from None
    return faiss


def _many(comm: Exchange | None) -> bool:
    return comm is not None and comm.world_size > 1


def _build(base: np.ndarray, k: int, spec: IndexSpec):
    faiss = faiss_module()
    faiss.omp_set_num_threads(torch.get_num_threads())
    n, d = base.shape
    if spec.kind == "flat" or n == 0:
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, spec.hnsw_m * 2)
        index.hnsw.efSearch = max(spec.ef, 2 * k)
    else:
        lists = spec.lists or int(4 * math.sqrt(n))
        lists = max(1, min(lists, n // 39))
        if spec.kind == "ivf_sq8":
            # Lists scanned as 8-bit codes (a quarter of the memory traffic, which bounds the scan on
            # CPU), the k x refine best re-scored exactly from a flat copy: exact cosines come back.
            ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, lists, faiss.ScalarQuantizer.QT_8bit,
                                                faiss.METRIC_INNER_PRODUCT)
        else:
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = spec.seed
        # k-means of 10 rounds on 40 points per cell (faiss: 25 rounds, up to 256 points; just above its
        # 39-point warning): the cells only route queries, and at 2 x 280K rows x 640 the default training
        # took longer than the searches.
        ivf.cp.niter = 10
        rng = numpy_rng(spec.seed)
        sample = base if n <= 40 * lists else base[np.sort(rng.choice(n, 40 * lists, replace=False))]
        ivf.train(sample)
        ivf.nprobe = min(lists, spec.probe)
        index = ivf
        if spec.kind == "ivf_sq8":
            index = faiss.IndexRefineFlat(ivf)
            index.k_factor = float(_REFINE)
    if n:
        index.add(base)
    if spec.kind in ("flat", "ivf") and _gpu_ok(faiss):  # faiss has no GPU HNSW or refine wrapper
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def _gpu_ok(faiss) -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _search(index, queries: np.ndarray, k: int, base_rows: int, offset: int) -> tuple[Tensor, Tensor]:
    """(q, k) cosines and global ids of the best rows of one rank's index."""
    q = queries.shape[0]
    kk = min(k, base_rows)
    cos = torch.full((q, k), -math.inf)
    ids = torch.full((q, k), -1, dtype=torch.long)
    if q and kk:
        d, i = index.search(queries, kk)
        found = torch.from_numpy(i) >= 0
        cos[:, :kk] = torch.where(found, torch.from_numpy(d), torch.tensor(-math.inf))
        ids[:, :kk] = torch.where(found, torch.from_numpy(i) + offset, torch.tensor(-1))
    return cos, ids


def _merge(cos_qx: Tensor, ids_qx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best of several lists per query: higher cosine first, then lower id (deterministic)."""
    order = ids_qx.masked_fill(ids_qx < 0, torch.iinfo(torch.long).max).argsort(dim=1, stable=True)
    cos_qx, ids_qx = cos_qx.gather(1, order), ids_qx.gather(1, order)
    order = cos_qx.argsort(dim=1, descending=True, stable=True)[:, :k]
    return cos_qx.gather(1, order), ids_qx.gather(1, order)


def knn(queries: Tensor, base: Tensor, k: int, spec: IndexSpec, comm: Exchange | None = None,
        block: int = 65_536) -> Candidates:
    """Top-k base rows by cosine for each query row. With ``comm``, ``queries`` and ``base`` are this
    rank's blocks; ids are global base rows (ranks' blocks concatenated in rank order)."""
    if k < 1:
        raise ConfigError(f"eval.topk must be >= 1, got {k}")
    q_np = F.normalize(queries.float(), dim=1).cpu().numpy()
    n_base = len(base)
    index = _build(np.ascontiguousarray(F.normalize(base.float(), dim=1).cpu().numpy()), k, spec)  # the index's copy only
    if not _many(comm):
        cos, ids = _search(index, q_np, k, n_base, 0)
        return Candidates(ids, cos)
    sizes = comm.sizes(n_base, torch.device("cpu"))
    offset = sum(sizes[: comm.rank])
    n_q = len(q_np)
    rounds = max(int(v) for v in comm.gather_rows(torch.tensor([-(-n_q // block)])).tolist())
    got_cos, got_ids = [], []
    for r in range(rounds):
        mine = torch.from_numpy(q_np[r * block:(r + 1) * block])
        q_sizes = comm.sizes(len(mine), torch.device("cpu"))
        every = comm.gather_rows(mine, q_sizes)  # all ranks' query blocks
        cos, ids = _search(index, np.ascontiguousarray(every.numpy()), k, n_base, offset)
        # back to each query's owner: (cosines, ids) of my index for its queries
        packed = torch.cat([cos.double(), ids.double()], 1)
        recv, _ = comm.all_to_all(packed, q_sizes)
        parts = recv.view(comm.world_size, len(mine), 2 * k)  # one list per rank's index
        cos_qx = parts[..., :k].permute(1, 0, 2).reshape(len(mine), -1).float()
        ids_qx = parts[..., k:].permute(1, 0, 2).reshape(len(mine), -1).long()
        c, i = _merge(cos_qx, ids_qx, k)
        got_cos.append(c)
        got_ids.append(i)
    if not got_cos:
        return Candidates(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
    return Candidates(torch.cat(got_ids), torch.cat(got_cos))


def _penalty(c: Candidates, k_csls: int) -> Tensor:
    """CSLS r(x): mean of the k_csls best candidate cosines (0 when k_csls = 0)."""
    if k_csls == 0:
        return torch.zeros(len(c.cos))
    return c.cos[:, :k_csls].clamp_min(-1.0).mean(1)


def _check(k: int, k_csls: int) -> None:
    if k_csls > k:
        raise ConfigError(f"eval.topk={k} must be >= the CSLS neighbourhood task.alignment.csls_k={k_csls}")


@dataclass(frozen=True)
class TopkScores:
    """CSLS scores of this rank's queries' candidates, both directions, and the penalties."""

    fwd: Candidates
    bwd: Candidates
    fwd_csls: Tensor  # (q_src, K)
    bwd_csls: Tensor  # (q_tgt, K)


def csls_candidates(src: Tensor, tgt: Tensor, k_csls: int, k: int, spec: IndexSpec, comm: Exchange | None = None,
                    block: int = 65_536) -> TopkScores:
    """Both directions' K cosine candidates of this rank's rows, re-scored by CSLS (best cosine first)."""
    _check(k, k_csls)
    fwd = knn(src, tgt, k, spec, comm, block)  # my sources -> all targets
    bwd = knn(tgt, src, k, spec, comm, block)  # my targets -> all sources
    r_tgt, r_src = _penalty(fwd, k_csls), _penalty(bwd, k_csls)  # of my sources / my targets
    if _many(comm):
        all_r_src, all_r_tgt = comm.gather_rows(r_src), comm.gather_rows(r_tgt)
    else:
        all_r_src, all_r_tgt = r_src, r_tgt

    def rescore(c: Candidates, mine: Tensor, other: Tensor) -> Tensor:
        other_c = other[c.ids.clamp_min(0)] if len(other) else torch.zeros_like(c.cos)
        score = 2.0 * c.cos - mine[:, None] - other_c
        return score.masked_fill(c.ids < 0, -math.inf)

    return TopkScores(fwd, bwd, rescore(fwd, r_tgt, all_r_src), rescore(bwd, r_src, all_r_tgt))


def _gold_ranks(scores: Tensor, ids: Tensor, gold: Tensor) -> Tensor:
    """1 + candidates scoring strictly above the gold one; inf where the gold is not a candidate."""
    hit = ids == gold[:, None]
    present = hit.any(1)
    gold_score = torch.where(hit, scores, torch.tensor(-math.inf)).max(1).values
    above = (scores > gold_score[:, None]) & ~hit
    ranks = 1.0 + above.sum(1).double()
    return torch.where(present, ranks, torch.tensor(_MISS, dtype=torch.float64))


def topk_alignment_ranks(src: Tensor, tgt: Tensor, k_csls: int, k: int, spec: IndexSpec,
                         comm: Exchange | None = None, block: int = 65_536) -> AlignmentRanks:
    """Truncated CSLS ranks of link i's target among link i's source's K candidates (l2r) and back
    (r2l). ``src``/``tgt`` are the embeddings of this rank's block of links (`shard_bounds` of L);
    a rank of ``inf`` means the gold entity is not among the K candidates."""
    n_links = len(src) if not _many(comm) else int(comm.reduce_sum(torch.tensor([len(src)])).item())
    lo, hi = shard_bounds(n_links, comm)
    if hi - lo != len(src) or len(tgt) != len(src):
        raise ValueError(f"rank holds {len(src)} / {len(tgt)} links, its block of {n_links} is {hi - lo}")
    s = csls_candidates(src, tgt, k_csls, k, spec, comm, block)
    gold = torch.arange(lo, hi)
    return AlignmentRanks(_gold_ranks(s.fwd_csls, s.fwd.ids, gold), _gold_ranks(s.bwd_csls, s.bwd.ids, gold))


def topk_mutual_pairs(left: Tensor, right: Tensor, left_ids: Tensor, right_ids: Tensor, k_csls: int, k: int,
                      spec: IndexSpec, comm: Exchange | None = None, block: int = 65_536) -> Tensor:
    """Mutual CSLS nearest neighbours among the candidates: entity-id pairs (P, 2), on every rank.

    ``left``/``right`` are this rank's blocks of the two sides' embeddings, ``left_ids``/``right_ids``
    their entity ids. Ties go to the lowest row, as in `neighbours.mutual_nearest_pairs`."""
    s = csls_candidates(left, right, k_csls, k, spec, comm, block)
    best_right = _best(s.fwd_csls, s.fwd.ids)  # global right row of each of my left rows (-1: none)
    best_left = _best(s.bwd_csls, s.bwd.ids)  # global left row of each of my right rows
    lo = 0
    if _many(comm):
        sizes = comm.sizes(len(left), torch.device("cpu"))
        lo = sum(sizes[: comm.rank])
        best_left = comm.gather_rows(best_left)
        all_right_ids = comm.gather_rows(right_ids.long().cpu())
    else:
        all_right_ids = right_ids.long().cpu()
    rows = torch.arange(lo, lo + len(left))
    ok = best_right >= 0
    mutual = ok & (best_left[best_right.clamp_min(0)] == rows) if len(best_left) else ok & False
    pairs = torch.stack([left_ids.long().cpu()[mutual], all_right_ids[best_right[mutual]]], 1)
    return comm.gather_rows(pairs) if _many(comm) else pairs


def _best(scores: Tensor, ids: Tensor) -> Tensor:
    """Id of the best-scoring candidate per row (lowest id among equal scores; -1 if none)."""
    if scores.shape[1] == 0:
        return torch.full((len(scores),), -1, dtype=torch.long)
    top = scores.max(1, keepdim=True).values
    masked = ids.masked_fill((scores != top) | (ids < 0), torch.iinfo(torch.long).max)
    best = masked.min(1).values
    return torch.where(best == torch.iinfo(torch.long).max, torch.tensor(-1), best)


def topk_metric_names(k: int, hits_at: Sequence[int] = DEFAULT_HITS) -> list[str]:
    return [f"hits@{h}" for h in hits_at if h <= k] + [f"mrr@{k}"]
