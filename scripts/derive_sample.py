"""Derive the small real samples shipped in ``data/sample/`` from ``../shared/data``.

- ``dbp15k_fr_en_mini``: the densest part of DBP15K FR-EN — the ``--links`` gold links whose two
  entities have the highest min(degree), with every triple among those entities; ids renumbered
  (KG1 first, KG2 order shuffled), names from the Google-translated KG1 names and KG2 URIs.
- ``db15k_mini``: the ``--entities`` highest-degree DB15K entities with the train/valid/test
  triples among them (the original split kept), names from ``entity2id.txt``.

Run: ``python scripts/derive_sample.py --src ../shared/data --out data/sample``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _read(path: Path, cols: int) -> np.ndarray:
    return np.loadtxt(path, dtype=np.int64, ndmin=2, usecols=range(cols))


def _names(path: Path, sep: str = "\t", id_last: bool = False) -> dict[int, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or (id_last and line.strip().isdigit()):
            continue
        if id_last:
            name, _, i = line.rpartition(" ")
        else:
            i, _, name = line.partition(sep)
        out[int(i)] = name
    return out


def _write(path: Path, rows) -> None:
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")


def derive_alignment(src: Path, out: Path, n_links: int, seed: int) -> None:
    triples = np.concatenate([_read(src / "triples_1", 3), _read(src / "triples_2", 3)])
    links = _read(src / "ref_ent_ids", 2)
    deg = np.bincount(np.concatenate([triples[:, 0], triples[:, 2]]), minlength=links.max() + 1)
    order = np.argsort(-np.minimum(deg[links[:, 0]], deg[links[:, 1]]), kind="stable")
    chosen = links[np.sort(order[:n_links])]
    rng = np.random.default_rng(seed)
    new_id = {int(e): i for i, e in enumerate(chosen[:, 0])}
    for i, e in enumerate(chosen[rng.permutation(n_links), 1]):
        new_id[int(e)] = n_links + i
    keep = np.array([h in new_id and t in new_id for h, _, t in triples.tolist()])
    sub = triples[keep]
    rels = sorted(set(sub[:, 1].tolist()))
    rel_id = {r: i for i, r in enumerate(rels)}
    rel_names = {**_names(src / "rel_ids_1"), **_names(src / "rel_ids_2")}
    names1, names2, trans = _names(src / "ent_ids_1"), _names(src / "ent_ids_2"), _names(src / "ent_ids_1_trans_goo")
    out.mkdir(parents=True, exist_ok=True)
    kg1_rels = set(_names(src / "rel_ids_1"))
    for k, names in ((1, names1), (2, names2)):
        ents = sorted((i, e) for e, i in new_id.items() if (i < n_links) == (k == 1))
        _write(out / f"ent_ids_{k}", [(i, names[e]) for i, e in ents])
        _write(out / f"rel_ids_{k}", [(rel_id[r], rel_names[r]) for r in rels if (r in kg1_rels) == (k == 1)])
        mine = [(new_id[h], rel_id[r], new_id[t]) for h, r, t in sub.tolist() if (new_id[h] < n_links) == (k == 1)]
        _write(out / f"triples_{k}", mine)
    _write(out / "ent_ids_1_trans_goo", [(new_id[int(e)], trans[int(e)]) for e in chosen[:, 0]])
    _write(out / "ref_ent_ids", [(new_id[int(a)], new_id[int(b)]) for a, b in chosen])
    print(f"{out}: {2 * n_links} entities, {len(rels)} relations, {len(sub)} triples, {n_links} links")


def derive_completion(src: Path, out: Path, n_entities: int) -> None:
    splits = {s: _read(src / f"{s}.txt", 3) for s in ("train", "valid", "test")}
    train = splits["train"]
    deg = np.bincount(np.concatenate([train[:, 0], train[:, 2]]))
    chosen = np.sort(np.argsort(-deg, kind="stable")[:n_entities])
    new_id = np.full(deg.size, -1)
    new_id[chosen] = np.arange(n_entities)
    kept = {s: t[(new_id[t[:, 0]] >= 0) & (new_id[t[:, 2]] >= 0)] for s, t in splits.items()}
    rels = np.unique(kept["train"][:, 1])
    rel_id = np.full(splits["train"][:, 1].max() + 1, -1)
    rel_id[rels] = np.arange(len(rels))
    out.mkdir(parents=True, exist_ok=True)
    seen = set(new_id[kept["train"][:, [0, 2]]].ravel().tolist())
    for s, t in kept.items():
        t = t[rel_id[np.minimum(t[:, 1], len(rel_id) - 1)] >= 0] if s != "train" else t
        mapped = np.stack([new_id[t[:, 0]], rel_id[t[:, 1]], new_id[t[:, 2]]], axis=1)
        if s != "train":  # standard: eval triples only over entities seen in training
            mapped = mapped[[h in seen and tt in seen for h, _, tt in mapped.tolist()]]
        _write(out / f"{s}.txt", mapped.tolist())
    _write(out / "entities.txt", [(i,) for i in range(n_entities)])
    _write(out / "relations.txt", [(i,) for i in range(len(rels))])
    names = _names(src / "entity2id.txt", id_last=True)
    (out / "entity2id.txt").write_text(
        "".join(f"{names[int(e)]} {i}\n" for i, e in enumerate(chosen)), encoding="utf-8")
    sizes = {s: sum(1 for _ in open(out / f"{s}.txt")) for s in kept}
    print(f"{out}: {n_entities} entities, {len(rels)} relations, triples {sizes}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="../shared/data")
    ap.add_argument("--out", default="data/sample")
    ap.add_argument("--links", type=int, default=2000)
    ap.add_argument("--entities", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    derive_alignment(src / "DBP15K" / "fr_en", out / "dbp15k_fr_en_mini", args.links, args.seed)
    derive_completion(src / "MKGC" / "DB15K", out / "db15k_mini", args.entities)


if __name__ == "__main__":
    main()
