"""Streaming shards into training: WebDataset pipelines split by rank, then by DataLoader worker.

Every rank sees a disjoint subset of shards (``nodesplitter``) and every worker a disjoint subset of
its rank's shards (``split_by_worker``), so one epoch over R ranks x W workers reads each sample
exactly once. Shard order and the sample shuffle are seeded from (seed, epoch[, rank, worker]):
an epoch is reproducible, and resuming means ``set_epoch(e)`` (the stream's ``state_dict``).
Rank and world size are passed explicitly (not read from torch.distributed), so the same stream
works under torchrun, Accelerate, DeepSpeed, Ray Train or in a plain process.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from snag_dist.data.manifest import Manifest, load_manifest
from snag_dist.data.records import EntityLayout
from snag_dist.errors import DataError


@dataclass(frozen=True)
class StreamConfig:
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_buffer: int = 0  # samples (entities) or blocks (rows) held for shuffling; 0 = in order
    batch_size: int = 1024
    drop_last: bool = False


def split_by_rank(src: Iterator, rank: int, world_size: int) -> Iterator:
    """``wds.split_by_node`` with an explicit rank instead of a global process group."""
    yield from islice(src, rank, None, world_size)


def _raise_with_shard(exn: Exception) -> bool:
    shard = next((a for a in exn.args[1:] if isinstance(a, str)), None)
    where = f"corrupt shard {shard}" if shard else "corrupt shard"
    raise DataError(f"{where}: {exn.args[0] if exn.args else exn}") from None


def _seeded_shuffle(src: Iterator, bufsize: int, seed: tuple[int, ...]) -> Iterator:
    """A wds shuffle whose seed includes the worker id, known only inside the worker."""
    if bufsize <= 0:
        yield from src
        return
    info = get_worker_info()
    wid = info.id if info is not None else 0
    rng = random.Random(hash((*seed, wid)) & 0xFFFFFFFF)
    yield from wds.shuffle(bufsize, initial=bufsize, rng=rng)(src)


class _EpochStream(IterableDataset):
    """Base: epoch bookkeeping and the shard-level part of the pipeline."""

    def __init__(self, root: str | Path, group: str, cfg: StreamConfig) -> None:
        super().__init__()
        self.root = Path(root)
        self.manifest: Manifest = load_manifest(self.root)
        self.urls = self.manifest.shard_paths(self.root, group)
        if not self.urls:
            raise DataError(f"{self.root}: shard group '{group}' is empty")
        self.group, self.cfg, self.epoch = group, cfg, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])

    def _samples(self) -> Iterator[dict]:
        urls = list(self.urls)
        if self.cfg.shuffle_buffer > 0:  # same shard order on every rank, new each epoch
            random.Random(hash((self.cfg.seed, self.epoch)) & 0xFFFFFFFF).shuffle(urls)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            partial(split_by_rank, rank=self.cfg.rank, world_size=self.cfg.world_size),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=_raise_with_shard),
            partial(_seeded_shuffle, bufsize=self.cfg.shuffle_buffer,
                    seed=(self.cfg.seed, self.epoch, self.cfg.rank)),
        )
        return iter(pipeline)


class EntityStream(_EpochStream):
    """Batches of entities: ids (B,), kg (B,), mask (B,M) bool, features {modality: (B,D) float32}."""

    def __init__(self, root: str | Path, cfg: StreamConfig) -> None:
        super().__init__(root, "entities", cfg)
        self.layout = EntityLayout.from_manifest(self.manifest)

    def _decode(self, sample: dict) -> tuple[int, int, np.ndarray, dict]:
        key = sample["__key__"]
        if "rec" not in sample:
            raise DataError(f"corrupt shard {sample.get('__url__')}: sample {key} has no 'rec' member")
        kg, mask, parts = self.layout.decode(sample["rec"], key)
        return int(key), kg, mask, parts

    def collate(self, items: list[tuple[int, int, np.ndarray, dict]]) -> dict[str, object]:
        n = len(items)
        feats = {}
        for c in self.layout.columns:
            out = np.zeros((n, c.dim), dtype=np.float32)
            for i, (_, _, _, parts) in enumerate(items):
                if c.kind == "bag":
                    idx, val = parts[c.name]
                    out[i, idx] = val
                else:
                    out[i] = parts[c.name]
            feats[c.name] = torch.from_numpy(out)
        return {
            "ids": torch.tensor([it[0] for it in items], dtype=torch.long),
            "kg": torch.tensor([it[1] for it in items], dtype=torch.uint8),
            "mask": torch.from_numpy(np.stack([it[2] for it in items])),
            "features": feats,
        }

    def __iter__(self) -> Iterator[dict]:
        batch: list = []
        for sample in self._samples():
            batch.append(self._decode(sample))
            if len(batch) == self.cfg.batch_size:
                yield self.collate(batch)
                batch = []
        if batch and not self.cfg.drop_last:
            yield self.collate(batch)


class RowStream(_EpochStream):
    """Batches of rows (triples (B,3) or links (B,2)) as int64 tensors, from block samples.

    Blocks are shuffled as samples, then rows within each block, so a 10M-triple split never
    becomes 10M Python objects.
    """

    def __init__(self, root: str | Path, group: str, cfg: StreamConfig) -> None:
        super().__init__(root, group, cfg)
        self.member = "pairs.npy" if group.startswith("links/") else "hrt.npy"

    def _blocks(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng((self.cfg.seed, self.epoch, self.cfg.rank))
        for sample in self._samples():
            try:
                block = np.load(io.BytesIO(sample[self.member]), allow_pickle=False)
            except (KeyError, ValueError, OSError):
                raise DataError(f"corrupt shard {sample.get('__url__')}: bad block {sample['__key__']}") from None
            yield rng.permutation(block) if self.cfg.shuffle_buffer > 0 else block

    def __iter__(self) -> Iterator[torch.Tensor]:
        size, pending, held = self.cfg.batch_size, [], 0
        for block in self._blocks():
            pending.append(block)
            held += len(block)
            while held >= size:
                joined = np.concatenate(pending)
                yield torch.from_numpy(joined[:size].copy())
                pending, held = [joined[size:]], held - size
        if held and not self.cfg.drop_last:
            yield torch.from_numpy(np.concatenate(pending))


def make_loader(stream: IterableDataset, num_workers: int = 0) -> DataLoader:
    """A DataLoader over a stream that already yields batches."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, pin_memory=False)


def read_all_rows(root: str | Path, group: str) -> np.ndarray:
    """Every row of a (small) group, in shard order — for graphs / eval sets that fit in memory."""
    stream = RowStream(root, group, StreamConfig(batch_size=1 << 30))
    parts = [b.numpy() for b in stream]
    cols = 2 if group.startswith("links/") else 3
    return np.concatenate(parts) if parts else np.zeros((0, cols), dtype=np.int64)
