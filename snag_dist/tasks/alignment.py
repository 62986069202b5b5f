"""Multi-modal entity alignment (MMEA) with SNAG: GMI + ECIA + IIR, CSLS evaluation, iterative learning.

Full path (``data.mode``): each step runs the structure encoder (GAT) over the whole graph but
projects and fuses only the batch's entities (``out_index``), so a step costs O(graph) for the GAT
and O(batch) for the rest; every rank holds all training links, permutes them with the (seed, epoch)
generator and takes its own slice of each global batch: equal step counts on every rank, each pair
used once per epoch. Stream path: each rank reads its virtual splits of the link shards
(``data/epoch_stream.py``), the GAT runs on a sampled subgraph of the batch and the structure rows
come from the row-sharded table (``tasks/inputs.py``); the contrastive losses still see the whole
global batch (rows gathered with gradient).

World-size independence: every loss term is normalised by the global batch (``gather_global_batch``),
GMNM and the fusion's dropout are keyed by entity id (``model/noise.py``), so W processes compute the
losses and gradients of one process up to float summation order, for any batch size: a rank whose
share of a step is empty (a last global batch smaller than the world; on the stream path, a rank
whose splits ran dry while others still have rows) trains no pair in that step and joins the step's
collectives with a placeholder row (``encode_placeholder``) that no loss term uses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from snag_dist.config import AlignmentConfig, Config
from snag_dist.data.epoch_stream import EpochRows
from snag_dist.data.stream import read_all_rows
from snag_dist.errors import ConfigError, DataError
from snag_dist.eval.csls import alignment_ranks
from snag_dist.eval.metrics import RankMetrics, rank_stats
from snag_dist.eval.neighbours import mutual_nearest_pairs
from snag_dist.eval.shards import shard_bounds
from snag_dist.eval.topk import IndexSpec, topk_alignment_ranks, topk_mutual_pairs
from snag_dist.model.snag import SNAG, SnagOutput
from snag_dist.seeding import generator
from snag_dist.tasks.alignment_losses import AlignmentLoss
from snag_dist.tasks.base import Comm, FromConfig, LocalComm, Phase, TaskContext
from snag_dist.tasks.inputs import StreamInputs, build_inputs, resample_noise


class AlignmentModule(nn.Module):
    """Model + loss weights: everything the optimiser trains. ``forward(pairs) -> losses``."""

    def __init__(self, model: SNAG, loss: AlignmentLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.inputs = None  # set by the task (tasks/inputs.py); plain attribute, never broadcast
        self.last_weights: torch.Tensor | None = None
        self.comm: Comm = LocalComm()  # set by the task: contrast over the global batch of all ranks

    def forward(self, pairs_B2: torch.Tensor) -> dict[str, torch.Tensor]:
        if pairs_B2.shape[0] == 0:  # no pair on this rank this step: join the collectives, train nothing
            out, pairs = self.inputs.encode_placeholder(self.model), pairs_B2.view(0, 2).long()
        else:
            uniq_O, inv = torch.unique(pairs_B2, return_inverse=True)
            out = self.inputs.encode(self.model, uniq_O)
            self.last_weights = out.modality_weights.detach().mean(0)
            pairs = inv.view(-1, 2)
        if not self.comm.active:
            return self.loss(out, pairs)
        out, pairs, rows = gather_global_batch(out, pairs, self.comm)
        return self.loss(out, pairs, rows=rows, scale=float(self.comm.world_size))

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, chunk: int, rounds: int = 0) -> torch.Tensor:
        """Test embeddings (joint_global) of ``ids``, by chunks (full path: chunks of at least N rows,
        i.e. one whole-graph GAT pass; see FullGraphInputs.embed_chunk). ``rounds``: make at least
        this many model calls (a sharded table needs the same number of calls on every rank)."""
        was_training = self.training
        self.eval()
        step = max(1, self.inputs.embed_chunk(chunk))
        parts = [self.inputs.encode(self.model, ids[a:a + step]).joint_global for a in range(0, len(ids), step)]
        for _ in range(len(parts), rounds):
            self.inputs.encode(self.model, ids[:1] if len(ids) else torch.zeros(1, dtype=torch.long))
        self.train(was_training)
        return torch.cat(parts).float() if parts else torch.zeros(0)

    def embed_rounds(self, n: int, chunk: int) -> int:
        return -(-n // max(1, self.inputs.embed_chunk(chunk)))


def gather_global_batch(out: SnagOutput, pairs_B2: torch.Tensor, comm: Comm,
                        ) -> tuple[SnagOutput, torch.Tensor, slice]:
    """Every rank's entity rows (with gradient) and pairs, so each rank's loss contrasts the global batch.

    Returns the gathered output, the global pairs and this rank's rows among them. Each rank computes
    the loss rows of its own pairs against the whole batch (1/world of the (B, B) work) times the
    world size; the gather's backward sums every rank's gradient into the rows' owner, so the
    data-parallel average of parameter gradients equals one process training the global batch
    (tested against a single process).
    """
    sizes = comm.sizes(out.present.shape[0], out.present.device)

    def rows(t: torch.Tensor) -> torch.Tensor:  # bool (present) travels as uint8
        return comm.gather_rows(t.to(torch.uint8), sizes).bool() if t.dtype == torch.bool else comm.gather_rows(t, sizes)

    gathered = out.map_rows(rows)
    offset = sum(sizes[: comm.rank])
    pair_sizes = comm.sizes(pairs_B2.shape[0], pairs_B2.device)
    first = sum(pair_sizes[: comm.rank])
    rows = slice(first, first + pairs_B2.shape[0])
    return gathered, comm.gather_rows(pairs_B2 + offset, pair_sizes), rows


class AlignmentTask(FromConfig):
    section = "alignment"
    metric = "hits@1"

    @staticmethod
    def metric_for(cfg: Config) -> str:
        """The selection metric of a run of ``cfg`` (what the engine and `snag-dist tune` maximise)."""
        return AlignmentTask.metric

    def __init__(self, acfg: AlignmentConfig, context: TaskContext, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None, comm: Comm | None = None) -> None:
        self.acfg, self.context, self.rank, self.world = acfg, context, rank, world_size
        self.device = device or torch.device("cpu")
        self.comm = comm or LocalComm()
        data = context.data
        root = Path(data.shards)
        manifest, spec, model, self.inputs = build_inputs(context, self.comm, self.device, "links/train")
        if manifest.task != "alignment":
            raise DataError(f"{root}: shards are for '{manifest.task}', config task is alignment")
        self.stream = isinstance(self.inputs, StreamInputs)
        self.table = self.inputs.table
        splits = ("valid", "test") if self.stream else ("train", "valid", "test")
        self.links = {s: torch.from_numpy(read_all_rows(root, f"links/{s}")) if f"links/{s}" in manifest.shards
                      else torch.zeros(0, 2, dtype=torch.long) for s in splits}
        if not manifest.shards.get("links/train"):
            raise DataError(f"{root}: no training links")
        if self.stream:
            if self.acfg.iterative:
                raise ConfigError("task.alignment.iterative=true needs data.mode=full for now (the mutual-nearest-"
                                  "neighbour refresh is not sharded yet)")
            self.links["train"] = torch.zeros(0, 2, dtype=torch.long)  # streamed, never held
            self.rows = EpochRows(root, "links/train", batch_size=self.context.train.batch_size, rank=rank,
                                  world_size=world_size, splits=data.stream_splits, workers=data.num_workers,
                                  seed=self.context.train.seed, shuffle_buffer=data.shuffle_buffer)
        self.module = AlignmentModule(model, AlignmentLoss(self.acfg, model.modalities))
        self.module.inputs = self.inputs
        self.module.comm = self.comm
        self.pseudo = torch.zeros(0, 2, dtype=torch.long)
        self._candidates = torch.zeros(0, 2, dtype=torch.long)

    def attach(self, comm: Comm) -> None:
        """Run across processes: contrast over the global batch, evaluate a shard per rank."""
        self.comm = self.module.comm = comm

    # -- task state (iterative learning) that checkpoints carry ---------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"pseudo": self.pseudo.clone(), "candidates": self._candidates.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.pseudo = state.get("pseudo", self.pseudo).long()
        self._candidates = state.get("candidates", self._candidates).long()

    # -- schedule -----------------------------------------------------------------------------
    def phases(self, epochs: int) -> list[Phase]:
        a = self.acfg
        if not a.iterative or a.iterative_start >= epochs:
            return [Phase("base", epochs)]
        return [Phase("base", a.iterative_start),
                Phase("iterative", epochs - a.iterative_start, 1.0 / a.iterative_lr_div, reload_best=True)]

    def train_pairs(self) -> torch.Tensor:
        return torch.cat([self.links["train"], self.pseudo])

    def steps_per_epoch(self) -> int:
        if self.stream:
            steps = self.rows.steps(0)
        else:
            steps = max(1, math.ceil(len(self.train_pairs()) / self.context.train.batch_size))
        cap = self.context.train.steps_per_epoch
        return min(steps, cap) if cap else steps

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        total = self.steps_per_epoch()
        if self.stream:
            for step, local in enumerate(self.rows.local_steps(epoch, start), start=start):
                if step >= total:
                    return
                self.inputs.set_position(epoch, step)
                # A repeated part (this rank's splits ran dry) is no part of the global batch that one
                # process trains: the rank takes no pair (a placeholder call, see AlignmentModule).
                rows = np.zeros((0, 2), dtype=np.int64) if local.repeated else local.rows
                yield torch.from_numpy(rows).to(self.device)
            return
        pairs = self.train_pairs()
        order = torch.randperm(len(pairs), generator=generator(self.context.train.seed, epoch))
        bs = self.context.train.batch_size
        for step, begin in enumerate(range(0, len(pairs), bs)):
            if step >= total:
                return
            if step >= start:
                global_batch = pairs[order[begin:begin + bs]]
                self.inputs.set_position(epoch, step)
                # may be empty when the global batch is smaller than the world (AlignmentModule.forward)
                yield global_batch[self.rank::self.world].to(self.device)

    # -- hooks --------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, module: nn.Module, phase: Phase) -> None:
        resample_noise(module.model, self.table, epoch, self.context.train.seed)
        if phase.name != "iterative":
            return
        a = self.acfg
        into = epoch - a.iterative_start  # epochs into the iterative phase
        if into % a.mnn_every == 0:
            self._refresh_candidates(module)
        # The first links are added pseudo_every epochs in, so they have stayed mutual over several refreshes
        # (as in the reference), not one round taken at the phase start.
        if into > 0 and into % a.pseudo_every == 0 and len(self._candidates):
            self.pseudo = torch.cat([self.pseudo, self._candidates]).unique(dim=0)
            self._candidates = torch.zeros(0, 2, dtype=torch.long)

    def _refresh_candidates(self, module: AlignmentModule) -> None:
        """Mutual CSLS nearest neighbours among entities not yet linked (no valid/test knowledge)."""
        kg = module.inputs.kg().cpu()
        linked = torch.cat([self.links["train"].flatten(), self.links["valid"].flatten(), self.pseudo.flatten()])
        free = torch.ones(len(kg), dtype=torch.bool)
        free[linked] = False
        left, right = torch.nonzero(free & (kg == 0)).flatten(), torch.nonzero(free & (kg == 1)).flatten()
        chunk, k = self.context.eval.chunk_size, self.acfg.csls_k
        comm = self.comm if self.comm.active else None
        if self._protocol(min(len(left), len(right))) == "topk":
            # each rank embeds and indexes its blocks of both sides only
            (la, lb), (ra, rb) = shard_bounds(len(left), comm), shard_bounds(len(right), comm)
            emb_l, emb_r = self._embed_blocks(module, [left[la:lb], right[ra:rb]])
            new = topk_mutual_pairs(emb_l, emb_r, left[la:lb], right[ra:rb], k, self.context.eval.topk,
                                    self._index_spec(), comm)
        else:
            ids = torch.cat([left, right])
            a, b = shard_bounds(len(ids), comm)
            emb = self.comm.gather_rows(self._embed_blocks(module, [ids[a:b]])[0])  # rows: left, then right
            n_left = len(left)
            local = mutual_nearest_pairs(emb, torch.arange(n_left), torch.arange(n_left, len(ids)), k, chunk,
                                         comm).cpu()
            new = torch.stack([left[local[:, 0]], right[local[:, 1] - n_left]], 1)
        if len(self._candidates):  # keep pairs that stayed mutual since the last refresh
            old = {tuple(p) for p in self._candidates.tolist()}
            new = torch.tensor([p for p in new.tolist() if tuple(p) in old], dtype=torch.long).view(-1, 2)
        self._candidates = new

    # -- evaluation ---------------------------------------------------------------------------
    def _protocol(self, n_links: int) -> str:
        p = self.context.eval.protocol
        return p if p != "auto" else ("exact" if n_links <= self.context.eval.exact_max_links else "topk")

    def _index_spec(self) -> IndexSpec:
        e = self.context.eval
        return IndexSpec(e.index, e.ivf_lists, e.ivf_probe, seed=self.context.train.seed)

    def _embed_blocks(self, module: AlignmentModule, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Embeddings of this rank's id blocks, in one call sequence of the same length on every rank
        (a sharded table exchanges rows on every call; an empty block still joins)."""
        ids = torch.cat(blocks)
        call = ids if len(ids) else torch.zeros(1, dtype=torch.long)
        rounds = module.embed_rounds(len(call), self.context.eval.chunk_size)
        if self.comm.active:
            rounds = max(int(v) for v in self.comm.gather_rows(torch.tensor([rounds])).tolist())
        emb = module.embed(call.to(self.device), self.context.eval.chunk_size, rounds)[: len(ids)]
        if self.table is not None:
            self.table.release()  # a table read from its checkpoint (`snag-dist eval`): pages leave the RSS
        return list(emb.split([len(b) for b in blocks]))

    def evaluate(self, module: AlignmentModule, split: str) -> dict[str, float | str]:
        """Hits@k / MRR both ways. Each rank embeds its block of the links; 'exact' gathers them and
        runs both CSLS passes sharded by rows (eval/csls.py), 'topk' searches faiss indexes of
        the rank blocks (eval/topk.py). The rank sums add up to the single-process metrics."""
        links = self.links[split]
        if len(links) == 0:
            raise DataError(f"no '{split}' links to evaluate on")
        comm = self.comm if self.comm.active else None
        lo, hi = shard_bounds(len(links), comm)
        start = time.perf_counter()
        src, tgt = self._embed_blocks(module, [links[lo:hi, 0], links[lo:hi, 1]])
        embedded = time.perf_counter()
        protocol = self._protocol(len(links))
        k, chunk = self.acfg.csls_k, self.context.eval.chunk_size
        if protocol == "exact":
            src, tgt = self.comm.gather_rows(src), self.comm.gather_rows(tgt)
            n = len(links)
            local = torch.stack([torch.arange(n), torch.arange(n, 2 * n)], 1)
            ranks = alignment_ranks(torch.cat([src, tgt]), local, k, chunk, comm=comm)
        else:
            ranks = topk_alignment_ranks(src.cpu(), tgt.cpu(), k, self.context.eval.topk, self._index_spec(), comm)
        l2r, r2l = (self.comm.reduce_sum(rank_stats(r.cpu())) for r in (ranks.l2r, ranks.r2l))
        metrics: dict[str, float | str] = {}
        for prefix, stats in (("", l2r), ("r2l/", r2l)):
            m = RankMetrics.from_stats(stats).as_dict(prefix)
            if protocol == "topk":  # truncated: a gold outside the K candidates is a miss
                top = self.context.eval.topk
                m = {key: v for key, v in m.items() if key.startswith(f"{prefix}hits@")
                     and int(key.rsplit("@", 1)[1]) <= top}
                m[f"{prefix}mrr@{top}"] = float(stats[2].item()) / max(float(stats[0].item()), 1.0)
            metrics.update(m)
        if protocol == "topk":
            found = sum(torch.isfinite(r.cpu()).sum() for r in (ranks.l2r, ranks.r2l)).double().view(1)
            metrics["candidate_recall"] = float(self.comm.reduce_sum(found).item()) / (2 * len(links))
        metrics["protocol"] = "exact" if protocol == "exact" else self._index_spec().describe(self.context.eval.topk)
        # timings stay out of the metrics (metrics rows are deterministic); `snag-dist eval` reports them
        self.eval_seconds = {"embed_seconds": embedded - start, "rank_seconds": time.perf_counter() - embedded}
        metrics["pseudo_links"] = float(len(self.pseudo))
        if len(self.pseudo) and len(self.links["test"]):
            # Report only: the share of pseudo links that are held-out gold links (never used in training).
            metrics["pseudo_precision"] = pseudo_link_precision(self.pseudo, self.links["test"])
        return metrics

    def epoch_stats(self, module: AlignmentModule) -> dict[str, object]:
        if module.last_weights is None:
            return {}
        return {"modality_weights": dict(zip(module.model.modalities, module.last_weights.tolist()))}


def pseudo_link_precision(pseudo: torch.Tensor, gold: torch.Tensor) -> float:
    """Share of pseudo links that are gold links (for reports; gold is never used in training)."""
    if len(pseudo) == 0:
        return math.nan
    gold_set = {tuple(p) for p in gold.tolist()}
    return float(np.mean([tuple(p) in gold_set for p in pseudo.tolist()]))
