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
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from snag_dist.data.batching import concat_rows, cut_batches
from snag_dist.data.integrity import CheckedShard, shard_infos
from snag_dist.data.manifest import Manifest, ShardInfo, load_manifest
from snag_dist.data.records import MEMBER, EntityBlock, EntityLayout, alloc_many, cast_into
from snag_dist.errors import DataError, SnagError
from snag_dist.seeding import numpy_rng, python_rng, tuple_seed


@dataclass(frozen=True)
class StreamConfig:
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_buffer: int = 0  # entities (EntityStream) or row blocks (RowStream) held for shuffling; 0 = in order
    batch_size: int = 1024
    drop_last: bool = False


def split_by_rank(src: Iterator, rank: int, world_size: int) -> Iterator:
    """``wds.split_by_node`` with an explicit rank instead of a global process group."""
    yield from islice(src, rank, None, world_size)


def _raise_with_shard(exn: Exception) -> bool:
    shard = next((a for a in exn.args[1:] if isinstance(a, str)), None)
    where = f"corrupt shard {shard}" if shard else "corrupt shard"
    raise DataError(f"{where}: {exn.args[0] if exn.args else exn}") from None


def _shard_members(src: Iterator[dict], infos: dict[str, ShardInfo]) -> Iterator[dict]:
    """``wds`` tar_file_expander over local shards, each checked against its manifest entry
    (``integrity``): the size at open, the sha256 over the bytes read. The end-of-shard marker
    (``{}``) comes after the check, so a shard's last sample is grouped and handed on only once the
    shard's sha256 matched. A 1 MiB read buffer: tarfile's stream mode reads 10 KiB at a time."""
    for source in src:
        url = source["url"]
        shard = CheckedShard(url, infos.get(url))

        def member_error(exn: Exception, url: str = url) -> bool:
            text = str(exn.args[0]).split(" @ ")[0] if exn.args else str(exn)
            raise DataError(f"corrupt shard {url}: {text}") from None

        try:
            for member in tariterators.tar_file_iterator(shard, handler=member_error):
                member["__url__"] = url
                yield member
            shard.finish()
        except SnagError:
            raise
        except Exception as exn:  # tarfile.ReadError / EOFError of a damaged archive
            raise DataError(f"corrupt shard {url}: unreadable tar ({exn})") from None
        finally:
            shard.close()
        yield {}


def _tar_samples(src: Iterator[dict], infos: dict[str, ShardInfo] | None = None) -> Iterator[dict]:
    """``wds.tarfile_to_samples`` with the checked, buffered reader above (``infos``: shard path ->
    manifest entry; a shard without one is read unchecked)."""
    return tariterators.group_by_keys(_shard_members(src, infos or {}), handler=_raise_with_shard)


def decode_rows(sample: dict, member: str, limits: tuple[int, ...]) -> np.ndarray:
    """The int64 row block of a triple/link sample: one column per entry of ``limits``, column c's
    values in [0, limits[c]) — a damaged block is an error naming its shard before any row is used."""
    where = f"corrupt shard {sample.get('__url__')}: block {sample.get('__key__')}"
    try:
        block = np.load(io.BytesIO(sample[member]), allow_pickle=False)
    except (KeyError, ValueError, OSError, EOFError):
        raise DataError(f"{where} is not a readable '{member}' array") from None
    if block.ndim != 2 or block.shape[1] != len(limits) or block.dtype.kind not in "iu":
        raise DataError(f"{where} has shape {block.shape} {block.dtype}, expected (rows, {len(limits)}) integers")
    # Whole-block reductions: min(0)/max(0) over a (rows, 3) block are ~7x slower.
    if len(block) and (block.min() < 0 or (block.max() >= min(limits) and not (block < limits).all())):
        col = int(np.argmax(((block < 0) | (block >= limits)).any(0)))
        raise DataError(f"{where} has ids outside [0, {limits[col]}) in column {col}")
    return block.astype(np.int64, copy=False)


def row_limits(manifest: Manifest, group: str) -> tuple[int, ...]:
    """Value bounds of a row group's columns: (N, N) for links, (N, R, N) for triples."""
    n = manifest.num_entities
    return (n, n) if group.startswith("links/") else (n, manifest.num_relations, n)


def one_line(exc: SnagError) -> SnagError:
    """A SnagError raised in a DataLoader worker arrives with the worker's traceback in its message;
    the same error with the original one-line message."""
    text = str(exc)
    if "\n" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(("snag_dist.", type(exc).__name__)) and ": " in last else last
    return type(exc)(text)


def _one_line_errors(items: Iterable) -> Iterator:
    try:
        yield from items
    except SnagError as exc:
        raise one_line(exc) from None


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _seeded_shuffle(src: Iterator, bufsize: int, seed: tuple[int, ...]) -> Iterator:
    """A wds shuffle whose seed includes the worker id, known only inside the worker."""
    if bufsize <= 0:
        yield from src
        return
    rng = python_rng(tuple_seed(*seed, _worker_id(), bits=32))
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
        self.infos = shard_infos(self.root, self.manifest, [group])
        self.group, self.cfg, self.epoch = group, cfg, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])

    def _rng(self) -> np.random.Generator:
        """Row-level shuffling: seeded by (seed, epoch, rank, worker)."""
        return numpy_rng(self.cfg.seed, self.epoch, self.cfg.rank, _worker_id())

    def _samples(self, bufsize: int) -> Iterator[dict]:
        """This rank's and worker's samples; ``bufsize`` samples in the (seeded) shuffle buffer."""
        urls = list(self.urls)
        if self.cfg.shuffle_buffer > 0:  # same shard order on every rank, new each epoch
            python_rng(tuple_seed(self.cfg.seed, self.epoch, bits=32)).shuffle(urls)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            partial(split_by_rank, rank=self.cfg.rank, world_size=self.cfg.world_size),
            wds.split_by_worker,
            partial(_tar_samples, infos=self.infos),
            partial(_seeded_shuffle, bufsize=bufsize, seed=(self.cfg.seed, self.epoch, self.cfg.rank)),
        )
        return iter(pipeline)


class EntityStream(_EpochStream):
    """Batches of entities: ids (B,), kg (B,), mask (B,M) bool, features {modality: (B,D) float32}.

    Samples are blocks of consecutive entities (``records``), decoded column-wise. Shuffling is
    two-level, both seeded: blocks pass a wds shuffle buffer of ~``shuffle_buffer`` entities, then
    consecutive blocks are gathered into windows of >= ``shuffle_buffer`` entities in a random
    order, so a batch mixes entities of many blocks and shards. A batch is built column by column:
    row ranges of windows in storage form (``compact``), then one cast to float32 with bags
    scattered into dense rows (``expand``) — no per-entity Python.
    """

    def __init__(self, root: str | Path, cfg: StreamConfig) -> None:
        super().__init__(root, "entities", cfg)
        self.layout = EntityLayout.from_manifest(self.manifest)
        infos = self.manifest.shards["entities"]
        per_block = max(1, sum(s.rows for s in infos) // max(1, sum(s.samples for s in infos)))
        self.block_buffer = math.ceil(cfg.shuffle_buffer / per_block)

    def _blocks(self) -> Iterator[EntityBlock]:
        for sample in self._samples(self.block_buffer):
            where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
            if MEMBER not in sample:
                raise DataError(f"corrupt shard {where} has no '{MEMBER}' member")
            yield self.layout.decode(sample[MEMBER], where)

    def _windows(self) -> Iterator[EntityBlock]:
        """Blocks as read, or (shuffling) windows of >= shuffle_buffer entities in a random order."""
        size = self.cfg.shuffle_buffer
        if size <= 0:
            yield from self._blocks()
            return
        rng, pending, held = self._rng(), [], 0
        for block in self._blocks():
            pending.append(block)
            held += len(block)
            if held >= size:
                yield EntityBlock.shuffled(pending, rng)
                pending, held = [], 0
        if pending:
            yield EntityBlock.shuffled(pending, rng)

    def compact(self, pieces: list[tuple[EntityBlock, int, int]]) -> EntityBlock:
        """A batch in storage form (what crosses from a DataLoader worker): ids, kg, mask,
        dense {m: (B,D) storage dtype}, bags {m: (indptr, indices, values)} from (block, start, stop)
        row ranges — one copy per column, none for a batch inside one block (expand and pickling
        copy anyway)."""
        parts = [block.slice(start, stop) for block, start, stop in pieces]
        return parts[0] if len(parts) == 1 else EntityBlock.concat(parts)

    def expand(self, part: EntityBlock) -> dict[str, object]:
        """Storage form -> the batch: features {m: (B,D) float32}, bags scattered into dense rows."""
        n = len(part)
        # One allocation for the batch's feature matrices: once the consumer drops a batch, the
        # next one gets the same memory back instead of fresh pages (see ``alloc_many``).
        outs = alloc_many([((n, c.dim), np.float32) for c in self.layout.columns])
        feats = {}
        for c, out in zip(self.layout.columns, outs):
            if c.kind == "bag":
                out.fill(0)
                part.bags[c.name].scatter_into(out)
            else:
                cast_into(out, part.dense[c.name])
            feats[c.name] = torch.from_numpy(out)
        return {"ids": torch.from_numpy(part.ids), "kg": torch.from_numpy(part.kg),
                "mask": torch.from_numpy(part.mask), "features": feats}

    def compact_batches(self) -> Iterator[EntityBlock]:
        for pieces in cut_batches(self._windows(), self.cfg.batch_size, self.cfg.drop_last):
            yield self.compact(pieces)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.compact_batches():
            yield self.expand(batch)


class _CompactEntities(IterableDataset):
    """What DataLoader workers iterate: an EntityStream's batches in storage form."""

    def __init__(self, stream: EntityStream) -> None:
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[EntityBlock]:
        return self.stream.compact_batches()


def _as_is(batch: object) -> object:
    return batch


class EntityLoader:
    """DataLoader workers build batches in storage form; this process expands them to float32.

    Float16 features and CSR bags are ~4.5x fewer bytes than the float32 batch (a 1000-d relation
    bag alone is 4 KB per entity, mostly zeros), and every byte a worker returns is pickled through
    a pipe and unpickled here; expanding costs ~1 us per entity. The blocks travel as pickled numpy
    arrays (``collate_fn`` keeps them as they are): as torch tensors, each of a batch's ~10 arrays
    would get its own shared-memory segment and file-descriptor hand-off, which costs more.
    """

    def __init__(self, stream: EntityStream, num_workers: int) -> None:
        self.stream = stream
        self.loader = DataLoader(_CompactEntities(stream), batch_size=None, num_workers=num_workers,
                                 collate_fn=_as_is, persistent_workers=False, pin_memory=False)

    def __iter__(self) -> Iterator[dict]:
        for batch in _one_line_errors(self.loader):
            yield self.stream.expand(batch)


class RowStream(_EpochStream):
    """Batches of rows (triples (B,3) or links (B,2)) as int64 tensors, from block samples.

    Blocks are shuffled as samples (``shuffle_buffer`` blocks), then rows within each block, so a
    10M-triple split never becomes 10M Python objects.
    """

    def __init__(self, root: str | Path, group: str, cfg: StreamConfig) -> None:
        super().__init__(root, group, cfg)
        self.member = "pairs.npy" if group.startswith("links/") else "hrt.npy"
        self.limits = row_limits(self.manifest, group)

    def _blocks(self) -> Iterator[np.ndarray]:
        rng = self._rng()
        for sample in self._samples(self.cfg.shuffle_buffer):
            block = decode_rows(sample, self.member, self.limits)
            yield np.take(block, rng.permutation(len(block)), axis=0) if self.cfg.shuffle_buffer > 0 else block

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Blocks re-cut into batches; each row is copied once (no re-concatenation of leftovers)."""
        for pieces in cut_batches(self._blocks(), self.cfg.batch_size, self.cfg.drop_last):
            yield torch.from_numpy(concat_rows(pieces))


class WorkerLoader:
    """A DataLoader over a stream that yields batches, whose workers' errors stay one line."""

    def __init__(self, stream: IterableDataset, num_workers: int) -> None:
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                                 persistent_workers=False, pin_memory=False)

    def __iter__(self) -> Iterator:
        return _one_line_errors(self.loader)


def make_loader(stream: IterableDataset, num_workers: int = 0) -> DataLoader | EntityLoader | WorkerLoader:
    """A DataLoader over a stream that already yields batches (an ``EntityLoader`` for entities)."""
    if num_workers > 0 and isinstance(stream, EntityStream):
        return EntityLoader(stream, num_workers)
    if num_workers > 0:
        return WorkerLoader(stream, num_workers)
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, pin_memory=False)


def read_all_rows(root: str | Path, group: str) -> np.ndarray:
    """Every row of a (small) group, in shard order — for graphs / eval sets that fit in memory."""
    stream = RowStream(root, group, StreamConfig(batch_size=1 << 30))
    parts = [b.numpy() for b in stream]
    cols = 2 if group.startswith("links/") else 3
    return np.concatenate(parts) if parts else np.zeros((0, cols), dtype=np.int64)
