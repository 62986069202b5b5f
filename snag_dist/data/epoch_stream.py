"""Training rows (triples or links) streamed from the shards: each rank reads only its own share.

An epoch is cut into ``splits`` virtual splits (MosaicML Streaming's "canonical nodes" idea): the
shards of a row group, in an order shuffled per (seed, epoch), are dealt to the splits so their row
counts balance (each shard to the split with the fewest rows so far). Every step, each split
contributes one part of ``part`` rows (ceil(batch / splits), rounded up to a multiple of ``align``);
the global batch of step k is the union of the splits' parts k. Rank r reads splits r::world only,
DataLoader worker w of a rank the rank's splits w::workers. Inside a split, row blocks pass a
seeded WebDataset shuffle buffer and each block's rows are permuted, all seeded by
(seed, epoch, split) — never by rank or worker — so for a fixed ``splits`` the global batches of an
epoch are the same for 1, 2 or any process count that divides it, and every row is read exactly once
per epoch. Steps per epoch = the largest split's part count; a rank whose splits ran dry in the
epoch's last steps repeats its last part (``Step.repeated``), so every rank takes the same number of
optimizer steps; the part is no row of the global batch (one process never reads it then), so tasks
train none of it (alignment takes no pair that step, completion weights it 0). A mid-epoch resume
replays the epoch's stream and skips the steps already trained (inside the readers: skipped rows are
decoded, not batched or sent between processes).

Nothing here talks to other processes: rank and world size are passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from snag_dist.data.batching import concat_rows, cut_batches
from snag_dist.data.integrity import shard_infos
from snag_dist.data.manifest import load_manifest
from snag_dist.data.stream import _one_line_errors, _tar_samples, decode_rows, row_limits
from snag_dist.errors import ConfigError, DataError
from snag_dist.seeding import numpy_rng, python_rng, stable_seed


@dataclass(frozen=True)
class Step:
    """One rank's rows of one step: ``parts[i]`` from virtual split ``splits[i]``."""

    splits: tuple[int, ...]
    parts: tuple[np.ndarray, ...]
    repeated: bool = False  # this rank had no rows left and repeats its last part

    @property
    def rows(self) -> np.ndarray:
        return np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]


class EpochRows:
    """The rows of one shard group (``triples/train``, ``links/train``) as per-step parts."""

    def __init__(self, root: str | Path, group: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 splits: int = 0, workers: int = 0, seed: int = 0, shuffle_buffer: int = 0) -> None:
        self.root = Path(root)
        manifest = load_manifest(self.root)
        infos = manifest.shards.get(group, [])
        if not infos:
            raise DataError(f"{self.root}: shard group '{group}' is empty")
        self.urls = [str(self.root / s.file) for s in infos]
        self.infos = shard_infos(self.root, manifest, [group])  # each shard checked as it is read
        self.limits = row_limits(manifest, group)
        self.rows_per_shard = [s.rows for s in infos]
        self.total_rows = sum(self.rows_per_shard)
        self.group, self.rank, self.world, self.workers = group, rank, world_size, workers
        self.splits = splits or world_size * max(1, workers)
        if self.splits < world_size * max(1, workers):
            raise ConfigError(f"data.stream_splits={self.splits} is fewer than processes x max(1, data.num_workers) "
                              f"= {world_size} x {max(1, workers)}; every reader needs a split")
        if self.splits > len(infos):
            raise ConfigError(f"data.stream_splits={self.splits} (processes x workers when 0) is more than the "
                              f"{len(infos)} shards of {self.root}/{group}; re-run prepare with --min-shards "
                              f"{self.splits} or use fewer processes/workers")
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.member = "pairs.npy" if group.startswith("links/") else "hrt.npy"
        self.part = max(1, math.ceil(batch_size / self.splits))
        self.mine = list(range(rank, self.splits, world_size))

    # -- the epoch's plan (the same on every rank) ----------------------------------------------
    def assignment(self, epoch: int) -> list[list[int]]:
        """Shard indices of each split, in read order."""
        order = list(range(len(self.urls)))
        if self.shuffle_buffer > 0:
            python_rng(stable_seed("shards", self.seed, epoch)).shuffle(order)
        load, out = [0] * self.splits, [[] for _ in range(self.splits)]
        for i in order:
            v = min(range(self.splits), key=lambda s: (load[s], s))
            out[v].append(i)
            load[v] += self.rows_per_shard[i]
        return out

    def _loads(self, epoch: int) -> list[int]:
        return [sum(self.rows_per_shard[i] for i in shards) for shards in self.assignment(epoch)]

    def global_rows(self, epoch: int) -> list[int]:
        """Rows of every step's global batch (all splits), for losses normalised by the global batch."""
        loads = self._loads(epoch)
        return [sum(min(self.part, max(0, n - k * self.part)) for n in loads) for k in range(self.steps(epoch))]

    def steps(self, epoch: int = 0) -> int:
        return max(1, max(math.ceil(n / self.part) for n in self._loads(epoch)))

    def align(self, rows: int) -> None:
        """Round the per-split part up to a multiple of ``rows`` (e.g. the positives sharing negatives)."""
        self.part = math.ceil(self.part / rows) * rows

    # -- reading one split --------------------------------------------------------------------
    def _blocks(self, epoch: int, split: int, shards: list[int]) -> Iterator[np.ndarray]:
        stages = [wds.SimpleShardList([self.urls[i] for i in shards]), partial(_tar_samples, infos=self.infos)]
        seed = stable_seed("rows", self.seed, epoch, split)
        if self.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=python_rng(seed)))
        rng = numpy_rng(seed)
        for sample in wds.DataPipeline(*stages):
            block = decode_rows(sample, self.member, self.limits)
            yield block[rng.permutation(len(block))] if self.shuffle_buffer > 0 else block

    def split_parts(self, epoch: int, split: int, start: int = 0) -> Iterator[np.ndarray]:
        """Exactly ``steps(epoch)`` parts of split ``split`` (empty once it is exhausted), from ``start``."""
        steps = self.steps(epoch)
        blocks = self._blocks(epoch, split, self.assignment(epoch)[split])
        cols = 2 if self.member == "pairs.npy" else 3
        step = 0
        for pieces in cut_batches(blocks, self.part):
            if step >= start:  # skipped parts are decoded, never copied
                yield concat_rows(pieces)
            step += 1
        for k in range(step, steps):
            if k >= start:
                yield np.zeros((0, cols), dtype=np.int64)

    # -- this rank's steps ----------------------------------------------------------------------
    def _reader_steps(self, epoch: int, splits: list[int], start: int) -> Iterator[tuple[tuple[int, ...], tuple]]:
        readers = [self.split_parts(epoch, v, start) for v in splits]
        for parts in zip(*readers):
            yield tuple(splits), parts

    def local_steps(self, epoch: int, start: int = 0) -> Iterator[Step]:
        """This rank's parts per step from step ``start`` on (``data.num_workers`` DataLoader workers
        read disjoint splits; their outputs are merged step by step)."""
        if self.workers <= 0:
            merged = self._reader_steps(epoch, self.mine, start)
        else:
            loader = DataLoader(_WorkerSplits(self, epoch, start), batch_size=None, num_workers=self.workers,
                                collate_fn=_as_is, persistent_workers=False)
            merged = _merge(iter(_one_line_errors(loader)), self.workers)
        last: Step | None = None
        for splits, parts in merged:
            order = np.argsort(splits)
            step = Step(tuple(splits[i] for i in order), tuple(parts[i] for i in order))
            if sum(len(p) for p in step.parts) == 0:
                if last is None:  # the rank's splits hold no row at all from here: nothing to repeat yet
                    raise DataError(f"{self.root}/{self.group}: rank {self.rank} has no rows in epoch {epoch}")
                step = Step(last.splits, last.parts, repeated=True)
            else:
                last = step
            yield step


def _as_is(x: object) -> object:
    return x


def _merge(items: Iterator, workers: int) -> Iterator[tuple[tuple[int, ...], tuple]]:
    """DataLoader returns workers' items round-robin (all yield one item per step): group them."""
    while True:
        group = []
        for _ in range(workers):
            try:
                group.append(next(items))
            except StopIteration:
                if group:
                    raise DataError("stream workers yielded different step counts") from None
                return
        yield tuple(v for splits, _ in group for v in splits), tuple(p for _, parts in group for p in parts)


class _WorkerSplits(IterableDataset):
    """What a DataLoader worker iterates: its share of the rank's splits, one item per step."""

    def __init__(self, rows: EpochRows, epoch: int, start: int) -> None:
        super().__init__()
        self.rows, self.epoch, self.start = rows, epoch, start

    def __iter__(self) -> Iterator[tuple[tuple[int, ...], tuple]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rows._reader_steps(self.epoch, self.rows.mine[wid::nw], self.start)
