"""Shard integrity where shards are read: the manifest's size and sha256 of every shard, checked.

``prepare`` records each shard's size and sha256 in the manifest (``verify`` checks them all on
demand). Training checks them too, without reading a shard twice:

- the size when a shard is opened (a truncated or extended shard fails before any byte is used);
- the sha256 over the bytes as the tar reader consumes them, finished when the shard's archive
  ends (the rest of the file is read and hashed), before the shard's last sample is handed on.
  Earlier samples of a bad shard have been decoded by then, so a run stops within the epoch that
  reads the shard — with a one-line error naming it — and a store built from it is never kept.
- A shard that passed once in this process is not hashed again while its size, mtime and inode
  are unchanged (the size is still checked), so later epochs pay no hashing.

Manifests whose shards carry no sha256 (hand-made ones; every ``prepare`` so far writes it) keep
working: the hash check is skipped for those shards, the size check stays.

``store_key`` is the key of the stores built from shards (``.store``): the manifest's sha256 (which
covers every shard's checksum) plus each source shard's size and mtime, so a shard that was
rewritten, truncated or replaced after a store was built makes the store rebuild — and the
rebuild reads, and checks, the shard. (Not the inode: copies made with ``cp -p``/``rsync -a`` on
several nodes may share one ``data.store_dir``. A plain ``cp`` of a shard folder rebuilds its store once.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from snag_dist.data.manifest import MANIFEST, Manifest, ShardInfo, sha256_file
from snag_dist.errors import DataError

_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, inode, sha256) of shards that passed in this process


def _stat_key(path: str | Path, st: os.stat_result, sha: str) -> tuple:
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino, sha)


class CheckedShard:
    """A shard file read front to back (as tarfile's stream mode reads), hashed as it goes."""

    def __init__(self, path: str | Path, info: ShardInfo | None, bufsize: int = 1 << 20) -> None:
        self.path, self.info = str(path), info
        try:
            self.fh = open(path, "rb", buffering=bufsize)
        except FileNotFoundError:
            raise DataError(f"missing shard {path}") from None
        except OSError as exc:
            raise DataError(f"unreadable shard {path}: {exc.strerror or exc}") from None
        st = os.fstat(self.fh.fileno())
        if info is not None and st.st_size != info.bytes:
            self.fh.close()
            raise DataError(f"corrupt shard {path}: {st.st_size} bytes, manifest says {info.bytes} "
                            "(run `snag-dist verify`, re-run `snag-dist prepare`)")
        self._key = _stat_key(path, st, info.sha256) if info is not None else None
        hashed = info is not None and bool(info.sha256) and self._key not in _VERIFIED
        self.digest = hashlib.sha256() if hashed else None
        self.name = self.path  # tarfile and webdataset print it

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def finish(self) -> None:
        """Read (and hash) what the tar reader left, close, and compare with the manifest."""
        try:
            if self.digest is not None:
                while chunk := self.fh.read(1 << 20):
                    self.digest.update(chunk)
        finally:
            self.close()
        if self.digest is None:
            return
        if self.digest.hexdigest() != self.info.sha256:
            raise DataError(f"corrupt shard {self.path}: sha256 does not match the manifest "
                            "(run `snag-dist verify`, re-run `snag-dist prepare`)")
        _VERIFIED.add(self._key)

    def close(self) -> None:
        self.fh.close()

    def __repr__(self) -> str:
        return self.path


def shard_infos(root: str | Path, manifest: Manifest, groups: Iterable[str]) -> dict[str, ShardInfo]:
    """Shard path (as the streams name it) -> its manifest entry."""
    return {str(Path(root) / s.file): s for g in groups for s in manifest.shards.get(g, [])}


def store_key(root: str | Path, infos: Iterable[ShardInfo]) -> str:
    """Cache key of a store built from ``infos``: the manifest's sha256 + each shard's checksum, size, mtime."""
    root = Path(root)
    files = []
    for info in infos:
        path = root / info.file
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DataError(f"missing shard {path}") from None
        files.append([info.file, info.sha256, st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return f"{sha256_file(root / MANIFEST)}+{digest}"
