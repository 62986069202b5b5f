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
from snag_dist.data.readers.text_files import iter_int_rows, line_of_row
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
                rows = 0
                for block in iter_int_rows(tf.path, 3):
                    yield self._check_triples(tf.path, block, rows)
                    rows += len(block)
                if rows == 0:
                    raise DataError(f"{tf.path}: no triples (the file is empty)")

    def _check_triples(self, path: Path, block: np.ndarray, offset: int) -> np.ndarray:
        """``block`` holds the file's rows ``offset``..; errors name the file's line."""
        ents = block[:, [0, 2]]
        bad = (ents < 0) | (ents >= self.num_entities)
        if bad.any():
            row = int(np.argmax(bad.any(1)))
            value = int(ents[row][bad[row]][0])
            raise DataError(f"{path}: line {line_of_row(path, offset + row)}: entity id {value} out of range "
                            f"[0, {self.num_entities})")
        raw_rel = block[:, 1]
        ok = (raw_rel >= 0) & (raw_rel < len(self.relation_map))
        rel = np.full(raw_rel.shape, -1, dtype=np.int64)
        rel[ok] = self.relation_map[raw_rel[ok]]
        if (rel < 0).any():
            row = int(np.argmax(rel < 0))
            raise DataError(f"{path}: line {line_of_row(path, offset + row)}: unknown relation id {int(raw_rel[row])} "
                            "(not in the relation list)")
        return np.stack([block[:, 0], rel, block[:, 2]], axis=1)

    def check_links(self, path: Path, links: np.ndarray) -> np.ndarray:
        """Every link joins two known entities; alignment links a KG1 entity (left) to a KG2 one (right)."""
        bad = (links < 0) | (links >= self.num_entities)
        if bad.any():
            row = int(np.argmax(bad.any(1)))
            value = int(links[row][bad[row]][0])
            raise DataError(f"{path}: line {line_of_row(path, row)}: unknown entity id {value} "
                            f"(out of range [0, {self.num_entities}))")
        if self.task == "alignment" and len(links):
            kgs = self.kg[links]
            wrong = (kgs[:, 0] != 0) | (kgs[:, 1] != 1)
            if wrong.any():
                row = int(np.argmax(wrong))
                a, b = (int(v) for v in links[row])
                raise DataError(f"{path}: line {line_of_row(path, row)}: link {a} -> {b} joins a KG{kgs[row, 0] + 1} "
                                f"and a KG{kgs[row, 1] + 1} entity; a link pairs a KG1 entity (ent_ids_1) with "
                                "a KG2 entity (ent_ids_2)")
        return links


def first_duplicate(values: np.ndarray) -> tuple[int, int] | None:
    """(earlier, later) positions of the first value (in order of its second occurrence) given twice."""
    order = np.argsort(values, kind="stable")
    same = np.flatnonzero(values[order][1:] == values[order][:-1])
    if not same.size:
        return None
    k = int(np.argmin(order[same + 1]))
    return int(order[same[k]]), int(order[same[k] + 1])


def locate(origins: list[tuple[Path, int]], index: int) -> tuple[Path, int]:
    """``index`` into rows concatenated from ``origins`` (file, rows) -> (file, line)."""
    for path, rows in origins:
        if index < rows:
            return path, line_of_row(path, index)
        index -= rows
    raise IndexError(index)


def check_unique(ids: np.ndarray, what: str, origins: list[tuple[Path, int]]) -> None:
    """A repeated id is an error naming the id, and the file and line of both occurrences."""
    dup = first_duplicate(ids)
    if dup is not None:
        (path1, line1), (path2, line2) = (locate(origins, i) for i in dup)
        first = f"line {line1}" if path1 == path2 else f"{path1} line {line1}"
        raise DataError(f"{path2}: line {line2}: duplicate {what} id {int(ids[dup[1]])} (first given on {first})")


def contiguous_map(raw_ids: np.ndarray, what: str, path: Path,
                   origins: list[tuple[Path, int]] | None = None) -> np.ndarray:
    """raw id -> 0..n-1 in the given order; duplicate or negative ids are errors.

    ``origins``: the files (and their row counts) ``raw_ids`` were read from, when more than ``path``.
    """
    origins = origins or [(path, raw_ids.size)]
    if raw_ids.size == 0:
        raise DataError(f"{path}: no {what} ids")
    if raw_ids.min() < 0:
        at, line = locate(origins, int(np.argmin(raw_ids)))
        raise DataError(f"{at}: line {line}: negative {what} id {int(raw_ids.min())}")
    check_unique(raw_ids, what, origins)
    mapping = np.full(int(raw_ids.max()) + 1, -1, dtype=np.int64)
    mapping[raw_ids] = np.arange(raw_ids.size)
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
