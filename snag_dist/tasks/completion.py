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

Every rank reads all training triples, permutes them with the (seed, epoch) generator and takes its
slice of each global batch (equal step counts on every rank); negatives use a (seed, epoch, rank)
generator. Legend: B batch, G negative groups, C positives per group, K negatives, U unique entities,
N entities, R relations, H hidden, D complex dimension.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.config import Config
from snag_dist.config.schema import CompletionConfig
from snag_dist.data.stream import read_all_rows
from snag_dist.engine.dist import generator
from snag_dist.engine.loop import Phase
from snag_dist.errors import ConfigError, DataError
from snag_dist.eval.filtered import KnownTriples, filtered_rank_stats, metrics_from_stats
from snag_dist.eval.ranking import QueryShard
from snag_dist.model.snag import SNAG, build_snag
from snag_dist.model.spec import STRUCTURE
from snag_dist.tasks.common import GraphData, load_graph

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

    def to(self, device: torch.device) -> CompletionBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return CompletionBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


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
        self.graph: GraphData | None = None  # set by the task; plain attribute, never broadcast
        self.last_weights: torch.Tensor | None = None

    def entity_vectors(self, ids_U: torch.Tensor) -> torch.Tensor:
        """(U, 2D) RotatE vectors of the fused representations of ``ids_U``."""
        g = self.graph
        if any(enc.uses_graph for enc in self.model.encoders.values()):
            out = self.model(g.ids, g.features, g.present, g.edge_index, out_index=ids_U)
        else:  # no graph encoder: only these rows are read, noised, encoded and fused
            feats = {k: v[ids_U] for k, v in g.features.items() if k in self.model.encoders}
            out = self.model(ids_U, feats, g.present[ids_U])
        self.last_weights = out.modality_weights.detach().mean(0)
        if self.ccfg.readout == "graph":
            readout = out.hidden_stack[:, out.modalities.index(STRUCTURE)]
        else:
            present = out.present[..., None].to(out.hidden_stack.dtype)
            readout = (out.hidden_stack * present).sum(1) / present.sum(1).clamp_min(1.0)
        vectors = self.projection(readout)
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
        return losses

    @torch.no_grad()
    def entity_table(self, chunk: int) -> torch.Tensor:
        """(N, 2D) clean (eval-mode) vectors of every entity, encoded ``chunk`` at a time."""
        was_training = self.training
        self.eval()
        ids = self.graph.ids
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
        dev = self.table.device
        a_re, a_im = self.rotate.anchor(self.table[anchor_c.to(dev)], rel_c.to(dev), predict_head)
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
    metric = "mrr"

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.ccfg = cfg.task.completion
        root = Path(cfg.data.shards)
        manifest, spec, graph = load_graph(root, cfg.data.store_dir)
        if manifest.task != "completion":
            raise DataError(f"{root}: shards are for '{manifest.task}', config task is completion")
        self.num_entities, self.num_relations = manifest.num_entities, manifest.num_relations
        self.triples = {s: torch.from_numpy(read_all_rows(root, f"triples/{s}")) if f"triples/{s}" in manifest.shards
                        else torch.zeros(0, 3, dtype=torch.long) for s in ("train", "valid", "test")}
        if len(self.triples["train"]) == 0:
            raise DataError(f"{root}: no training triples")
        model = build_snag(cfg.model, cfg.noise if cfg.noise.enabled else None, spec)
        self.module = CompletionModule(model, self.ccfg, self.num_relations)
        self.device = device or torch.device("cpu")
        self.module.graph = graph.to(self.device)
        train = self.triples["train"]
        self.train_known = KnownTriples(train, self.num_entities, self.num_relations)
        self.known = KnownTriples(torch.cat(list(self.triples.values())), self.num_entities, self.num_relations)
        if self.ccfg.dedupe_valid and len(self.triples["valid"]):
            # A validation triple that is also a training triple measures memorisation, not completion
            # (DB15K's published valid split is 88% training triples); it stays in the filter.
            v = self.triples["valid"]
            self.triples["valid"] = v[~self.train_known.contains(v[:, 0], v[:, 1], v[:, 2])]
        self.p_head = (head_probability(train, self.num_relations) if self.ccfg.corruption == "bernoulli"
                       else torch.full((self.num_relations,), 0.5))
        # Set by an engine that can all-reduce: evaluation then ranks 1/world of the queries per rank.
        self.reduce_sum = None
        # Every step uses the same (groups, chunk) shape, the last batch padded: one compilation.
        local = math.ceil(cfg.train.batch_size / world_size)
        self.chunk = min(self.ccfg.negative_chunk, local)
        self.module.rotate.groups = math.ceil(local / self.chunk)
        steps = self.steps_per_epoch() * cfg.train.epochs
        kernel = self.ccfg.kernel
        self.module.rotate.kernel = DistanceKernel(kernel == "compiled" or (kernel == "auto" and steps >= _COMPILE_STEPS))

    # -- schedule -----------------------------------------------------------------------------
    def phases(self, epochs: int) -> list[Phase]:
        return [Phase("base", epochs)]

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.triples["train"]) / self.cfg.train.batch_size))

    def batches(self, epoch: int) -> Iterator[CompletionBatch]:
        train = self.triples["train"]
        order = torch.randperm(len(train), generator=generator(self.cfg.train.seed, epoch))
        neg_gen = generator(self.cfg.train.seed, epoch, self.rank)
        bs = self.cfg.train.batch_size
        for start in range(0, len(train), bs):
            global_batch = train[order[start:start + bs]]
            local = global_batch[self.rank::self.world]
            if len(local) == 0:  # last global batch smaller than the world: keep step counts equal
                local = global_batch[-1:]
            yield self.make_batch(local, neg_gen).to(self.device)

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

    def evaluate(self, module: CompletionModule, split: str) -> dict[str, float]:
        triples = self.triples[split]
        if len(triples) == 0:
            extra = " not in train (task.completion.dedupe_valid)" if split == "valid" and self.ccfg.dedupe_valid else ""
            raise DataError(f"no '{split}' triples{extra} to evaluate on")
        table = module.entity_table(self.cfg.eval.chunk_size)
        n, d = self.num_entities, module.rotate.dim
        kernel = self.ccfg.kernel
        compiled = kernel == "compiled" or (kernel == "auto" and 2.0 * len(triples) * n * d >= _COMPILE_WORK)
        scorer = RotatEScorer(module.rotate, table, compiled)
        # Queries per chunk: eval.chunk_size, capped so one (chunk, N) score block stays near 256 MB.
        chunk = max(1, min(self.cfg.eval.chunk_size, (1 << 26) // n))
        shard = QueryShard(self.rank, self.world) if self.reduce_sum is not None and self.world > 1 else None
        stats = filtered_rank_stats(scorer, triples, self.known, chunk, "realistic", shard=shard)
        if shard is not None:
            stats = {key: self.reduce_sum(value) for key, value in stats.items()}
        return metrics_from_stats(stats)

    def epoch_stats(self, module: CompletionModule) -> dict[str, object]:
        if module.last_weights is None:
            return {}
        return {"modality_weights": dict(zip(module.model.modalities, module.last_weights.tolist()))}
