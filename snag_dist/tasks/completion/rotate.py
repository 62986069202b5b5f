"""RotatE on the fused entity vectors: relation rotations, distances and their kernels, the scorer.

An entity vector is 2*D reals (real and imaginary parts); a relation is D phases. The same vector
serves as head and tail:
    score(h, r, t) = margin - sum_d |h_d * r_d - t_d|          (complex modulus, |r_d| = 1)
with `distance` "l1" (the RotatE paper and the reference), or margin - ||h o r - t||_2 with "l2" (PyKEEN's
RotatE): then |a - n|^2 = |a|^2 + |n|^2 - 2 a.n turns negative scoring and ranking into matrix products.
|e * r - t| = |e - t * conj(r)| makes head prediction the same kernel as tail prediction.

The (B, K, D) negative distance of a step, the costliest op outside the fusion, runs as one
torch.compile'd loop when `kernel` says so ("auto": for runs of >= 500 steps); the (queries x N x D)
ranking distance runs compiled for large splits ("auto": >= 2e9 terms) and in cache-sized in-place
blocks otherwise; both fall back to exact eager code when compiling fails.
Legend: B batch, G negative groups, C positives per group, K negatives, N entities, R relations,
D complex dimension.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.tasks.completion.negatives import CompletionBatch

_EPS = 1e-20  # added under the square root: zero distances keep a finite gradient (a no-op above ~1e-13)
_COMPILE_WORK = 2e9  # kernel "auto" compiles the ranking from this many query x entity x D terms
_COMPILE_STEPS = 500  # ... and the training distance from this many steps
_KERNEL_ROWS = 256  # queries per compiled ranking call (fixed, so one compilation per entity table)


def compiled_for_training(kernel: str, steps: int) -> bool:
    """Whether ``task.completion.kernel`` compiles the training distance of a run of ``steps`` steps."""
    return kernel == "compiled" or (kernel == "auto" and steps >= _COMPILE_STEPS)


def compiled_for_ranking(kernel: str, work: float) -> bool:
    """Whether ``task.completion.kernel`` compiles a ranking of ``work`` query x entity x D terms."""
    return kernel == "compiled" or (kernel == "auto" and work >= _COMPILE_WORK)


def group_distance(a_re: torch.Tensor, a_im: torch.Tensor, n_re: torch.Tensor, n_im: torch.Tensor) -> torch.Tensor:
    """sum_d |a_d - n_d| for every (group, query, candidate): (G, C, D) x (G, K, D) -> (G, C, K)."""
    dr = a_re[:, :, None, :] - n_re[:, None]
    di = a_im[:, :, None, :] - n_im[:, None]
    return torch.sqrt(dr * dr + di * di + _EPS).sum(-1)


def pair_distance(x_re: torch.Tensor, x_im: torch.Tensor, y_re: torch.Tensor, y_im: torch.Tensor,
                  norm: str) -> torch.Tensor:
    """|x - y| row by row: sum_d |x_d - y_d| ("l1") or sqrt(sum_d |x_d - y_d|^2) ("l2")."""
    sq = (x_re - y_re) ** 2 + (x_im - y_im) ** 2
    return torch.sqrt(sq + _EPS).sum(-1) if norm == "l1" else torch.sqrt(sq.sum(-1) + _EPS)


def rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for any index shape, as ``index_select``: the same values and gradients, with a
    backward that is an ``index_add_`` instead of advanced indexing's accumulating ``index_put_``, which
    on CPU was the largest single cost of a structure-only bf16 step (benchmarks/RESULTS.md §4)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def l2_distance(a_2D: torch.Tensor, n_2D: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every query to every candidate by one matrix product per group:
    |a - n|^2 = |a|^2 + |n|^2 - 2 a.n; (..., C, 2D) x (..., K, 2D) -> (..., C, K)."""
    sq = (a_2D * a_2D).sum(-1)[..., :, None] + (n_2D * n_2D).sum(-1)[..., None, :] - 2 * a_2D @ n_2D.transpose(-1, -2)
    return torch.sqrt(sq.clamp_min(0.0) + _EPS)


class DistanceKernel:
    """`group_distance`, eager or torch.compile'd (one fused loop instead of ~10 passes over a
    (G, C, K, D) tensor forward and ~20 backward); falls back to eager if compiling fails."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self._fn = None

    def fn(self):
        """The compiled function (compiled lazily, on first call; may raise)."""
        if self._fn is None:
            self._fn = torch.compile(group_distance, dynamic=False)
        return self._fn

    def disable(self, exc: Exception) -> None:
        warnings.warn(f"compiled RotatE kernel unavailable ({type(exc).__name__}: {exc}); using eager", stacklevel=3)
        self.compiled = False

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            try:
                return self.fn()(*args)
            except Exception as exc:  # no C++ compiler, unsupported device, ...: eager is exact too
                self.disable(exc)
        return group_distance(*args)


class RotatE(nn.Module):
    """Relation phases (R, D); relations are stored in units of RotatE's embedding range so Adam
    moves phases as fast as in the original ((margin + 2) / D = pi). ``norm``: "l1" scores
    margin - sum_d |h_d r_d - t_d| (the RotatE paper), "l2" margin - ||h o r - t||_2 (PyKEEN)."""

    def __init__(self, num_relations: int, dim: int, margin: float, norm: str = "l1") -> None:
        super().__init__()
        self.margin, self.dim, self.norm = margin, dim, norm
        self.range = (margin + 2.0) / dim
        self.relation = nn.Parameter(torch.empty(num_relations, dim).uniform_(-self.range, self.range))
        self.kernel = DistanceKernel(compiled=False)  # training distance; the task may compile it
        self.groups = 0  # pad negative groups to this many so compiled shapes never change

    def rotation(self, rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phase = rows(self.relation, rel) * (math.pi / self.range)
        return torch.cos(phase), torch.sin(phase)

    @staticmethod
    def rotate(re: torch.Tensor, im: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        return re * cos - im * sin, re * sin + im * cos

    def anchor(self, ent: torch.Tensor, rel: torch.Tensor, inverse: bool) -> tuple:
        """(re, im) of e * r (inverse False) or e * conj(r) (True)."""
        cos, sin = self.rotation(rel)
        return self.rotate(*ent.chunk(2, dim=-1), cos, -sin if inverse else sin)

    def train_scores(self, ent: torch.Tensor, batch: CompletionBatch, h: torch.Tensor, t: torch.Tensor,
                     neg_GK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Positive (B,), negative (B, K) and, if the batch has self negatives, self (B,) scores;
        ent (U, 2D), h/t/neg_GK index rows of ent."""
        cos, sin = self.rotation(batch.triples[:, 1])
        (h_re, h_im), (t_re, t_im) = rows(ent, h).chunk(2, dim=-1), rows(ent, t).chunk(2, dim=-1)
        hr_re, hr_im = self.rotate(h_re, h_im, cos, sin)
        pos = self.margin - pair_distance(hr_re, hr_im, t_re, t_im, self.norm)
        # The corrupted side is compared with the other side moved through r: h * r for a new tail,
        # t * conj(r) for a new head (|e * r - t| = |e - t * conj(r)|).
        side = batch.head_side[:, None]
        a_re, a_im = self.rotate(torch.where(side, t_re, h_re), torch.where(side, t_im, h_im), cos,
                                 torch.where(side, -sin, sin))
        b, (g, k), c = a_re.shape[0], neg_GK.shape, batch.chunk
        if batch.group is not None:  # parts of several splits: each positive names its group
            neg_BK = neg_GK[batch.group]
            if self.norm == "l1":
                n_re, n_im = (x.contiguous() for x in rows(ent, neg_BK).chunk(2, dim=-1))
                dist = group_distance(a_re[:, None], a_im[:, None], n_re, n_im)
            else:
                dist = l2_distance(torch.cat([a_re, a_im], -1)[:, None], rows(ent, neg_BK))
            neg = self.margin - dist.view(b, k)
            if batch.self_valid is None:
                return pos, neg, None
            s_re, s_im = torch.where(side, t_re, h_re), torch.where(side, t_im, h_im)
            return pos, neg, self.margin - pair_distance(a_re, a_im, s_re, s_im, self.norm)
        groups = max(g, self.groups)
        neg_GK = F.pad(neg_GK, (0, 0, 0, groups - g))  # padded rows score entity rows 0, then are cut
        a_re, a_im = (F.pad(x, (0, 0, 0, groups * c - b)).view(groups, c, -1) for x in (a_re, a_im))
        if self.norm == "l1":
            n_re, n_im = (x.contiguous() for x in rows(ent, neg_GK).chunk(2, dim=-1))
            dist = self.kernel(a_re, a_im, n_re, n_im)
        else:
            dist = l2_distance(torch.cat([a_re, a_im], -1), rows(ent, neg_GK))
        neg = self.margin - dist.view(groups * c, k)[:b]
        if batch.self_valid is None:
            return pos, neg, None
        # The kept entity as its own corruption: |h * r - h| (new tail) or |t * conj(r) - t| (new head).
        a_re, a_im = a_re.view(groups * c, -1)[:b], a_im.view(groups * c, -1)[:b]
        s_re, s_im = torch.where(side, t_re, h_re), torch.where(side, t_im, h_im)
        own = self.margin - pair_distance(a_re, a_im, s_re, s_im, self.norm)
        return pos, neg, own


class RotatEScorer:
    """score_fn for `eval.filtered`: margin - sum_d |anchor * r - e| over all entities."""

    def __init__(self, rotate: RotatE, table_N2D: torch.Tensor, compiled: bool) -> None:
        self.rotate, self.table = rotate, table_N2D
        self.e_re, self.e_im = (x.contiguous()[None] for x in table_N2D.chunk(2, dim=-1))  # (1, N, D)
        self.kernel = DistanceKernel(compiled)
        # |e|^2 per entity: the l2 distance is |a|^2 + |e|^2 - 2 a.e
        self.sq_norms = (table_N2D * table_N2D).sum(-1) if rotate.norm == "l2" else None

    @torch.no_grad()
    def __call__(self, anchor_c: torch.Tensor, rel_c: torch.Tensor, predict_head: bool) -> torch.Tensor:
        return self.score_vectors(self.table[anchor_c.to(self.table.device)], rel_c, predict_head)

    @torch.no_grad()
    def score_vectors(self, anchor_c2D: torch.Tensor, rel_c: torch.Tensor, predict_head: bool) -> torch.Tensor:
        """(c, N) scores of every table row as the missing entity, given the anchors' vectors."""
        dev = self.table.device
        a_re, a_im = self.rotate.anchor(anchor_c2D.to(dev), rel_c.to(dev), predict_head)
        a_re, a_im = a_re.float().contiguous(), a_im.float().contiguous()
        if self.rotate.norm == "l2":
            return self._l2(torch.cat([a_re, a_im], -1))
        if self.kernel.compiled:
            try:
                return self.rotate.margin - self._compiled(a_re, a_im)
            except Exception as exc:  # no C++ compiler, unsupported device, ...: eager is exact too
                self.kernel.disable(exc)
        return self.rotate.margin - self._eager(a_re, a_im)

    def _l2(self, a_2D: torch.Tensor) -> torch.Tensor:
        """margin - ||a - e||_2 for every entity e: one product, then in-place passes over the block."""
        out = torch.addmm(self.sq_norms[None].expand(a_2D.shape[0], -1), a_2D, self.table.T, alpha=-2.0)
        out.add_((a_2D * a_2D).sum(-1, keepdim=True)).clamp_min_(0.0).add_(_EPS).sqrt_()
        return out.neg_().add_(self.rotate.margin)

    def _compiled(self, a_re: torch.Tensor, a_im: torch.Tensor) -> torch.Tensor:
        """Fixed-size blocks of queries (the last one padded): one compilation per entity table."""
        fn, out = self.kernel.fn(), []
        for i in range(0, a_re.shape[0], _KERNEL_ROWS):
            pad = max(0, i + _KERNEL_ROWS - a_re.shape[0])
            part_re, part_im = (F.pad(x[i:i + _KERNEL_ROWS], (0, 0, 0, pad))[None] for x in (a_re, a_im))
            out.append(fn(part_re, part_im, self.e_re, self.e_im)[0, :_KERNEL_ROWS - pad])
        return torch.cat(out)

    def _eager(self, a_re: torch.Tensor, a_im: torch.Tensor) -> torch.Tensor:
        """In-place passes over (rows, N, D) blocks of ~256K terms, small enough to stay in cache."""
        e_re, e_im = self.e_re[0], self.e_im[0]
        n, d = e_re.shape
        rows = max(1, (1 << 18) // (n * d))
        out = a_re.new_empty(a_re.shape[0], n)
        dr, di = a_re.new_empty(rows, n, d), a_re.new_empty(rows, n, d)
        for i in range(0, a_re.shape[0], rows):
            r = min(rows, a_re.shape[0] - i)
            x, y = dr[:r], di[:r]
            torch.sub(a_re[i:i + r, None], e_re, out=x)
            torch.sub(a_im[i:i + r, None], e_im, out=y)
            x.mul_(x).add_(y.mul_(y)).add_(_EPS).sqrt_()
            torch.sum(x, -1, out=out[i:i + r])
        return out
