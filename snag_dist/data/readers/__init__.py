"""Readers of raw MMKG datasets: detect the layout and return a ``SourceDataset``."""

from __future__ import annotations

from pathlib import Path

from snag_dist.data.readers.mkgc import is_mkgc, read_mkgc
from snag_dist.data.readers.openea import is_openea, read_openea, split_links
from snag_dist.data.readers.source import SPLITS, SourceDataset
from snag_dist.errors import DataError


def read_dataset(path: str | Path, allow_pickle: bool = False, train_ratio: float = 0.3,
                 valid_ratio: float = 0.1, seed: int = 0) -> SourceDataset:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"dataset directory not found: {root}")
    if is_openea(root):
        return read_openea(root, allow_pickle, train_ratio, valid_ratio, seed)
    if is_mkgc(root):
        return read_mkgc(root, allow_pickle)
    raise DataError(
        f"{root}: unknown dataset layout (expected ent_ids_1/triples_1 for alignment or train.txt for completion)"
    )


__all__ = ["SPLITS", "SourceDataset", "read_dataset", "split_links"]
