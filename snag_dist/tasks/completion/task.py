"""Multi-modal KG completion (MKGC) with SNAG: the task (batches, schedule, evaluation).

Batches: on the full path every rank reads all training triples, permutes them with the (seed, epoch)
generator and takes its slice of each global batch (equal step counts on every rank); negatives use a
(seed, epoch, rank) generator. On the stream path (``data.mode``) each rank reads only its virtual
splits of the triple shards (``data/epoch_stream.py``), negatives are drawn per split part from a
(seed, epoch, step, split) generator, and the filters are memory-mapped indexes built once into the
store folder (``negatives.triple_index``: no rank holds the training triples).

Evaluation: filtered ranking of heads and tails over all entities (`eval/filtered.py`, realistic
ties) with ``rotate.RotatEScorer``. Model selection uses validation MRR; with `dedupe_valid`,
validation triples that are training triples are dropped first (88% of DB15K's published valid
split: they measure memorisation). Every rank evaluates all queries unless the engine sets
`reduce_sum` (an all-reduce of the rank sums), in which case each ranks 1/world of them.
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from snag_dist.config import CompletionConfig, Config
from snag_dist.data.epoch_stream import EpochRows
from snag_dist.data.stream import read_all_rows
from snag_dist.errors import DataError
from snag_dist.eval.filtered import COMPLETION_HITS, KnownTriples, filtered_rank_stats, metrics_from_stats
from snag_dist.eval.filtered_sharded import FileRows, full_filtered_ranks, sampled_filtered_ranks
from snag_dist.eval.metrics import rank_stats
from snag_dist.eval.shards import QueryShard, shard_bounds
from snag_dist.seeding import generator
from snag_dist.tasks.base import Comm, FromConfig, LocalComm, Phase, TaskContext
from snag_dist.tasks.completion.module import CompletionModule
from snag_dist.tasks.completion.negatives import (
    CompletionBatch,
    NegativeSampler,
    head_probability,
    triple_index,
)
from snag_dist.tasks.completion.rotate import (
    DistanceKernel,
    RotatEScorer,
    compiled_for_ranking,
    compiled_for_training,
)
from snag_dist.tasks.inputs import StreamInputs, build_inputs, resample_noise


def selection_metric(candidates: int) -> str:
    """Validation MRR, under the sampled protocol's name when ``eval.completion_candidates`` is set."""
    return "mrr" if candidates == 0 else f"sampled-{candidates}/mrr"


class CompletionTask(FromConfig):
    section = "completion"

    def __init__(self, ccfg: CompletionConfig, context: TaskContext, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None, comm: Comm | None = None) -> None:
        self.ccfg, self.context, self.rank, self.world = ccfg, context, rank, world_size
        self.comm = comm or LocalComm()
        self.device = device or torch.device("cpu")
        data, train_fields = context.data, context.train
        root = Path(data.shards)
        manifest, spec, model, self.inputs = build_inputs(context, self.comm, self.device, "triples/train")
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
        local = math.ceil(train_fields.batch_size / world_size)
        self.chunk = min(self.ccfg.negative_chunk, local)
        if self.stream:
            self.rows = EpochRows(root, "triples/train", batch_size=train_fields.batch_size, rank=rank,
                                  world_size=world_size, splits=data.stream_splits, workers=data.num_workers,
                                  seed=train_fields.seed, shuffle_buffer=data.shuffle_buffer)
            self.chunk = min(self.ccfg.negative_chunk, self.rows.part)
            self.rows.align(self.chunk)  # parts of whole negative groups
            self.train_known, self.known, self.p_head = triple_index(root, data.store_dir, manifest, self.comm,
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
        self.sampler = NegativeSampler(self.num_entities, self.ccfg.negatives, self.chunk, self.p_head,
                                       self.train_known, self.ccfg.filter_negatives, self.ccfg.self_negative != "none")
        # Set by an engine that can all-reduce: evaluation then ranks 1/world of the queries per rank.
        self.reduce_sum = self.comm.reduce_sum if self.comm.active else None
        # Every step uses the same (groups, chunk) shape, the last batch padded: one compilation.
        self.module.rotate.groups = math.ceil(local / self.chunk)
        steps = self.steps_per_epoch() * train_fields.epochs
        self.module.rotate.kernel = DistanceKernel(compiled_for_training(self.ccfg.kernel, steps))

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
            steps = max(1, math.ceil(len(self.triples["train"]) / self.context.train.batch_size))
        cap = self.context.train.steps_per_epoch
        return min(steps, cap) if cap else steps

    def batches(self, epoch: int, start: int = 0) -> Iterator[CompletionBatch]:
        if self.stream:
            yield from self._stream_batches(epoch, start)
            return
        train = self.triples["train"]
        order = torch.randperm(len(train), generator=generator(self.context.train.seed, epoch))
        neg_gen = generator(self.context.train.seed, epoch, self.rank)
        bs = self.context.train.batch_size
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
        seed, total = self.context.train.seed, self.steps_per_epoch()
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
        return self.sampler.make_batch(triples_B3, gen)

    # -- hooks --------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, module: nn.Module, phase: Phase) -> None:
        resample_noise(module.model, self.table, epoch, self.context.train.seed)

    @staticmethod
    def metric_for(cfg: Config) -> str:
        """The selection metric of a run of ``cfg`` (what the engine and `snag-dist tune` maximise)."""
        return selection_metric(cfg.eval.completion_candidates)

    @property
    def metric(self) -> str:
        return selection_metric(self.context.eval.completion_candidates)

    def evaluate(self, module: CompletionModule, split: str) -> dict[str, float | str]:
        triples = self.triples[split]
        if len(triples) == 0:
            extra = " not in train (task.completion.dedupe_valid)" if split == "valid" and self.ccfg.dedupe_valid else ""
            raise DataError(f"no '{split}' triples{extra} to evaluate on")
        limit = self.context.eval.max_queries
        if limit and limit < len(triples):
            triples = triples[:limit]
        start, self._embed_seconds = time.perf_counter(), math.nan
        if self.stream or self.context.eval.completion_candidates:
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
        compiled = compiled_for_ranking(self.ccfg.kernel, 2.0 * len(triples) * n * d)
        scorer = RotatEScorer(module.rotate, table, compiled)
        # Queries per chunk: eval.chunk_size, capped so one (chunk, N) score block stays near 256 MB.
        chunk = max(1, min(self.context.eval.chunk_size, (1 << 26) // n))
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
        limit = self.context.eval.spill_mib
        return limit > 0 and (hi - lo) * 2 * module.rotate.dim * 4 > limit * 2**20

    def _rank_sharded(self, module: CompletionModule, mine: torch.Tensor | FileRows, triples: torch.Tensor,
                      ) -> tuple[dict[str, torch.Tensor], str]:
        comm = self.comm
        lo, hi = shard_bounds(len(triples), comm if comm.active else None)
        d = module.rotate.dim
        work = 2.0 * len(triples) * self.num_entities * d / comm.world_size
        compiled = compiled_for_ranking(self.ccfg.kernel, work)

        def block_score(anchor: torch.Tensor, rel: torch.Tensor, predict_head: bool, cand: torch.Tensor) -> torch.Tensor:
            return RotatEScorer(module.rotate, cand, compiled).score_vectors(anchor, rel, predict_head)

        k = self.context.eval.completion_candidates
        if k:
            ranks = sampled_filtered_ranks(block_score, mine, triples[lo:hi], lo, self.known, k,
                                           self.context.train.seed, comm)
        else:
            chunk = max(1, min(self.context.eval.chunk_size, 1024))
            block = max(256, (1 << 26) // (chunk * comm.world_size))  # one (chunk, W x block) score block ~256 MB
            ranks = full_filtered_ranks(block_score, mine, triples[lo:hi], self.known, chunk, block, comm)
        stats = {"head": rank_stats(ranks.head, COMPLETION_HITS), "tail": rank_stats(ranks.tail, COMPLETION_HITS)}
        stats = {key: comm.reduce_sum(value) for key, value in stats.items()}
        return stats, f"sampled-{k}" if k else "full-filtered"

    def _entity_table(self, module: CompletionModule) -> torch.Tensor:
        """(N, 2D) vectors of every entity on every rank (the full path's gathered evaluation)."""
        return self.comm.gather_rows(self._my_vectors(module)) if self.stream else module.entity_table(
            self.context.eval.chunk_size)

    def _my_vectors(self, module: CompletionModule, spill: Path | None = None) -> torch.Tensor | FileRows:
        """This rank's contiguous block of the (N, 2D) entity vectors (`partition_range`), in memory or,
        with ``spill``, written to that file. On the stream path each rank encodes only its block, with
        the same number of model calls on every rank (the sharded table exchanges rows on every call);
        the full path encodes all and slices."""
        from snag_dist.data.store import partition_range

        lo, hi = partition_range(self.num_entities, self.comm.rank, self.comm.world_size)
        chunk, width = self.context.eval.chunk_size, 2 * module.rotate.dim
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
