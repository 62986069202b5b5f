"""``snag-dist prepare``: a raw dataset -> verified WebDataset shards + manifest, written once.

Out of core: entities are read and written one shard-sized id range at a time (a shard holds
samples of ``entity_block`` consecutive entities, see ``records``), triples block by block. Each
triple split is parsed from text once into a binary scratch file that the later passes (relation
bag, counts, shards) re-read. Everything goes to a temp directory beside OUT_DIR that is renamed at
the end, so a failed or interrupted prepare never leaves an OUT_DIR behind.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
import shutil
import sys
import tarfile
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from safetensors.numpy import save_file

from snag_dist import __version__
from snag_dist.data.batching import concat_rows, cut_batches
from snag_dist.data.entity_features import EntityFeatures
from snag_dist.data.manifest import (
    MANIFEST,
    STATS,
    Manifest,
    ModalityInfo,
    ShardInfo,
    sha256_file,
)
from snag_dist.data.name_encoder import TEXT_ENCODERS
from snag_dist.data.readers import SourceDataset, read_dataset
from snag_dist.data.records import MEMBER, Column, EntityBlock, EntityLayout
from snag_dist.data.tempdirs import check_output, describe_removed, make_dir
from snag_dist.errors import ConfigError, DataError
from snag_dist.fsio import atomic_dir, atomic_write_json, remove_stale

_MODALITY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class PrepareOptions:
    shard_size: int = 16384  # entities per entity shard
    entity_block: int = 256  # entities per entity-shard sample (the unit of tar members and of decoding)
    block_size: int = 8192  # triples / links per sample
    min_shards: int = 4  # every split gets at least this many shards (ranks x workers) when it can
    relation_topk: int = 1000  # relation-bag modality size (0 = no relation modality)
    text: str = "none"  # name embeddings: none | minilm | chargram
    dtype: str = "float16"  # storage dtype of dense features
    train_ratio: float = 0.3  # alignment: share of gold links used for training (when not predefined)
    valid_ratio: float = 0.1  # alignment: share of the training links held out for validation
    seed: int = 0
    allow_pickle: bool = False
    overwrite: bool = False
    mask_nonfinite: bool = False  # NaN/inf feature rows -> that entity lacks the modality (else an error)

    def validate(self) -> None:
        checks = [
            ("shard_size", self.shard_size >= 1), ("entity_block", self.entity_block >= 1),
            ("block_size", self.block_size >= 1),
            ("min_shards", self.min_shards >= 1), ("relation_topk", self.relation_topk >= 0),
            ("text", self.text in TEXT_ENCODERS), ("dtype", self.dtype in ("float16", "float32")),
            ("train_ratio", 0.0 < self.train_ratio <= 1.0), ("valid_ratio", 0.0 <= self.valid_ratio < 1.0),
        ]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"prepare option --{key.replace('_', '-')}: bad value {getattr(self, key)!r}")


class ShardSink:
    """Writes numbered tar shards of one group and records their ShardInfo.

    Each shard's sha256 is computed on the ``hasher`` thread (hashlib releases the GIL) while the
    next shard is built; ``infos`` waits for them.
    """

    def __init__(self, root: Path, group: str, prefix: str, hasher: Executor) -> None:
        self.root, self.group, self.prefix, self.hasher = root, group, prefix, hasher
        self._written: list[tuple[ShardInfo, Future]] = []
        (root / Path(prefix).parent).mkdir(parents=True, exist_ok=True)

    @property
    def infos(self) -> list[ShardInfo]:
        for info, digest in self._written:
            info.sha256 = digest.result()
        return [info for info, _ in self._written]

    def write(self, samples: Iterator[dict], rows: int, first_id: int = -1, last_id: int = -1) -> None:
        rel = f"{self.prefix}-{len(self._written):06d}.tar"
        path = self.root / rel
        count = 0
        # USTAR + fixed mtime: no per-member PAX header (2x faster) and byte-identical reruns. A 1 MiB
        # file buffer: tarfile writes 10 KiB records, and a syscall each is 4x slower per byte.
        with open(path, "wb", buffering=1 << 20) as fh, \
                wds.TarWriter(fh, encoder=False, mtime=0, format=tarfile.USTAR_FORMAT) as sink:
            for sample in samples:
                sink.write(sample)
                count += 1
        info = ShardInfo(rel, count, path.stat().st_size, "", rows, first_id, last_id)
        self._written.append((info, self.hasher.submit(sha256_file, path)))


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _entity_samples(features: EntityFeatures, layout: EntityLayout, start: int, stop: int,
                    block: int) -> Iterator[dict]:
    """Samples of ``block`` consecutive entities each, cut from one columnar chunk."""
    cols, mask = features.chunk(start, stop)
    dense = {c.name: cols[c.name] for c in features.columns if c.kind == "dense"}
    bags = {c.name: cols[c.name] for c in features.columns if c.kind == "bag"}
    chunk = EntityBlock(np.arange(start, stop), features.ds.kg[start:stop], mask, dense, bags)
    for a in range(0, stop - start, block):
        part = chunk.slice(a, min(a + block, stop - start))
        yield {"__key__": f"{start + a:010d}", MEMBER: layout.encode(part)}


def _write_entities(features: EntityFeatures, out: Path, opts: PrepareOptions, progress, hasher: Executor) -> ShardSink:
    n = features.ds.num_entities
    size = max(1, min(opts.shard_size, math.ceil(n / opts.min_shards)))
    sink = ShardSink(out, "entities", "entities/entities", hasher)
    layout = EntityLayout(tuple(Column(c.name, c.kind, c.dim, np.dtype(c.dtype)) for c in features.columns))
    for start in range(0, n, size):
        stop = min(n, start + size)
        sink.write(_entity_samples(features, layout, start, stop, opts.entity_block), stop - start, start, stop - 1)
        progress(stop - start)
    return sink


class TripleCache:
    """Each triple split parsed from text once into a raw little-endian int64 (rows, 3) file.

    Prepare reads the train split four times (relation frequencies, relation bag, count, shards);
    text parsing is ~20x slower than reading the binary file back.
    """

    def __init__(self, ds: SourceDataset, folder: Path, block_rows: int = 1 << 20) -> None:
        self.folder, self.block_rows = folder, block_rows
        self.rows: dict[str, int] = {}
        folder.mkdir()
        for split in ds.splits():
            with open(folder / f"{split}.i64", "wb") as fh:
                self.rows[split] = 0
                for block in ds.iter_triples(split):
                    fh.write(np.ascontiguousarray(block, dtype="<i8").tobytes())
                    self.rows[split] += len(block)

    def blocks(self, split: str) -> Iterator[np.ndarray]:
        if split not in self.rows:
            return
        with open(self.folder / f"{split}.i64", "rb") as fh:
            while (flat := np.fromfile(fh, dtype="<i8", count=3 * self.block_rows)).size:
                yield flat.reshape(-1, 3).astype(np.int64, copy=False)


def _reblock(blocks: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Rows re-cut into fresh arrays of ``size`` rows (the last may be shorter).

    Each output is its own copy: a view would pin the whole (up to 1M-row) input block, and a shard
    holds ~100 outputs before it is written.
    """
    for pieces in cut_batches(blocks, size):
        yield concat_rows(pieces)


def _write_rows(out: Path, group: str, blocks: Iterator[np.ndarray], total: int, member: str,
                opts: PrepareOptions, hasher: Executor) -> ShardSink:
    """Blocks of rows -> shards; sized so a split of ``total`` rows gets >= min_shards shards."""
    per_shard = max(1, math.ceil(total / opts.min_shards))
    block = max(1, min(opts.block_size, per_shard))
    blocks_per_shard = max(1, per_shard // block)
    sink = ShardSink(out, group, group, hasher)
    stream = _reblock(blocks, block)
    index = 0
    while True:
        batch = [b for _, b in zip(range(blocks_per_shard), stream)]
        if not batch:
            break
        samples = ({"__key__": f"block{index + j:08d}", member: _npy_bytes(b)} for j, b in enumerate(batch))
        sink.write(samples, sum(len(b) for b in batch))
        index += len(batch)
    return sink


def _modalities(features: EntityFeatures, n: int, out: Path) -> tuple[dict[str, ModalityInfo], dict[str, np.ndarray]]:
    infos, stats = {}, {}
    for col in features.columns:
        mom = features.moments[col.name]
        mean, std = mom.mean_std()
        stats[f"{col.name}.mean"], stats[f"{col.name}.std"] = mean, std
        infos[col.name] = ModalityInfo(col.kind, col.dim, col.dtype, mom.n / max(n, 1),
                                       float(mean.mean()), float(std.mean()), col.source)
    save_file(stats, str(out / STATS))
    return infos, stats


def _check_modality_names(ds: SourceDataset) -> None:
    for name, feat in ds.features.items():
        if not _MODALITY_NAME.match(name):
            raise DataError(f"{feat.path}: modality name '{name}' must match [a-z][a-z0-9_]*")


def _write_all(ds: SourceDataset, out: Path, opts: PrepareOptions, progress) -> Manifest:
    cache = TripleCache(ds, out / ".triples")
    features = EntityFeatures(ds, opts.relation_topk, opts.text, opts.dtype, triples=cache.blocks,
                              mask_nonfinite=opts.mask_nonfinite)
    counts: dict = {"entities": ds.num_entities, "relations": ds.num_relations,
                    "kgs": int(ds.kg.max()) + 1, "triples": {}, "links": {}}
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        source_digests = {str(p.relative_to(ds.root)): hasher.submit(sha256_file, p) for p in ds.source_files}
        sinks = {"entities": _write_entities(features, out, opts, progress, hasher)}
        for split in ds.splits():
            total = cache.rows[split]
            if total == 0:
                raise DataError(f"{ds.root}: empty '{split}' triple split")
            counts["triples"][split] = total
            sinks[f"triples/{split}"] = _write_rows(out, f"triples/{split}", cache.blocks(split), total,
                                                    "hrt.npy", opts, hasher)
        shutil.rmtree(cache.folder)
        for split, pairs in ds.links.items():
            counts["links"][split] = len(pairs)
            if len(pairs):
                sinks[f"links/{split}"] = _write_rows(out, f"links/{split}", iter([pairs]), len(pairs),
                                                      "pairs.npy", opts, hasher)
        shards = {group: sink.infos for group, sink in sinks.items()}
        sources = {name: digest.result() for name, digest in source_digests.items()}
    modalities, _ = _modalities(features, ds.num_entities, out)
    if features.masked:
        counts["masked_nonfinite"] = dict(features.masked)
        for name, n in features.masked.items():
            _notice(f"{n} entities with non-finite '{name}' values treated as missing '{name}' "
                    f"({ds.features[name].path.name}, --mask-nonfinite)")
    return Manifest(
        task=ds.task, name=ds.root.name, counts=counts, modalities=modalities, shards=shards,
        sources=sources,
        options={**asdict(opts), "source": str(ds.root.resolve()), "snag_dist": __version__},
        stats_sha256=sha256_file(out / STATS),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        relation_names=ds.relation_names,
    )


def _notice(message: str) -> None:
    print(f"snag-dist prepare: {message}", file=sys.stderr)


def prepare(dataset_dir: str | Path, out_dir: str | Path, opts: PrepareOptions = PrepareOptions(),
            show_progress: bool = True) -> Manifest:
    """Read ``dataset_dir``, write shards + manifest to ``out_dir`` atomically; return the manifest.

    Temp folders of earlier prepares into the same ``out_dir`` that were killed (same host, dead
    PID) are removed first, with a one-line notice on stderr.
    """
    opts.validate()
    out = Path(out_dir)
    check_output(out, opts.overwrite)
    ds = read_dataset(dataset_dir, opts.allow_pickle, opts.train_ratio, opts.valid_ratio, opts.seed)
    _check_modality_names(ds)
    make_dir(out.parent, parents=True)
    stale = remove_stale(out, ("tmp",) + (("old",) if out.is_dir() else ()))
    if stale:
        _notice(describe_removed(stale))
    from tqdm.auto import tqdm

    # An existing OUT_DIR (--overwrite) is renamed aside to .OUT.old-HOST-PID, then deleted.
    with atomic_dir(out, mkdir=make_dir) as tmp:
        with tqdm(total=ds.num_entities, unit="ent", desc="prepare", disable=not show_progress) as bar:
            manifest = _write_all(ds, tmp, opts, bar.update)
        atomic_write_json(tmp / MANIFEST, manifest.to_json(), indent=1)
    return manifest
