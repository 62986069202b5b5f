"""The two dataset layouts: ``mkgc`` (KG completion: train/valid/test triples) and ``mmea`` (entity
alignment: two KGs and gold links). For ``mmea``, KG2 is KG1 mapped through the gold links with some
edges dropped and others added, so the structure carries the alignment.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from snag_dist.data.synth.graph import (
    ALIGN,
    COVER,
    GRAPH,
    GRAPH2,
    KEEP,
    SPLIT,
    Segment,
    build_graph,
    draw_triples,
    first_unique,
    row_keys,
)
from snag_dist.data.synth.options import SynthOptions
from snag_dist.data.synth.text_writer import write_id_files, write_rows, write_triples, write_uris
from snag_dist.seeding import numpy_rng

KG2_KEEP = 0.9  # share of KG1 edges between linked entities that KG2 keeps


def _eval_rows(held: np.ndarray, train_keys: list[np.ndarray], seen_ent: np.ndarray,
               seen_rel: np.ndarray, relations: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid/test candidates (h, r, t, split) -> (kept candidates, triples moved to train).

    Candidates are de-duplicated, dropped when already in train, and moved to train when they
    use an entity or relation train lacks (the standard closed-world split).
    """
    n = len(seen_ent)
    held = held[first_unique(row_keys(held, n, relations))]
    keys = row_keys(held, n, relations)
    order = np.argsort(keys)  # sorted queries make the searches below cache-friendly
    keys = keys[order]
    in_train = np.zeros(len(held), dtype=bool)
    for chunk_keys in (k for k in train_keys if len(k)):
        pos = np.minimum(np.searchsorted(chunk_keys, keys), len(chunk_keys) - 1)
        in_train[order] |= chunk_keys[pos] == keys
    held = held[~in_train]
    closed = seen_ent[held[:, 0]] & seen_ent[held[:, 2]] & seen_rel[held[:, 1]]
    return held[closed], held[~closed, :3]


def write_mkgc(tmp: Path, opts: SynthOptions, say: Callable[[str], None]) -> tuple[dict, list[Segment]]:
    n, nrel = opts.entities, opts.relations
    g = build_graph(numpy_rng(opts.seed, GRAPH), n, nrel)
    write_id_files(tmp, n, nrel)
    cover = numpy_rng(opts.seed, COVER).permutation(n)[: min(n, opts.triples // 2)]
    bounds = np.cumsum([1.0 - opts.valid_ratio - opts.test_ratio, opts.valid_ratio])
    seen_ent, seen_rel = np.zeros(n, dtype=bool), np.zeros(nrel, dtype=bool)
    train_keys, held, n_train = [], [], 0
    with open(tmp / "train.txt", "wb") as fh:
        for k, tri in enumerate(draw_triples(g, opts.triples, cover, opts.seed, GRAPH)):
            split = np.searchsorted(bounds, numpy_rng(opts.seed, SPLIT, k).random(len(tri)), side="right")
            train = tri[split == 0]
            write_triples(fh, train)
            seen_ent[train[:, 0]] = seen_ent[train[:, 2]] = seen_rel[train[:, 1]] = True
            train_keys.append(np.sort(row_keys(train, n, nrel)))
            held.append(np.column_stack([tri[split > 0], split[split > 0]]))
            n_train += len(train)
            say(f"train.txt: {n_train} triples")
        kept, moved = _eval_rows(np.concatenate(held), train_keys, seen_ent, seen_rel, nrel)
        write_triples(fh, moved)
    counts = {"train": n_train + len(moved)}
    for split_id, split in ((1, "valid"), (2, "test")):
        rows = kept[kept[:, 3] == split_id, :3]
        with open(tmp / f"{split}.txt", "wb") as fh:
            write_triples(fh, rows)
        counts[split] = len(rows)
    counts = {"task": "mkgc", "entities": n, "relations": nrel, "triples": sum(counts.values()), **counts}
    return counts, [Segment(0, g)]


def _write_links(tmp: Path, opts: SynthOptions) -> np.ndarray:
    """Gold 1:1 links between random KG1 and KG2 entities -> (KG2 local,) partner KG1 id or -1."""
    n1, n2 = opts.entities // 2, opts.entities - opts.entities // 2
    n_links = max(1, round(opts.link_ratio * n1))
    rng = numpy_rng(opts.seed, ALIGN)
    kg1, kg2 = rng.permutation(n1)[:n_links], rng.permutation(n2)[:n_links]
    order = np.argsort(kg1)
    kg1, kg2 = kg1[order], kg2[order]
    write_rows(tmp / "ref_ent_ids", n_links, lambda i: [kg1[i], b"\t", kg2[i] + n1])
    partner = np.full(n2, -1, dtype=np.int64)
    partner[kg2] = kg1
    return partner


def write_mmea(tmp: Path, opts: SynthOptions, say: Callable[[str], None]) -> tuple[dict, list[Segment]]:
    n1, nrel, seed = opts.entities // 2, opts.relations, opts.seed
    n2 = opts.entities - n1
    for kg, offset, n in ((1, 0, n1), (2, n1, n2)):
        write_uris(tmp / f"ent_ids_{kg}", n, offset, f"http://kg{kg}.synth/resource/E", offset)
        write_uris(tmp / f"rel_ids_{kg}", nrel, (kg - 1) * nrel, f"http://kg{kg}.synth/property/P", 0)
    partner = _write_links(tmp, opts)
    to_kg2 = np.full(n1, -1, dtype=np.int64)
    to_kg2[partner[partner >= 0]] = np.flatnonzero(partner >= 0)
    g1, g2 = build_graph(numpy_rng(seed, GRAPH), n1, nrel), build_graph(numpy_rng(seed, GRAPH2), n2, nrel)
    t1 = opts.triples // 2
    touched = np.zeros(n2, dtype=bool)  # KG2 entities that got a mapped edge
    counts = {"triples_1": 0, "triples_2": 0}
    with open(tmp / "triples_1", "wb") as f1, open(tmp / "triples_2", "wb") as f2:
        cover1 = numpy_rng(seed, COVER).permutation(n1)[: min(n1, t1 // 2)]
        for k, tri in enumerate(draw_triples(g1, t1, cover1, seed, GRAPH)):
            write_triples(f1, tri)
            head, tail = to_kg2[tri[:, 0]], to_kg2[tri[:, 2]]
            keep = (head >= 0) & (tail >= 0) & (numpy_rng(seed, KEEP, k).random(len(tri)) < KG2_KEEP)
            touched[head[keep]] = touched[tail[keep]] = True
            write_triples(f2, np.stack([head[keep] + n1, tri[keep, 1] + nrel, tail[keep] + n1], axis=1))
            counts["triples_1"] += len(tri)
            counts["triples_2"] += int(keep.sum())
            say(f"triples_1: {counts['triples_1']}, triples_2 (mapped): {counts['triples_2']}")
        added = max(0, opts.triples - t1 - counts["triples_2"])
        for tri in draw_triples(g2, added, np.flatnonzero(~touched)[:added], seed, GRAPH2):
            write_triples(f2, tri + [n1, nrel, n1])
            counts["triples_2"] += len(tri)
    counts = {"task": "mmea", "entities": opts.entities, "entities_1": n1, "entities_2": n2,
              "relations": 2 * nrel, "triples": counts["triples_1"] + counts["triples_2"], **counts,
              "links": int((partner >= 0).sum())}
    return counts, [Segment(0, g1), Segment(n1, g2, partner)]
