"""KG-completion datasets in the MyGO layout (DB15K, MKG-W, MKG-Y).

``entities.txt`` / ``relations.txt`` (one id per line; line order is the index), ``train.txt``,
``valid.txt``, ``test.txt`` (``head<TAB>relation<TAB>tail``), optional ``entity2id.txt`` names
(``name id``; DB15K's starts with a count line).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from snag_dist.data.readers.features import discover_features
from snag_dist.data.readers.source import SourceDataset, TripleFile, clean_name, contiguous_map, require
from snag_dist.data.readers.text_files import read_id_names, read_int_rows
from snag_dist.errors import DataError


def is_mkgc(root: Path) -> bool:
    return (root / "train.txt").is_file()


def _names(root: Path, entity_map: np.ndarray, n: int) -> tuple[list[str] | None, list[Path]]:
    path = root / "entity2id.txt"
    if not path.is_file():
        return None, []
    ids, raw = read_id_names(path, sep=None, id_last=True, skip_count_line=True)
    names = [""] * n
    for i, name in zip(ids.tolist(), raw):
        if 0 <= i < len(entity_map) and entity_map[i] >= 0:
            names[entity_map[i]] = clean_name(name)
    return names, [path]


def read_mkgc(root: Path, allow_pickle: bool = False, **_: object) -> SourceDataset:
    ent_path, rel_path = require(root / "entities.txt"), require(root / "relations.txt")
    ent_raw = read_int_rows(ent_path, 1)[:, 0]
    entity_map = contiguous_map(ent_raw, "entity", ent_path)
    if not np.array_equal(ent_raw, np.arange(len(ent_raw))):
        raise DataError(f"{ent_path}: entity ids must be 0..{len(ent_raw) - 1} in order")
    rel_raw = read_int_rows(rel_path, 1)[:, 0]
    n = len(ent_raw)
    names, name_files = _names(root, entity_map, n)
    split_files = {s: require(root / f"{s}.txt") for s in ("train", "valid", "test")}
    for split, path in split_files.items():
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty '{split}' split")
    ds = SourceDataset(
        task="completion", root=root, num_entities=n,
        relation_map=contiguous_map(rel_raw, "relation", rel_path),
        relation_names=[str(r) for r in rel_raw.tolist()], kg=np.zeros(n, dtype=np.uint8),
        triple_files=[TripleFile(p, s) for s, p in split_files.items()], names=names,
    )
    ds.features = discover_features(root, n, allow_pickle)
    ds.source_files = [ent_path, rel_path, *split_files.values(), *name_files, *[f.path for f in ds.features.values()]]
    return ds
