"""Entity-alignment datasets in the DBP15K / OpenEA (GCN-Align) layout.

Two KGs with global entity ids: ``ent_ids_1/2`` (``id<TAB>URI``), ``triples_1/2`` (``h r t``),
optional ``rel_ids_1/2``, gold links in ``ref_ent_ids`` (or ``ill_ent_ids``) — split by seed into
train/valid/test — or predefined ``sup_ent_ids`` (train) + ``ref_ent_ids`` (test), validation then
carved from train. KG1 names come from ``ent_ids_1_trans_goo`` (translated) when present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from snag_dist.data.readers.features import discover_features
from snag_dist.data.readers.source import (
    SourceDataset,
    TripleFile,
    check_unique,
    clean_name,
    contiguous_map,
    locate,
    require,
)
from snag_dist.data.readers.text_files import read_id_names, read_int_rows
from snag_dist.errors import DataError
from snag_dist.seeding import numpy_rng


def is_openea(root: Path) -> bool:
    return (root / "ent_ids_1").is_file() or (root / "triples_1").is_file()


def split_links(links: np.ndarray, train_ratio: float, valid_ratio: float, seed: int) -> dict[str, np.ndarray]:
    """Shuffle with ``seed``; ``train_ratio`` of links train (of which ``valid_ratio`` becomes valid)."""
    order = numpy_rng(seed).permutation(len(links))
    shuffled = links[order]
    n_train = int(round(train_ratio * len(links)))
    n_valid = int(round(valid_ratio * n_train))
    return {
        "train": shuffled[n_valid:n_train],
        "valid": shuffled[:n_valid],
        "test": shuffled[n_train:],
    }


def _carve_valid(train: np.ndarray, valid_ratio: float, seed: int) -> dict[str, np.ndarray]:
    order = numpy_rng(seed).permutation(len(train))
    n_valid = int(round(valid_ratio * len(train)))
    return {"train": train[order[n_valid:]], "valid": train[order[:n_valid]]}


def _relations(root: Path, triple_paths: list[Path]) -> tuple[np.ndarray, list[str], list[Path]]:
    rel_files = [root / "rel_ids_1", root / "rel_ids_2"]
    if all(p.is_file() for p in rel_files):
        ids, names = [], []
        for p in rel_files:
            i, n = read_id_names(p)
            ids.append(i)
            names += n
        raw = np.concatenate(ids)
        origins = [(p, len(i)) for p, i in zip(rel_files, ids)]
        return contiguous_map(raw, "relation", rel_files[0], origins), names, rel_files
    # No relation lists: every relation id used in the triples, in increasing order.
    used = np.unique(np.concatenate([np.unique(read_int_rows(p, 3)[:, 1]) for p in triple_paths]))
    return contiguous_map(used, "relation", triple_paths[0]), [str(r) for r in used], []


def _entities(root: Path) -> tuple[int, np.ndarray, list[str], list[Path]]:
    files = [require(root / "ent_ids_1"), require(root / "ent_ids_2")]
    (ids1, names1), (ids2, names2) = (read_id_names(p) for p in files)
    for path, part in zip(files, (ids1, ids2)):
        if len(part) == 0:
            raise DataError(f"{path}: no entities (the file is empty)")
    ids = np.concatenate([ids1, ids2])
    n = len(ids)
    origins = [(files[0], len(ids1)), (files[1], len(ids2))]
    check_unique(ids, "entity", origins)
    outside = (ids < 0) | (ids >= n)
    if outside.any():
        path, line = locate(origins, int(np.argmax(outside)))
        raise DataError(f"{path}: line {line}: entity id {int(ids[outside][0])} outside 0..{n - 1} (ent_ids_1 and "
                        f"ent_ids_2 hold {n} entities together, numbered 0..{n - 1} without gaps)")
    kg = np.zeros(n, dtype=np.uint8)
    kg[ids2] = 1
    names = [""] * n
    for i, name in zip(ids.tolist(), names1 + names2):
        names[i] = clean_name(name)
    trans = root / "ent_ids_1_trans_goo"
    if trans.is_file():
        t_ids, t_names = read_id_names(trans)
        for i, name in zip(t_ids.tolist(), t_names):
            if 0 <= i < n:
                names[i] = " ".join(name.split())
        files.append(trans)
    return n, kg, names, files


def _links(root: Path, ds: SourceDataset, train_ratio: float, valid_ratio: float, seed: int) -> list[Path]:
    sup, ref, ill = root / "sup_ent_ids", root / "ref_ent_ids", root / "ill_ent_ids"
    if sup.is_file():
        train = ds.check_links(sup, read_int_rows(sup, 2))
        test = ds.check_links(require(ref), read_int_rows(ref, 2))
        ds.links = {**_carve_valid(train, valid_ratio, seed), "test": test}
        return [sup, ref]
    path = ref if ref.is_file() else ill
    links = ds.check_links(require(path), read_int_rows(path, 2))
    if len(links) == 0:
        raise DataError(f"{path}: no alignment links")
    ds.links = split_links(links, train_ratio, valid_ratio, seed)
    return [path]


def read_openea(root: Path, allow_pickle: bool = False, train_ratio: float = 0.3,
                valid_ratio: float = 0.1, seed: int = 0) -> SourceDataset:
    n, kg, names, ent_files = _entities(root)
    triple_paths = [require(root / "triples_1"), require(root / "triples_2")]
    rel_map, rel_names, rel_files = _relations(root, triple_paths)
    ds = SourceDataset(
        task="alignment", root=root, num_entities=n, relation_map=rel_map, relation_names=rel_names,
        kg=kg, triple_files=[TripleFile(p, "train") for p in triple_paths], names=names,
    )
    link_files = _links(root, ds, train_ratio, valid_ratio, seed)
    for split, pairs in ds.links.items():
        if split != "valid" and len(pairs) == 0:
            raise DataError(f"{root}: empty '{split}' link split (check --train-ratio)")
    ds.features = discover_features(root, n, allow_pickle)
    ds.source_files = ent_files + triple_paths + rel_files + link_files + [f.path for f in ds.features.values()]
    return ds
