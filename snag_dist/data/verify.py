"""``snag-dist verify``: every shard checked against the manifest (size, sha256, sample count)."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from snag_dist.data.manifest import STATS, ShardInfo, load_manifest, sha256_file
from snag_dist.errors import DataError


@dataclass
class VerifyReport:
    shards: int
    samples: int
    bytes: int


def _count_samples(path: Path) -> int:
    keys = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                keys.add(member.name.split(".", 1)[0])
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"corrupt shard {path}: unreadable tar ({exc})") from None
    return len(keys)


def verify_shard(root: Path, info: ShardInfo, deep: bool = True) -> None:
    path = root / info.file
    if not path.is_file():
        raise DataError(f"missing shard {path}")
    size = path.stat().st_size
    if size != info.bytes:
        raise DataError(f"corrupt shard {path}: {size} bytes, manifest says {info.bytes}")
    if sha256_file(path) != info.sha256:
        raise DataError(f"corrupt shard {path}: sha256 does not match the manifest")
    if deep and _count_samples(path) != info.samples:
        raise DataError(f"corrupt shard {path}: sample count differs from the manifest ({info.samples})")


def verify(shards_dir: str | Path, deep: bool = True, progress: bool = False) -> VerifyReport:
    root = Path(shards_dir)
    manifest = load_manifest(root)
    stats = root / STATS
    if not stats.is_file():
        raise DataError(f"missing file {stats}")
    if manifest.stats_sha256 and sha256_file(stats) != manifest.stats_sha256:
        raise DataError(f"corrupt file {stats}: sha256 does not match the manifest")
    infos = [s for group in manifest.shards.values() for s in group]
    from tqdm.auto import tqdm

    for info in tqdm(infos, desc="verify", unit="shard", disable=not progress):
        verify_shard(root, info, deep)
    return VerifyReport(len(infos), sum(s.samples for s in infos), sum(s.bytes for s in infos))
