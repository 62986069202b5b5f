"""Multi-modal KG completion (MKGC) with SNAG: RotatE on the fused entity representation.

The entity vector is SNAG's fused output read out per `readout` ("graph": the structure token,
"mean": the mean of the present tokens), projected to 2*D reals (real and imaginary parts) by
`projection_layers` layers; a relation is D phases. The same vector serves as head and tail:
    score(h, r, t) = margin - sum_d |h_d * r_d - t_d|          (complex modulus, |r_d| = 1)
with `distance` "l1" (the RotatE paper and the reference), or margin - ||h o r - t||_2 with "l2" (PyKEEN's
RotatE): then |a - n|^2 = |a|^2 + |n|^2 - 2 a.n turns negative scoring and ranking into matrix products.
With `entity_residual`, a free per-entity vector (zero at the start) is added to the projected readout.
Loss: RotatE's self-adversarial negative sampling, -log sigmoid(score) on positives and
-sum_k w_k log sigmoid(-score_k) on negatives, w = softmax(adv_temperature * score) detached.

Negatives: each positive corrupts its head or its tail (`corruption`: the Bernoulli rule of Wang et
al. 2014, P(head | r) = tph / (tph + hpt), or 50/50) with `negatives` entities drawn uniformly. For
speed, `negative_chunk` consecutive positives share one draw (PyTorch-BigGraph's chunked negatives):
a step then encodes and fuses only the batch's entities plus B / negative_chunk * negatives sampled
ones, instead of up to B * negatives (nearly every entity of DB15K). Each positive still scores
`negatives` corruptions of its own head or tail. With `filter_negatives`, a drawn negative that forms
a known *training* triple is left out of the loss (zero adversarial weight; two `searchsorted` calls
per batch); valid/test triples are never looked at during training.

Self negatives (`self_negative`): each positive also scores the entity it keeps as the corruption
((h, r, h) for a new tail, (t, r, t) for a new head; left out when that is a known training triple or
h = t). Uniform draws almost never pick it, and the fused vectors share a large common component that
pulls relation phases towards 0: e * r then stays next to e, and the query entity itself ranked first
(unfiltered) in 55-68 % of DB15K's test queries (H@1 far below H@3). "adversarial" adds it as the (K+1)-th negative
of the self-adversarial softmax, where as the hardest negative it takes most of the weight;
"separate" adds its own -log sigmoid(-score(self)) term beside the K negatives (weight
`self_negative_weight`), so the query entity cannot take the softmax weight from the uniform ones;
"pairwise" adds -log sigmoid(score(positive) - score(self)), which only asks the true entity to
outrank the query entity.

Only the entities of a step are encoded (SNAG's structure encoder "embedding" needs no graph); a GAT
structure encoder runs over the training graph and the rest is selected with `out_index`. The
(B, K, D) negative distance, the costliest op outside the fusion, runs as one torch.compile'd loop
when `kernel` says so ("auto": for runs of >= 500 steps), with an exact eager fallback.

Evaluation: filtered ranking of heads and tails over all entities (`eval/filtered.py`, realistic
ties), where |e * r - t| = |e - t * conj(r)| makes head prediction the same kernel as tail
prediction; the (queries x N x D) distance runs compiled for large splits ("auto": >= 2e9 terms) and
in cache-sized in-place blocks otherwise. Model selection uses validation MRR; with `dedupe_valid`,
validation triples that are training triples are dropped first (88% of DB15K's published valid
split: they measure memorisation). Every rank evaluates all queries unless the engine sets
`reduce_sum` (an all-reduce of the rank sums), in which case each ranks 1/world of them.

Batches: on the full path every rank reads all training triples, permutes them with the (seed, epoch)
generator and takes its slice of each global batch (equal step counts on every rank); negatives use a
(seed, epoch, rank) generator. On the stream path (``data.mode``) each rank reads only its virtual
splits of the triple shards (``data/epoch_stream.py``), negatives are drawn per split part from a
(seed, epoch, step, split) generator, and the filters are memory-mapped indexes built once into the
store folder (no rank holds the training triples). Legend: B batch, G negative groups, C positives per group, K negatives, U unique entities,
N entities, R relations, H hidden, D complex dimension.
"""
from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.config import Config
from snag_dist.config.schema import CompletionConfig
from snag_dist.data.epoch_stream import EpochRows
from snag_dist.data.manifest import sha256_file
from snag_dist.data.store import cached_build
from snag_dist.data.stream import read_all_rows
from snag_dist.errors import ConfigError, DataError
from snag_dist.eval.filtered import COMPLETION_HITS, KnownTriples, filtered_rank_stats, metrics_from_stats
from snag_dist.eval.filtered_sharded import FileRows, full_filtered_ranks, sampled_filtered_ranks
from snag_dist.eval.metrics import rank_stats
from snag_dist.eval.shards import QueryShard, shard_bounds
from snag_dist.model.snag import SNAG
from snag_dist.model.spec import STRUCTURE
from snag_dist.seeding import generator
from snag_dist.tasks.base import Comm, LocalComm, Phase
from snag_dist.tasks.inputs import StreamInputs, build_inputs

_EPS = 1e-20  # added under the square root: zero distances keep a finite gradient (a no-op above ~1e-13)
_COMPILE_WORK = 2e9  # kernel "auto" compiles the ranking from this many query x entity x D terms
_COMPILE_STEPS = 500  # ... and the training distance from this many steps
_KERNEL_ROWS = 256  # queries per compiled ranking call (fixed, so one compilation per entity table)


# -- RotatE ------------------------------------------------------------------------------------
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
        phase = self.relation[rel] * (math.pi / self.range)
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
        (h_re, h_im), (t_re, t_im) = ent[h].chunk(2, dim=-1), ent[t].chunk(2, dim=-1)
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
                n_re, n_im = (x.contiguous() for x in ent[neg_BK].chunk(2, dim=-1))
                dist = group_distance(a_re[:, None], a_im[:, None], n_re, n_im)
            else:
                dist = l2_distance(torch.cat([a_re, a_im], -1)[:, None], ent[neg_BK])
            neg = self.margin - dist.view(b, k)
            if batch.self_valid is None:
                return pos, neg, None
            s_re, s_im = torch.where(side, t_re, h_re), torch.where(side, t_im, h_im)
            return pos, neg, self.margin - pair_distance(a_re, a_im, s_re, s_im, self.norm)
        groups = max(g, self.groups)
        neg_GK = F.pad(neg_GK, (0, 0, 0, groups - g))  # padded rows score entity rows 0, then are cut
        a_re, a_im = (F.pad(x, (0, 0, 0, groups * c - b)).view(groups, c, -1) for x in (a_re, a_im))
        if self.norm == "l1":
            n_re, n_im = (x.contiguous() for x in ent[neg_GK].chunk(2, dim=-1))
            dist = self.kernel(a_re, a_im, n_re, n_im)
        else:
            dist = l2_distance(torch.cat([a_re, a_im], -1), ent[neg_GK])
        neg = self.margin - dist.view(groups * c, k)[:b]
        if batch.self_valid is None:
            return pos, neg, None
        # The kept entity as its own corruption: |h * r - h| (new tail) or |t * conj(r) - t| (new head).
        a_re, a_im = a_re.view(groups * c, -1)[:b], a_im.view(groups * c, -1)[:b]
        s_re, s_im = torch.where(side, t_re, h_re), torch.where(side, t_im, h_im)
        own = self.margin - pair_distance(a_re, a_im, s_re, s_im, self.norm)
        return pos, neg, own


def self_adversarial_loss(pos_B: torch.Tensor, neg_BK: torch.Tensor, valid_BK: torch.Tensor,
                          temperature: float) -> dict[str, torch.Tensor]:
    """RotatE's loss; invalid (filtered) negatives get weight 0, the others share a softmax."""
    logits = neg_BK.detach() * temperature if temperature > 0 else torch.zeros_like(neg_BK)
    weights = torch.softmax(logits.masked_fill(~valid_BK, -math.inf), dim=1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a row with every negative filtered
    positive = -F.logsigmoid(pos_B).mean()
    negative = -(weights * F.logsigmoid(-neg_BK)).sum(1).mean()
    return {"loss": (positive + negative) / 2, "positive": positive.detach(), "negative": negative.detach()}


# -- batches -----------------------------------------------------------------------------------
@dataclass
class CompletionBatch:
    triples: torch.Tensor  # (B, 3) head, relation, tail
    head_side: torch.Tensor  # (B,) bool: the head is corrupted (else the tail)
    negatives: torch.Tensor  # (G, K) entity ids; positive i uses group i // chunk
    valid: torch.Tensor  # (B, K) bool: False for a negative that forms a known training triple
    chunk: int  # C
    self_valid: torch.Tensor | None = None  # (B,) bool: the kept entity scores as a self negative
    group: torch.Tensor | None = None  # (B,) negative group of each positive when not i // chunk
    weight: float = 1.0  # loss multiplier: local rows x world / global rows (stream path), 0 for a repeat

    def to(self, device: torch.device) -> CompletionBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return CompletionBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    @staticmethod
    def concat(parts: list[CompletionBatch]) -> CompletionBatch:
        """One batch of several parts (the stream's splits), each with its own negative groups."""
        if len(parts) == 1:
            return parts[0]
        chunk = parts[0].chunk
        group, offset = [], 0
        for p in parts:
            group.append(torch.arange(len(p.triples)) // chunk + offset)
            offset += p.negatives.shape[0]
        group_B = torch.cat(group)
        plain = bool(torch.equal(group_B, torch.arange(len(group_B)) // chunk))
        self_valid = None if parts[0].self_valid is None else torch.cat([p.self_valid for p in parts])
        return CompletionBatch(torch.cat([p.triples for p in parts]), torch.cat([p.head_side for p in parts]),
                               torch.cat([p.negatives for p in parts]), torch.cat([p.valid for p in parts]),
                               chunk, self_valid, None if plain else group_B, parts[0].weight)


def head_probability(train_T3: torch.Tensor, num_relations: int) -> torch.Tensor:
    """(R,) Bernoulli rule: P(corrupt head | r) = tph / (tph + hpt), tails per head / heads per tail."""
    h, r, t = train_T3.unbind(1)
    per_rel = torch.bincount(r, minlength=num_relations).double()
    heads = torch.bincount(torch.unique(h * num_relations + r) % num_relations, minlength=num_relations)
    tails = torch.bincount(torch.unique(t * num_relations + r) % num_relations, minlength=num_relations)
    tph = per_rel / heads.clamp_min(1)
    hpt = per_rel / tails.clamp_min(1)
    return torch.where(per_rel > 0, tph / (tph + hpt).clamp_min(1e-12), 0.5).float()


# -- the trained module ------------------------------------------------------------------------
class CompletionModule(nn.Module):
    """SNAG + readout projection + RotatE. ``forward(batch) -> losses``."""

    def __init__(self, model: SNAG, ccfg: CompletionConfig, num_relations: int) -> None:
        super().__init__()
        hidden = model.cfg.hidden
        dim = ccfg.dim or hidden // 2
        if ccfg.readout == "graph" and STRUCTURE not in model.modalities:
            raise ConfigError("task.completion.readout=graph reads the structure token; add 'structure' to "
                              "model.modalities or use readout=mean")
        self.model, self.ccfg = model, ccfg
        self.rotate = RotatE(num_relations, dim, ccfg.margin, ccfg.distance)
        layers: list[nn.Module] = []
        for _ in range(ccfg.projection_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        last = nn.Linear(hidden, 2 * dim)
        # Start at RotatE's scale: coordinates ~U(-range, range) for unit-variance (LayerNorm) inputs,
        # so initial distances are near the margin instead of ~10x above it.
        nn.init.uniform_(last.weight, -self.rotate.range / math.sqrt(hidden), self.rotate.range / math.sqrt(hidden))
        nn.init.zeros_(last.bias)
        self.projection = nn.Sequential(*layers, last)
        # Optional free per-entity correction on top of the fused vector (starts at 0: pure SNAG).
        self.residual: nn.Embedding | None = None
        if ccfg.entity_residual:
            self.residual = nn.Embedding(model.spec.num_entities, 2 * dim)
            nn.init.zeros_(self.residual.weight)
        self.inputs = None  # set by the task (tasks/inputs.py); plain attribute, never broadcast
        self.last_weights: torch.Tensor | None = None

    def entity_vectors(self, ids_U: torch.Tensor) -> torch.Tensor:
        """(U, 2D) RotatE vectors of the fused representations of ``ids_U``."""
        out = self.inputs.encode(self.model, ids_U)
        self.last_weights = out.modality_weights.detach().mean(0)
        if self.ccfg.readout == "graph":
            readout = out.hidden_stack[:, out.modalities.index(STRUCTURE)]
        else:
            present = out.present[..., None].to(out.hidden_stack.dtype)
            readout = (out.hidden_stack * present).sum(1) / present.sum(1).clamp_min(1.0)
        # RotatE distances stay in float32 under bf16/fp16 autocast: a sum of 128 moduli in bf16 keeps
        # ~3 digits, too few to rank 15K candidates; only the encoders and fusion run in half precision.
        vectors = self.projection(readout).float()
        if self.residual is not None:
            vectors = vectors + self.residual(ids_U)
        return vectors

    def forward(self, batch: CompletionBatch) -> dict[str, torch.Tensor]:
        b = batch.triples.shape[0]
        ids = torch.cat([batch.triples[:, 0], batch.triples[:, 2], batch.negatives.flatten()])
        uniq_U, inv = torch.unique(ids, return_inverse=True)
        ent = self.entity_vectors(uniq_U)
        pos, neg, own = self.rotate.train_scores(ent, batch, inv[:b], inv[b:2 * b],
                                                 inv[2 * b:].view_as(batch.negatives))
        valid = batch.valid
        if own is not None and self.ccfg.self_negative == "adversarial":
            neg, valid = torch.cat([neg, own[:, None]], 1), torch.cat([valid, batch.self_valid[:, None]], 1)
        losses = self_adversarial_loss(pos, neg, valid, self.ccfg.adv_temperature)
        if own is not None and self.ccfg.self_negative in ("separate", "pairwise"):
            keep = batch.self_valid.to(pos.dtype)
            term = F.logsigmoid(pos - own) if self.ccfg.self_negative == "pairwise" else F.logsigmoid(-own)
            term = -(term * keep).sum() / keep.sum().clamp_min(1.0)
            losses["loss"] = losses["loss"] + self.ccfg.self_negative_weight * term / 2
            losses["self"] = term.detach()
        if batch.weight != 1.0:  # the data-parallel mean over ranks is then the global batch's mean
            losses = {k: v * batch.weight for k, v in losses.items()}
        return losses

    @torch.no_grad()
    def entity_table(self, chunk: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 2D) clean (eval-mode) vectors of every entity (or of ``ids``), encoded ``chunk`` at a time."""
        was_training = self.training
        self.eval()
        ids = torch.arange(self.inputs.num_entities) if ids is None else ids
        table = torch.cat([self.entity_vectors(ids[a:a + chunk]) for a in range(0, len(ids), chunk)]).float()
        self.train(was_training)
        return table


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


# -- the task ----------------------------------------------------------------------------------
class CompletionTask:

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 comm: Comm | None = None) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.comm = comm or LocalComm()
        self.ccfg = cfg.task.completion
        self.device = device or torch.device("cpu")
        root = Path(cfg.data.shards)
        manifest, spec, model, self.inputs = build_inputs(cfg, self.comm, self.device, "triples/train")
        if manifest.task != "completion":
            raise DataError(f"{root}: shards are for '{manifest.task}', config task is completion")
        self.stream = isinstance(self.inputs, StreamInputs)
        self.table = self.inputs.table  # row-sharded structure table (stream) or None
        self.num_entities, self.num_relations = manifest.num_entities, manifest.num_relations
        splits = ("valid", "test") if self.stream else ("train", "valid", "test")
        self.triples = {s: torch.from_numpy(read_all_rows(root, f"triples/{s}")) if f"triples/{s}" in manifest.shards
                        else torch.zeros(0, 3, dtype=torch.long) for s in splits}
        if "triples/train" not in manifest.shards or not manifest.shards["triples/train"]:
            raise DataError(f"{root}: no training triples")
        self.module = CompletionModule(model, self.ccfg, self.num_relations)
        self.module.inputs = self.inputs
        local = math.ceil(cfg.train.batch_size / world_size)
        self.chunk = min(self.ccfg.negative_chunk, local)
        if self.stream:
            self.rows = EpochRows(root, "triples/train", batch_size=cfg.train.batch_size, rank=rank,
                                  world_size=world_size, splits=cfg.data.stream_splits, workers=cfg.data.num_workers,
                                  seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer)
            self.chunk = min(self.ccfg.negative_chunk, self.rows.part)
            self.rows.align(self.chunk)  # parts of whole negative groups
            self.train_known, self.known, self.p_head = triple_index(root, cfg.data.store_dir, manifest, self.comm,
                                                                     self.ccfg.corruption)
        else:
            train = self.triples["train"]
            self.train_known = KnownTriples(train, self.num_entities, self.num_relations)
            self.known = KnownTriples(torch.cat(list(self.triples.values())), self.num_entities, self.num_relations)
            self.p_head = (head_probability(train, self.num_relations) if self.ccfg.corruption == "bernoulli"
                           else torch.full((self.num_relations,), 0.5))
        if self.ccfg.dedupe_valid and len(self.triples["valid"]):
            # A validation triple that is also a training triple measures memorisation, not completion
            # (DB15K's published valid split is 88% training triples); it stays in the filter.
            v = self.triples["valid"]
            self.triples["valid"] = v[~self.train_known.contains(v[:, 0], v[:, 1], v[:, 2])]
        # Set by an engine that can all-reduce: evaluation then ranks 1/world of the queries per rank.
        self.reduce_sum = self.comm.reduce_sum if self.comm.active else None
        # Every step uses the same (groups, chunk) shape, the last batch padded: one compilation.
        self.module.rotate.groups = math.ceil(local / self.chunk)
        steps = self.steps_per_epoch() * cfg.train.epochs
        kernel = self.ccfg.kernel
        self.module.rotate.kernel = DistanceKernel(kernel == "compiled" or (kernel == "auto" and steps >= _COMPILE_STEPS))

    def attach(self, comm: Comm) -> None:
        """Collectives are injected at construction (``comm=``); kept for the TrainTask protocol."""
        self.comm = comm
        self.reduce_sum = comm.reduce_sum if comm.active else None

    # -- schedule -----------------------------------------------------------------------------
    def phases(self, epochs: int) -> list[Phase]:
        return [Phase("base", epochs)]

    def steps_per_epoch(self) -> int:
        if self.stream:
            steps = self.rows.steps(0)
        else:
            steps = max(1, math.ceil(len(self.triples["train"]) / self.cfg.train.batch_size))
        cap = self.cfg.train.steps_per_epoch
        return min(steps, cap) if cap else steps

    def batches(self, epoch: int, start: int = 0) -> Iterator[CompletionBatch]:
        if self.stream:
            yield from self._stream_batches(epoch, start)
            return
        train = self.triples["train"]
        order = torch.randperm(len(train), generator=generator(self.cfg.train.seed, epoch))
        neg_gen = generator(self.cfg.train.seed, epoch, self.rank)
        bs = self.cfg.train.batch_size
        for step, begin in enumerate(range(0, len(train), bs)):
            if step >= self.steps_per_epoch():
                return
            global_batch = train[order[begin:begin + bs]]
            local = global_batch[self.rank::self.world]
            if len(local) == 0:  # last global batch smaller than the world: keep step counts equal
                local = global_batch[-1:]
            batch = self.make_batch(local, neg_gen)  # drawn even when skipped: same negatives after a resume
            if step >= start:
                yield batch.to(self.device)

    def _stream_batches(self, epoch: int, start: int) -> Iterator[CompletionBatch]:
        """This rank's splits' parts; negatives seeded by (seed, epoch, step, split), so a part draws
        the same negatives whichever process reads it."""
        seed, total = self.cfg.train.seed, self.steps_per_epoch()
        global_rows = self.rows.global_rows(epoch)
        for step, local in enumerate(self.rows.local_steps(epoch, start), start=start):
            if step >= total:
                return
            parts = [self.make_batch(torch.from_numpy(rows), generator(seed, epoch, step, split))
                     for split, rows in zip(local.splits, local.parts) if len(rows)]
            batch = CompletionBatch.concat(parts)
            # Each rank's loss is a mean over its rows; weighting it by its share of the global batch
            # makes the ranks' mean the global batch's mean (any split sizes), and a repeated part
            # (a rank whose splits ran dry) count for nothing.
            rows = len(batch.triples)
            batch.weight = 0.0 if local.repeated else rows * self.comm.world_size / global_rows[step]
            self.inputs.set_position(epoch, step)
            yield batch.to(self.device)

    def make_batch(self, triples_B3: torch.Tensor, gen: torch.Generator) -> CompletionBatch:
        b, k, chunk = len(triples_B3), self.ccfg.negatives, self.chunk
        groups = math.ceil(b / chunk)
        head_side = torch.rand(b, generator=gen) < self.p_head[triples_B3[:, 1]]
        negatives = torch.randint(0, self.num_entities, (groups, k), generator=gen)
        valid = torch.ones(b, k, dtype=torch.bool)
        if self.ccfg.filter_negatives:
            cand, side = negatives[torch.arange(b) // chunk], head_side[:, None]
            h, r, t = (triples_B3[:, i:i + 1] for i in range(3))
            valid = ~self.train_known.contains(torch.where(side, cand, h), r, torch.where(side, t, cand))
        self_valid = None
        if self.ccfg.self_negative != "none":
            h, r, t = triples_B3.unbind(1)
            kept = torch.where(head_side, t, h)
            self_valid = (h != t) & ~self.train_known.contains(kept, r, kept)
        return CompletionBatch(triples_B3, head_side, negatives, valid, chunk, self_valid)

    # -- hooks --------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, module: nn.Module, phase: Phase) -> None:
        module.model.resample_noise(epoch, self.cfg.train.seed)
        if self.table is not None:
            set_structure_noise_stats(module.model, self.table)

    @staticmethod
    def metric_for(cfg: Config) -> str:
        """The selection metric of a run of ``cfg`` (what the engine and `snag-dist tune` maximise)."""
        k = cfg.eval.completion_candidates
        return "mrr" if k == 0 else f"sampled-{k}/mrr"

    @property
    def metric(self) -> str:
        return self.metric_for(self.cfg)

    def evaluate(self, module: CompletionModule, split: str) -> dict[str, float | str]:
        triples = self.triples[split]
        if len(triples) == 0:
            extra = " not in train (task.completion.dedupe_valid)" if split == "valid" and self.ccfg.dedupe_valid else ""
            raise DataError(f"no '{split}' triples{extra} to evaluate on")
        limit = self.cfg.eval.max_queries
        if limit and limit < len(triples):
            triples = triples[:limit]
        start, self._embed_seconds = time.perf_counter(), math.nan
        if self.stream or self.cfg.eval.completion_candidates:
            stats, protocol = self._evaluate_sharded(module, triples)
        else:
            stats, protocol = self._evaluate_gathered(module, triples), "full-filtered"
        rank_seconds = time.perf_counter() - start - (0.0 if math.isnan(self._embed_seconds) else self._embed_seconds)
        metrics: dict[str, float | str] = dict(metrics_from_stats(stats))
        if protocol != "full-filtered":  # ranks among K sampled entities: never under the full names
            metrics = {f"{protocol}/{key}": value for key, value in metrics.items()}
        metrics["protocol"] = protocol
        metrics["queries"] = float(len(triples))
        # timings stay out of the metrics (metrics rows are deterministic); `snag-dist eval` reports them
        self.eval_seconds = {"rank_seconds": rank_seconds}
        if not math.isnan(self._embed_seconds):
            self.eval_seconds["embed_seconds"] = self._embed_seconds
        return metrics

    def _evaluate_gathered(self, module: CompletionModule, triples: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full path: every rank holds all N vectors and ranks its share of the queries."""
        table = self._entity_table(module)
        n, d = self.num_entities, module.rotate.dim
        kernel = self.ccfg.kernel
        compiled = kernel == "compiled" or (kernel == "auto" and 2.0 * len(triples) * n * d >= _COMPILE_WORK)
        scorer = RotatEScorer(module.rotate, table, compiled)
        # Queries per chunk: eval.chunk_size, capped so one (chunk, N) score block stays near 256 MB.
        chunk = max(1, min(self.cfg.eval.chunk_size, (1 << 26) // n))
        shard = QueryShard(self.comm.rank, self.comm.world_size) if self.reduce_sum is not None else None
        stats = filtered_rank_stats(scorer, triples, self.known, chunk, "realistic", shard=shard)
        if shard is not None:
            stats = {key: self.reduce_sum(value) for key, value in stats.items()}
        return stats

    def _evaluate_sharded(self, module: CompletionModule, triples: torch.Tensor,
                          ) -> tuple[dict[str, torch.Tensor], str]:
        """Stream path (or sampled candidates): each rank holds its block of the entity vectors and ranks
        its block of the queries (eval/filtered_sharded.py); memory flat in N beyond that block."""
        with tempfile.TemporaryDirectory(prefix="snag-eval-") as tmp:
            start = time.perf_counter()
            mine = self._my_vectors(module, Path(tmp) / "vectors.f32" if self._spill(module) else None)
            self._embed_seconds = time.perf_counter() - start
            return self._rank_sharded(module, mine, triples)

    def _spill(self, module: CompletionModule) -> bool:
        """Whether this rank's block of vectors goes to a file while ranking (``eval.spill_mib``)."""
        from snag_dist.data.store import partition_range

        lo, hi = partition_range(self.num_entities, self.comm.rank, self.comm.world_size)
        limit = self.cfg.eval.spill_mib
        return limit > 0 and (hi - lo) * 2 * module.rotate.dim * 4 > limit * 2**20

    def _rank_sharded(self, module: CompletionModule, mine: torch.Tensor | FileRows, triples: torch.Tensor,
                      ) -> tuple[dict[str, torch.Tensor], str]:
        comm = self.comm
        lo, hi = shard_bounds(len(triples), comm if comm.active else None)
        kernel, d = self.ccfg.kernel, module.rotate.dim
        work = 2.0 * len(triples) * self.num_entities * d / comm.world_size
        compiled = kernel == "compiled" or (kernel == "auto" and work >= _COMPILE_WORK)

        def block_score(anchor: torch.Tensor, rel: torch.Tensor, predict_head: bool, cand: torch.Tensor) -> torch.Tensor:
            return RotatEScorer(module.rotate, cand, compiled).score_vectors(anchor, rel, predict_head)

        k = self.cfg.eval.completion_candidates
        if k:
            ranks = sampled_filtered_ranks(block_score, mine, triples[lo:hi], lo, self.known, k,
                                           self.cfg.train.seed, comm)
        else:
            chunk = max(1, min(self.cfg.eval.chunk_size, 1024))
            block = max(256, (1 << 26) // (chunk * comm.world_size))  # one (chunk, W x block) score block ~256 MB
            ranks = full_filtered_ranks(block_score, mine, triples[lo:hi], self.known, chunk, block, comm)
        stats = {"head": rank_stats(ranks.head, COMPLETION_HITS), "tail": rank_stats(ranks.tail, COMPLETION_HITS)}
        stats = {key: comm.reduce_sum(value) for key, value in stats.items()}
        return stats, f"sampled-{k}" if k else "full-filtered"

    def _entity_table(self, module: CompletionModule) -> torch.Tensor:
        """(N, 2D) vectors of every entity on every rank (the full path's gathered evaluation)."""
        return self.comm.gather_rows(self._my_vectors(module)) if self.stream else module.entity_table(
            self.cfg.eval.chunk_size)

    def _my_vectors(self, module: CompletionModule, spill: Path | None = None) -> torch.Tensor | FileRows:
        """This rank's contiguous block of the (N, 2D) entity vectors (`partition_range`), in memory or,
        with ``spill``, written to that file. On the stream path each rank encodes only its block, with
        the same number of model calls on every rank (the sharded table exchanges rows on every call);
        the full path encodes all and slices."""
        from snag_dist.data.store import partition_range

        lo, hi = partition_range(self.num_entities, self.comm.rank, self.comm.world_size)
        chunk, width = self.cfg.eval.chunk_size, 2 * module.rotate.dim
        if not self.stream:
            mine = module.entity_table(chunk)[lo:hi]
            return mine if spill is None else FileRows.write(spill, [mine], width, mine.device)
        spans = [(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]
        rounds = max(int(v) for v in self.comm.gather_rows(torch.tensor([len(spans)])).tolist())

        def blocks():
            for i in range(rounds):  # equal call counts on every rank (the table exchanges rows)
                a, b = spans[i] if i < len(spans) else (lo, min(lo + 1, hi))
                rows = module.entity_table(chunk, torch.arange(a, b))
                if self.table is not None:
                    self.table.release()  # a table read from its checkpoint: its pages leave the RSS
                if i < len(spans):
                    yield rows

        device = next(module.parameters()).device
        if spill is not None:
            return FileRows.write(spill, blocks(), width, device)
        out = torch.empty(hi - lo, width, device=device)  # filled in place: no list + cat (2x the block)
        for rows, (a, b) in zip(blocks(), spans):
            out[a - lo:b - lo] = rows
        return out

    def epoch_stats(self, module: CompletionModule) -> dict[str, object]:
        if module.last_weights is None:
            return {}
        return {"modality_weights": dict(zip(module.model.modalities, module.last_weights.tolist()))}


def set_structure_noise_stats(model: SNAG, table) -> None:
    """GMNM's structure statistics from the sharded table (the full path takes them from its
    nn.Embedding in ``resample_noise``): per-dimension mean/std summed over every rank's rows."""
    noise = model.noise
    if noise is None or STRUCTURE not in noise.names:
        return
    mean, std = table.moments()
    noise.set_stats(STRUCTURE, mean, std)


def triple_index(root: Path, store_dir: str, manifest, comm: Comm, corruption: str,
                 ) -> tuple[KnownTriples, KnownTriples, torch.Tensor]:
    """The stream path's filters, built once into the store folder by rank 0 (holding the triples
    for the build only) and memory-mapped by every rank: training triples (negative filter),
    all known triples (evaluation filter), and the Bernoulli head probability per relation."""
    base = Path(store_dir) if store_dir else root / ".store"

    def build(tmp: Path) -> dict:
        (tmp / "train").mkdir()
        (tmp / "all").mkdir()
        n, r = manifest.num_entities, manifest.num_relations
        train = torch.from_numpy(read_all_rows(root, "triples/train"))
        KnownTriples(train, n, r).save(tmp / "train")
        np.save(tmp / "p_head.npy", head_probability(train, r).numpy())
        rest = [torch.from_numpy(read_all_rows(root, f"triples/{s}")) for s in ("valid", "test")
                if f"triples/{s}" in manifest.shards]
        KnownTriples(torch.cat([train, *rest]), n, r).save(tmp / "all")
        return {}

    folder = base / "known"
    if comm.rank == 0:
        cached_build(folder, "index.json", sha256_file(root / "manifest.json"), build)
    comm.reduce_sum(torch.zeros(1))  # the others wait for rank 0's build
    p_head = torch.from_numpy(np.load(folder / "p_head.npy"))
    if corruption != "bernoulli":
        p_head = torch.full_like(p_head, 0.5)
    return KnownTriples.load(folder / "train"), KnownTriples.load(folder / "all"), p_head
