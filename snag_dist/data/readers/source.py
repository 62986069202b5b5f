"""The in-between form every reader returns: a raw dataset opened for chunked reading.

A ``SourceDataset`` holds small things in memory (id maps, links, names) and opens big things
(triple files, feature tables) lazily, so ``prepare`` can stream a 1M-entity graph.
Entity ids are global and contiguous (0..N-1) after reading; relation ids are remapped to 0..R-1.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from snag_dist.data.readers.features import FeatureSource
from snag_dist.data.readers.text import iter_int_rows
from snag_dist.errors import DataError

SPLITS = ("train", "valid", "test")


@dataclass
class TripleFile:
    path: Path
    split: str


@dataclass
class SourceDataset:
    task: str  # "alignment" | "completion"
    root: Path
    num_entities: int
    relation_map: np.ndarray  # raw relation id -> contiguous id (-1 = unknown)
    relation_names: list[str]
    kg: np.ndarray  # (N,) uint8: which KG an entity belongs to (0 for completion)
    triple_files: list[TripleFile]
    links: dict[str, np.ndarray] = field(default_factory=dict)  # split -> (L, 2) int64
    names: list[str] | None = None  # (N,) surface names, when the dataset has them
    features: dict[str, FeatureSource] = field(default_factory=dict)
    source_files: list[Path] = field(default_factory=list)

    @property
    def num_relations(self) -> int:
        return len(self.relation_names)

    def splits(self) -> list[str]:
        return [s for s in SPLITS if any(tf.split == s for tf in self.triple_files)]

    def iter_triples(self, split: str) -> Iterator[np.ndarray]:
        """Validated (B, 3) int64 blocks of (head, relation, tail) with contiguous ids."""
        for tf in self.triple_files:
            if tf.split == split:
                for block in iter_int_rows(tf.path, 3):
                    yield self._check_triples(tf.path, block)

    def _check_triples(self, path: Path, block: np.ndarray) -> np.ndarray:
        ents = block[:, [0, 2]]
        bad = (ents < 0) | (ents >= self.num_entities)
        if bad.any():
            value = int(ents[bad][0])
            raise DataError(f"{path}: entity id {value} out of range [0, {self.num_entities})")
        raw_rel = block[:, 1]
        ok = (raw_rel >= 0) & (raw_rel < len(self.relation_map))
        rel = np.full(raw_rel.shape, -1, dtype=np.int64)
        rel[ok] = self.relation_map[raw_rel[ok]]
        if (rel < 0).any():
            value = int(raw_rel[rel < 0][0])
            raise DataError(f"{path}: unknown relation id {value} (not in the relation list)")
        return np.stack([block[:, 0], rel, block[:, 2]], axis=1)

    def check_links(self, path: Path, links: np.ndarray) -> np.ndarray:
        bad = (links < 0) | (links >= self.num_entities)
        if bad.any():
            raise DataError(f"{path}: entity id {int(links[bad][0])} out of range [0, {self.num_entities})")
        return links


def contiguous_map(raw_ids: np.ndarray, what: str, path: Path) -> np.ndarray:
    """raw id -> 0..n-1 in the given order; duplicate or negative ids are errors."""
    if raw_ids.size == 0:
        raise DataError(f"{path}: no {what} ids")
    if raw_ids.min() < 0:
        raise DataError(f"{path}: negative {what} id {int(raw_ids.min())}")
    mapping = np.full(int(raw_ids.max()) + 1, -1, dtype=np.int64)
    mapping[raw_ids] = np.arange(raw_ids.size)
    if (mapping >= 0).sum() != raw_ids.size:
        raise DataError(f"{path}: duplicate {what} ids")
    return mapping


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def clean_name(raw: str) -> str:
    """A readable surface name from a URI or YAGO/DBpedia label: last path segment, unquoted, spaced."""
    text = raw.strip().strip("<>")
    if "/" in text:
        text = text.rstrip("/").rsplit("/", 1)[-1]
    text = unquote(text).replace("_", " ")
    return " ".join(text.split())


def require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    return path
