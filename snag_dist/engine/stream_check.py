"""Stream every shard group once per epoch on every rank and check exactly-once delivery.

Run under torchrun (gloo): each rank streams its shard subset through DataLoader workers; rank 0
gathers the ids/counts, checks that every entity, triple and link was seen exactly once, and
prints throughput. Used by ``make demo`` and the multi-process tests.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from snag_dist.data.manifest import load_manifest
from snag_dist.data.stream import EntityStream, RowStream, StreamConfig, make_loader
from snag_dist.errors import DataError


def _init() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return int(os.environ.get("RANK", "0")), world


def _stream_epoch(root: Path, cfg: StreamConfig, epoch: int, workers: int) -> dict:
    manifest = load_manifest(root)
    ents = EntityStream(root, cfg)
    ents.set_epoch(epoch)
    t0, ids, nbytes = time.perf_counter(), [], 0
    for batch in make_loader(ents, workers):
        ids.append(batch["ids"].numpy())
    ent_time = time.perf_counter() - t0
    rows: dict[str, list] = {}
    for group in manifest.shards:
        if group == "entities":
            continue
        stream = RowStream(root, group, cfg)
        stream.set_epoch(epoch)
        rows[group] = [b.numpy() for b in make_loader(stream, workers)]
    mine = set(split_paths(root, manifest, cfg.rank, cfg.world_size))
    nbytes = sum(s.bytes for v in manifest.shards.values() for s in v if str(root / s.file) in mine)
    return {
        "ids": np.concatenate(ids) if ids else np.zeros(0, np.int64),
        "rows": {g: (np.concatenate(v) if v else np.zeros((0, 2))) for g, v in rows.items()},
        "entity_seconds": ent_time, "seconds": time.perf_counter() - t0, "bytes": nbytes,
    }


def split_paths(root: Path, manifest, rank: int, world: int) -> list[str]:
    """Shard files a rank reads (same rule as the stream's nodesplitter, before the epoch shuffle)."""
    return [p for g in manifest.shards for p in manifest.shard_paths(root, g)[rank::world]]


def _check(manifest, parts: list[dict]) -> dict:
    ids = np.concatenate([p["ids"] for p in parts])
    if len(ids) != manifest.num_entities or len(np.unique(ids)) != manifest.num_entities:
        raise DataError(f"entities not seen exactly once: {len(ids)} seen, {len(np.unique(ids))} unique, "
                        f"{manifest.num_entities} expected")
    for group in parts[0]["rows"]:
        got = sum(len(p["rows"][group]) for p in parts)
        kind, split = group.split("/")
        want = manifest.counts[kind][split]
        if got != want:
            raise DataError(f"{group}: {got} rows streamed, manifest has {want}")
    return {"entities": int(len(ids)), "groups": list(parts[0]["rows"])}


def run_stream_check(shards_dir: str, epochs: int = 1, workers: int = 2, batch_size: int = 1024,
                     seed: int = 0, out_json: str = "") -> int:
    rank, world = _init()
    root = Path(shards_dir)
    manifest = load_manifest(root)
    cfg = StreamConfig(rank=rank, world_size=world, seed=seed, shuffle_buffer=256, batch_size=batch_size)
    report = []
    for epoch in range(epochs):
        part = _stream_epoch(root, cfg, epoch, workers)
        parts = [None] * world
        if world > 1:
            dist.all_gather_object(parts, part)
        else:
            parts = [part]
        if rank == 0:
            summary = _check(manifest, parts)
            rates = [p["bytes"] / 2**20 / max(p["seconds"], 1e-9) for p in parts]
            ent_rates = [len(p["ids"]) / max(p["entity_seconds"], 1e-9) for p in parts]
            report.append({"epoch": epoch, **summary, "ranks": world, "workers": workers,
                           "mib_per_s_per_rank": rates, "entities_per_s_per_rank": ent_rates,
                           "first_ids": [p["ids"][:5].tolist() for p in parts]})
    if rank == 0:
        for r in report:
            print(f"epoch {r['epoch']}: {r['entities']:,} entities and {', '.join(r['groups'])} each seen exactly "
                  f"once across {world} ranks x {workers} workers; per rank "
                  f"{', '.join(f'{x:.1f}' for x in r['mib_per_s_per_rank'])} MiB/s, "
                  f"{', '.join(f'{x:,.0f}' for x in r['entities_per_s_per_rank'])} entities/s")
        if out_json:
            Path(out_json).write_text(json.dumps(report, indent=1))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0
