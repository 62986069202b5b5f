"""Training batches of KG completion: positives, their drawn negatives and the filters.

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
(unfiltered) in 55-68 % of DB15K's test queries (H@1 far below H@3). How it enters the loss is
``module.py``'s.

The stream path's filters (``triple_index``) are memory-mapped indexes built once into the store
folder (no rank holds the training triples). Legend: B batch, G negative groups, C positives per
group, K negatives, R relations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from snag_dist.data.manifest import sha256_file
from snag_dist.data.store import cached_build
from snag_dist.data.stream import read_all_rows
from snag_dist.eval.filtered import KnownTriples
from snag_dist.tasks.base import Comm


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


@dataclass(frozen=True)
class NegativeSampler:
    """Draws a batch's corrupted sides, negatives and filters; ``gen`` decides every draw."""

    num_entities: int
    negatives: int  # K per positive
    chunk: int  # C positives per negative group
    p_head: torch.Tensor  # (R,) probability of corrupting the head
    train_known: KnownTriples  # training triples (the negative and self-negative filter)
    filter_negatives: bool
    self_negatives: bool

    def make_batch(self, triples_B3: torch.Tensor, gen: torch.Generator) -> CompletionBatch:
        b, k, chunk = len(triples_B3), self.negatives, self.chunk
        groups = math.ceil(b / chunk)
        head_side = torch.rand(b, generator=gen) < self.p_head[triples_B3[:, 1]]
        negatives = torch.randint(0, self.num_entities, (groups, k), generator=gen)
        valid = torch.ones(b, k, dtype=torch.bool)
        if self.filter_negatives:
            cand, side = negatives[torch.arange(b) // chunk], head_side[:, None]
            h, r, t = (triples_B3[:, i:i + 1] for i in range(3))
            valid = ~self.train_known.contains(torch.where(side, cand, h), r, torch.where(side, t, cand))
        self_valid = None
        if self.self_negatives:
            h, r, t = triples_B3.unbind(1)
            kept = torch.where(head_side, t, h)
            self_valid = (h != t) & ~self.train_known.contains(kept, r, kept)
        return CompletionBatch(triples_B3, head_side, negatives, valid, chunk, self_valid)


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
