"""Synthetic multi-modal KGs in the raw on-disk formats the readers take (scale tests, demos).

Every entity has a popularity rank (a power law, so a few hubs hold many edges) and a cluster
(``rank % K``). Each relation maps head clusters to tail clusters through a fixed permutation and
most edges follow that map, so an entity's cluster predicts its neighbours. Features encode the
cluster: modality = latent @ projection + noise, latent = cluster centroid + individual part.
Features are therefore learnable from structure and vice versa. For ``mmea``, KG2 is KG1 mapped
through the gold links with some edges dropped and others added, and a linked KG2 entity's latent
is its partner's plus noise, so both the structure and the features carry the alignment.

Triples and feature rows are generated and written in chunks, so 1M entities x 10M triples stays
well under 1 GiB of RSS. Output goes to a temp directory renamed into place at the end.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from snag_dist.data.npy_writer import NpyWriter
from snag_dist.data.tempdirs import check_output, describe_removed, make_dir
from snag_dist.errors import ConfigError
from snag_dist.fsio import atomic_dir, remove_stale
from snag_dist.seeding import numpy_rng

TRIPLE_CHUNK = 1 << 19  # triples generated (and de-duplicated) per chunk
ROW_CHUNK = 1 << 17  # entity rows per chunk for id files and latents
FEATURE_CHUNK_ELEMS = 1 << 22  # floats per feature chunk (16 MiB as float32)
LATENT_DIM = 16
MAX_CLUSTERS = 128  # clusters per KG: n // 64, capped
ENTITY_EXPONENT = 0.8  # popularity power law; 1M entities x 5M triples: top 1% hold ~30% of edge ends
RELATION_EXPONENT = 1.0
STRUCTURED_SHARE = 0.7  # edges whose far end follows the relation's cluster map (rest: global hubs)
KG2_KEEP = 0.9  # share of KG1 edges between linked entities that KG2 keeps
INDIVIDUAL_SCALE = 0.7  # individual part of the latent, relative to the unit-variance centroid
LINK_NOISE = 0.5  # latent noise between linked entities (one modality alone: hits@1 ~0.5 on name)
FEATURE_NOISE = 1.0  # per-modality noise, independent across modalities and linked entities
_BYTE_STD = float(np.sqrt((256**2 - 1) / 12))  # std of a uniform random int8
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Stream tags: each random choice draws from a generator seeded by (seed, tag, chunk).
_GRAPH, _GRAPH2, _COVER, _POWER, _SPLIT, _ALIGN, _KEEP, _LATENT, _PROJ, _FEAT = range(10)


@dataclass(frozen=True)
class ModalityOption:
    """One dense feature modality written to ``features/<name>.npy``."""

    name: str  # file stem; letters, digits, '_' or '-'
    dim: int  # feature width
    coverage: float  # share of entities that have it (the rest: zero rows, present = 0)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name == "relation":
            raise ConfigError(
                f"bad modality name '{self.name}' (letters, digits, _ or -; 'relation' is derived by prepare)"
            )
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigError(f"modality '{self.name}': dim must be a positive integer, got {self.dim!r}")
        if not 0.0 <= self.coverage <= 1.0:
            raise ConfigError(f"modality '{self.name}': coverage must be in [0, 1], got {self.coverage!r}")


DEFAULT_MODALITIES = (
    ModalityOption("image", 256, 0.7),
    ModalityOption("name", 384, 1.0),
    ModalityOption("attribute", 128, 0.9),
)


@dataclass(frozen=True)
class SynthOptions:
    """What to generate; ``prepare`` adds the 'relation' bag from the triples."""

    entities: int  # total entities N (mmea: KG1 gets N // 2, KG2 the rest)
    triples: int  # target triple count (mmea: over both KGs); self loops and duplicates are dropped
    task: Literal["mmea", "mkgc"] = "mkgc"  # entity alignment or KG completion layout
    relations: int = 200  # relations R (mmea: per KG, so 2R ids in all)
    modalities: tuple[ModalityOption, ...] = DEFAULT_MODALITIES  # dense feature modalities
    dtype: str = "float16"  # feature dtype
    link_ratio: float = 0.8  # mmea: share of KG1 entities with a KG2 counterpart
    seed: int = 0  # every random choice derives from it
    valid_ratio: float = 0.05  # mkgc: share of triples in valid.txt
    test_ratio: float = 0.05  # mkgc: share of triples in test.txt

    def __post_init__(self) -> None:
        for field, least in (("entities", 2), ("triples", 1), ("relations", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"synth {field} must be an integer >= {least}, got {value!r}")
        if self.task not in ("mmea", "mkgc"):
            raise ConfigError(f"unknown synth task '{self.task}' (known: mkgc, mmea)")
        try:
            kind = np.dtype(self.dtype).kind
        except TypeError:
            kind = ""
        if kind != "f" or np.dtype(self.dtype).itemsize > 8:
            raise ConfigError(f"synth dtype must be float16, float32 or float64, got '{self.dtype}'")
        if not 0.0 < self.link_ratio <= 1.0:
            raise ConfigError(f"synth link_ratio must be in (0, 1], got {self.link_ratio!r}")
        if self.valid_ratio < 0 or self.test_ratio < 0 or self.valid_ratio + self.test_ratio >= 1:
            raise ConfigError("synth valid_ratio and test_ratio must be >= 0 with a sum below 1")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate modality names in {', '.join(names)}")


def parse_modalities(spec: str) -> tuple[ModalityOption, ...]:
    """``"image:256:0.7,name:384:1.0"`` -> options; coverage may be left out (1.0)."""
    out = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        fields = item.split(":")
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            coverage = float(fields[2]) if len(fields) == 3 else 1.0
            out.append(ModalityOption(fields[0], int(fields[1]), coverage))
        except ValueError:
            raise ConfigError(f"bad modality '{item}': expected name:dim[:coverage], e.g. image:256:0.7") from None
    if not out:
        raise ConfigError(f"no modalities in '{spec}' (expected e.g. image:256:0.7,name:384:1.0)")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate modality names in '{spec}'")
    return tuple(out)


def _power_ranks(rng: np.random.Generator, n, size: int, exponent: float) -> np.ndarray:
    """Ranks in [0, n) with P(rank k) ~ (k + 1) ** -exponent (inverse CDF of a truncated power law)."""
    u = rng.random(size)
    top = np.asarray(n, dtype=np.float64) + 1.0
    if exponent == 1.0:
        x = np.exp(u * np.log(top))
    else:
        a = 1.0 - exponent
        x = (1.0 + u * (top**a - 1.0)) ** (1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, np.asarray(n, dtype=np.int64) - 1)


@dataclass
class _Graph:
    """Popularity, clusters and relation cluster maps of one KG over local ids 0..n-1."""

    n: int
    relations: int
    rank_to_ent: np.ndarray  # (n,) entity holding popularity rank i
    ent_to_rank: np.ndarray  # (n,)
    rel_of_rank: np.ndarray  # (R,) relation id holding popularity rank i
    fwd: np.ndarray  # (R, K) tail cluster of head cluster k under relation r
    inv: np.ndarray  # (R, K) head cluster of tail cluster k under relation r

    @property
    def clusters(self) -> int:
        return self.fwd.shape[1]

    def cluster(self, ents: np.ndarray) -> np.ndarray:
        return self.ent_to_rank[ents] % self.clusters


def _build_graph(rng: np.random.Generator, n: int, relations: int) -> _Graph:
    clusters = max(1, min(MAX_CLUSTERS, n // 64))
    rank_to_ent = rng.permutation(n)
    ent_to_rank = np.empty(n, dtype=np.int64)
    ent_to_rank[rank_to_ent] = np.arange(n)
    fwd = np.argsort(rng.random((relations, clusters)), axis=1)
    rel_of_rank = rng.permutation(relations)
    return _Graph(n, relations, rank_to_ent, ent_to_rank, rel_of_rank, fwd, np.argsort(fwd, axis=1))


def _row_keys(tri: np.ndarray, n: int, relations: int) -> np.ndarray:
    """One sortable key per (h, r, t) row: an int64 when it fits, else the row's bytes."""
    if n * n * relations < 2**62:
        return (tri[:, 0] * n + tri[:, 2]) * relations + tri[:, 1]
    return np.ascontiguousarray(tri, dtype=np.int64).view(np.dtype((np.void, 24))).ravel()


def _first_unique(keys: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each key, in original order."""
    _, first = np.unique(keys, return_index=True)
    first.sort()
    return first


def _edges(rng: np.random.Generator, g: _Graph, anchor_rank: np.ndarray, anchor_is_head: np.ndarray,
           ) -> np.ndarray:
    """(m, 3) (head, relation, tail) local ids, one edge per anchor; self loops and repeats dropped."""
    m = len(anchor_rank)
    rel = g.rel_of_rank[_power_ranks(rng, g.relations, m, RELATION_EXPONENT)]
    k = g.clusters
    anchor_cluster = anchor_rank % k
    far_cluster = np.where(anchor_is_head, g.fwd[rel, anchor_cluster], g.inv[rel, anchor_cluster])
    in_cluster = (g.n - 1 - far_cluster) // k + 1  # members of each far cluster
    structured = far_cluster + _power_ranks(rng, in_cluster, m, ENTITY_EXPONENT) * k
    hub = _power_ranks(rng, g.n, m, ENTITY_EXPONENT)
    far = g.rank_to_ent[np.where(rng.random(m) < STRUCTURED_SHARE, structured, hub)]
    anchor = g.rank_to_ent[anchor_rank]
    head, tail = np.where(anchor_is_head, anchor, far), np.where(anchor_is_head, far, anchor)
    tri = np.stack([head, rel, tail], axis=1)
    tri = tri[tri[:, 0] != tri[:, 2]]
    return tri[_first_unique(_row_keys(tri, g.n, g.relations))]


def _triples(g: _Graph, total: int, cover: np.ndarray, seed: int, tag: int) -> Iterator[np.ndarray]:
    """``total`` edges: first one per ``cover`` entity (so none is isolated), then power-law anchors."""
    for k, start in enumerate(range(0, len(cover), TRIPLE_CHUNK)):
        rng = numpy_rng(seed, tag, _COVER, k)
        ents = cover[start : start + TRIPLE_CHUNK]
        yield _edges(rng, g, g.ent_to_rank[ents], rng.random(len(ents)) < 0.5)
    rest = max(0, total - len(cover))
    for k, start in enumerate(range(0, rest, TRIPLE_CHUNK)):
        rng = numpy_rng(seed, tag, _POWER, k)
        m = min(TRIPLE_CHUNK, rest - start)
        yield _edges(rng, g, _power_ranks(rng, g.n, m, ENTITY_EXPONENT), rng.random(m) < 0.5)


def _format_rows(pieces: Sequence[bytes | np.ndarray]) -> bytes:
    """Lines made of constant byte strings and non-negative int columns, vectorised (no per-row Python)."""
    n = next(len(p) for p in pieces if isinstance(p, np.ndarray))
    if n == 0:
        return b""
    pieces = [*pieces, b"\n"]
    widths = [len(p) if isinstance(p, bytes) else len(str(int(p.max()))) for p in pieces]
    buf = np.empty((n, sum(widths)), dtype=np.uint8)  # right-aligned digits; leading pad masked out
    keep = np.ones(buf.shape, dtype=bool)
    col = 0
    for piece, width in zip(pieces, widths):
        if isinstance(piece, bytes):
            buf[:, col : col + width] = np.frombuffer(piece, dtype=np.uint8)
        else:
            value = piece.astype(np.int64)
            digits = np.ones(n, dtype=np.int64)
            for power in range(1, width):
                digits += value >= 10**power
            for j in range(width - 1, -1, -1):
                value, digit = np.divmod(value, 10)
                buf[:, col + j] = digit + 48
            keep[:, col : col + width] = np.arange(width) >= (width - digits)[:, None]
        col += width
    return buf[keep].tobytes()


def _write_rows(path: Path, n: int, pieces: Callable[[np.ndarray], Sequence[bytes | np.ndarray]]) -> None:
    """Write n lines, ``pieces(ids)`` formatting a chunk of row indices."""
    with open(path, "wb") as fh:
        for start in range(0, n, ROW_CHUNK):
            fh.write(_format_rows(pieces(np.arange(start, min(n, start + ROW_CHUNK)))))


def _write_triples(fh: BinaryIO, tri: np.ndarray) -> None:
    fh.write(_format_rows([tri[:, 0], b"\t", tri[:, 1], b"\t", tri[:, 2]]))


def _write_id_files(tmp: Path, n: int, relations: int) -> None:
    _write_rows(tmp / "entities.txt", n, lambda ids: [ids])
    _write_rows(tmp / "relations.txt", relations, lambda ids: [ids])
    _write_rows(tmp / "entity2id.txt", n, lambda ids: [b"ent_", ids, b" ", ids])


def _eval_rows(held: np.ndarray, train_keys: list[np.ndarray], seen_ent: np.ndarray,
               seen_rel: np.ndarray, relations: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid/test candidates (h, r, t, split) -> (kept candidates, triples moved to train).

    Candidates are de-duplicated, dropped when already in train, and moved to train when they
    use an entity or relation train lacks (the standard closed-world split).
    """
    n = len(seen_ent)
    held = held[_first_unique(_row_keys(held, n, relations))]
    keys = _row_keys(held, n, relations)
    order = np.argsort(keys)  # sorted queries make the searches below cache-friendly
    keys = keys[order]
    in_train = np.zeros(len(held), dtype=bool)
    for chunk_keys in (k for k in train_keys if len(k)):
        pos = np.minimum(np.searchsorted(chunk_keys, keys), len(chunk_keys) - 1)
        in_train[order] |= chunk_keys[pos] == keys
    held = held[~in_train]
    closed = seen_ent[held[:, 0]] & seen_ent[held[:, 2]] & seen_rel[held[:, 1]]
    return held[closed], held[~closed, :3]


@dataclass
class _Segment:
    """A contiguous run of global entity ids generated by one graph (mkgc: one; mmea: KG1, KG2)."""

    offset: int
    graph: _Graph
    partner: np.ndarray | None = None  # (n,) global id whose latent this entity copies, -1 = none


def _write_mkgc(tmp: Path, opts: SynthOptions, say: Callable[[str], None]) -> tuple[dict, list[_Segment]]:
    n, nrel = opts.entities, opts.relations
    g = _build_graph(numpy_rng(opts.seed, _GRAPH), n, nrel)
    _write_id_files(tmp, n, nrel)
    cover = numpy_rng(opts.seed, _COVER).permutation(n)[: min(n, opts.triples // 2)]
    bounds = np.cumsum([1.0 - opts.valid_ratio - opts.test_ratio, opts.valid_ratio])
    seen_ent, seen_rel = np.zeros(n, dtype=bool), np.zeros(nrel, dtype=bool)
    train_keys, held, n_train = [], [], 0
    with open(tmp / "train.txt", "wb") as fh:
        for k, tri in enumerate(_triples(g, opts.triples, cover, opts.seed, _GRAPH)):
            split = np.searchsorted(bounds, numpy_rng(opts.seed, _SPLIT, k).random(len(tri)), side="right")
            train = tri[split == 0]
            _write_triples(fh, train)
            seen_ent[train[:, 0]] = seen_ent[train[:, 2]] = seen_rel[train[:, 1]] = True
            train_keys.append(np.sort(_row_keys(train, n, nrel)))
            held.append(np.column_stack([tri[split > 0], split[split > 0]]))
            n_train += len(train)
            say(f"train.txt: {n_train} triples")
        kept, moved = _eval_rows(np.concatenate(held), train_keys, seen_ent, seen_rel, nrel)
        _write_triples(fh, moved)
    counts = {"train": n_train + len(moved)}
    for split_id, split in ((1, "valid"), (2, "test")):
        rows = kept[kept[:, 3] == split_id, :3]
        with open(tmp / f"{split}.txt", "wb") as fh:
            _write_triples(fh, rows)
        counts[split] = len(rows)
    counts = {"task": "mkgc", "entities": n, "relations": nrel, "triples": sum(counts.values()), **counts}
    return counts, [_Segment(0, g)]


def _write_uris(path: Path, n: int, id_offset: int, uri_prefix: str, uri_offset: int) -> None:
    """Lines ``id<TAB>uri_prefix<number>`` for ids id_offset.. and numbers uri_offset..."""
    prefix = f"\t{uri_prefix}".encode()
    _write_rows(path, n, lambda i: [i + id_offset, prefix, i + uri_offset])


def _write_links(tmp: Path, opts: SynthOptions) -> np.ndarray:
    """Gold 1:1 links between random KG1 and KG2 entities -> (KG2 local,) partner KG1 id or -1."""
    n1, n2 = opts.entities // 2, opts.entities - opts.entities // 2
    n_links = max(1, round(opts.link_ratio * n1))
    rng = numpy_rng(opts.seed, _ALIGN)
    kg1, kg2 = rng.permutation(n1)[:n_links], rng.permutation(n2)[:n_links]
    order = np.argsort(kg1)
    kg1, kg2 = kg1[order], kg2[order]
    _write_rows(tmp / "ref_ent_ids", n_links, lambda i: [kg1[i], b"\t", kg2[i] + n1])
    partner = np.full(n2, -1, dtype=np.int64)
    partner[kg2] = kg1
    return partner


def _write_mmea(tmp: Path, opts: SynthOptions, say: Callable[[str], None]) -> tuple[dict, list[_Segment]]:
    n1, nrel, seed = opts.entities // 2, opts.relations, opts.seed
    n2 = opts.entities - n1
    for kg, offset, n in ((1, 0, n1), (2, n1, n2)):
        _write_uris(tmp / f"ent_ids_{kg}", n, offset, f"http://kg{kg}.synth/resource/E", offset)
        _write_uris(tmp / f"rel_ids_{kg}", nrel, (kg - 1) * nrel, f"http://kg{kg}.synth/property/P", 0)
    partner = _write_links(tmp, opts)
    to_kg2 = np.full(n1, -1, dtype=np.int64)
    to_kg2[partner[partner >= 0]] = np.flatnonzero(partner >= 0)
    g1, g2 = _build_graph(numpy_rng(seed, _GRAPH), n1, nrel), _build_graph(numpy_rng(seed, _GRAPH2), n2, nrel)
    t1 = opts.triples // 2
    touched = np.zeros(n2, dtype=bool)  # KG2 entities that got a mapped edge
    counts = {"triples_1": 0, "triples_2": 0}
    with open(tmp / "triples_1", "wb") as f1, open(tmp / "triples_2", "wb") as f2:
        cover1 = numpy_rng(seed, _COVER).permutation(n1)[: min(n1, t1 // 2)]
        for k, tri in enumerate(_triples(g1, t1, cover1, seed, _GRAPH)):
            _write_triples(f1, tri)
            head, tail = to_kg2[tri[:, 0]], to_kg2[tri[:, 2]]
            keep = (head >= 0) & (tail >= 0) & (numpy_rng(seed, _KEEP, k).random(len(tri)) < KG2_KEEP)
            touched[head[keep]] = touched[tail[keep]] = True
            _write_triples(f2, np.stack([head[keep] + n1, tri[keep, 1] + nrel, tail[keep] + n1], axis=1))
            counts["triples_1"] += len(tri)
            counts["triples_2"] += int(keep.sum())
            say(f"triples_1: {counts['triples_1']}, triples_2 (mapped): {counts['triples_2']}")
        added = max(0, opts.triples - t1 - counts["triples_2"])
        for tri in _triples(g2, added, np.flatnonzero(~touched)[:added], seed, _GRAPH2):
            _write_triples(f2, tri + [n1, nrel, n1])
            counts["triples_2"] += len(tri)
    counts = {"task": "mmea", "entities": opts.entities, "entities_1": n1, "entities_2": n2,
              "relations": 2 * nrel, "triples": counts["triples_1"] + counts["triples_2"], **counts,
              "links": int((partner >= 0).sum())}
    return counts, [_Segment(0, g1), _Segment(n1, g2, partner)]


def _write_latent(path: Path, seed: int, segments: list[_Segment]) -> None:
    """(N, LATENT_DIM) float32 rows, raw: cluster centroid + individual part, or a partner's + noise."""
    centroids = numpy_rng(seed, _LATENT).standard_normal((MAX_CLUSTERS, LATENT_DIM), dtype=np.float32)
    with open(path, "wb") as fh:
        for s, seg in enumerate(segments):
            fh.flush()
            earlier = None  # latents of the segments before this one, for partner lookups
            if seg.offset:
                earlier = np.memmap(path, dtype=np.float32, mode="r", shape=(seg.offset, LATENT_DIM))
            for k, start in enumerate(range(0, seg.graph.n, ROW_CHUNK)):
                rng = numpy_rng(seed, _LATENT, s, k)
                ids = np.arange(start, min(seg.graph.n, start + ROW_CHUNK))
                noise = rng.standard_normal((len(ids), LATENT_DIM), dtype=np.float32)
                z = centroids[seg.graph.cluster(ids)] + INDIVIDUAL_SCALE * noise
                if seg.partner is not None and earlier is not None:
                    partner = seg.partner[ids]
                    linked = partner >= 0
                    z[linked] = earlier[partner[linked]] + LINK_NOISE * noise[linked]
                fh.write(z.tobytes())
            del earlier


def _write_features(folder: Path, opts: SynthOptions, latent: Path, say: Callable[[str], None],
                    ) -> dict[str, int]:
    """features/<m>.npy and <m>.present.npy, streamed (``NpyWriter``: a memory map would keep every
    page written in this process's RSS, ~750 MiB for a 1M x 384 table alone)."""
    folder.mkdir()
    n, present = opts.entities, {}
    for i, mod in enumerate(opts.modalities):
        # Noise is uniform random bytes (4x cheaper than normals, which dominated the run time):
        # features are computed in units of the bytes' std, then rescaled.
        scale = np.float32(_BYTE_STD / FEATURE_NOISE)
        proj = numpy_rng(opts.seed, _PROJ, i).standard_normal((LATENT_DIM, mod.dim), dtype=np.float32)
        proj *= scale / np.sqrt(LATENT_DIM)
        rows, present[mod.name] = max(1, FEATURE_CHUNK_ELEMS // mod.dim), 0
        feat_path, has_path = folder / f"{mod.name}.npy", folder / f"{mod.name}.present.npy"
        with NpyWriter(feat_path, opts.dtype, (n, mod.dim)) as feat, NpyWriter(has_path, np.uint8, (n,)) as has_fh:
            for k, start in enumerate(range(0, n, rows)):
                m = min(rows, n - start)
                z = np.fromfile(latent, dtype=np.float32, count=m * LATENT_DIM, offset=start * LATENT_DIM * 4)
                rng = numpy_rng(opts.seed, _FEAT, i, k)
                x_mD = z.reshape(m, LATENT_DIM) @ proj  # m rows, D = mod.dim
                noise = np.frombuffer(rng.bytes(m * mod.dim), dtype=np.int8).reshape(m, mod.dim)
                np.add(x_mD, noise, out=x_mD, casting="unsafe")
                x_mD /= scale
                has = rng.random(m) < mod.coverage
                x_mD[~has] = 0.0
                feat.append(x_mD)
                has_fh.append(has)
                present[mod.name] += int(has.sum())
        say(f"features/{mod.name}.npy: {n} x {mod.dim}, {present[mod.name]} present")
    return present


def _reporter(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda msg: None
    start = time.monotonic()
    return lambda msg: print(f"synth [{time.monotonic() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _generate(tmp: Path, opts: SynthOptions, say: Callable[[str], None]) -> dict:
    write = _write_mkgc if opts.task == "mkgc" else _write_mmea
    counts, segments = write(tmp, opts, say)
    latent = tmp / "latent.f32.tmp"
    _write_latent(latent, opts.seed, segments)
    counts["modalities"] = _write_features(tmp / "features", opts, latent, say)
    latent.unlink()
    (tmp / "synth.json").write_text(json.dumps({"options": asdict(opts), "counts": counts}, indent=2) + "\n")
    return counts


def synth(out_dir: str | Path, opts: SynthOptions, progress: bool = False) -> dict:
    """Write a synthetic dataset to ``out_dir`` (which must not exist or be empty); returns counts."""
    out = Path(out_dir)
    check_output(out, overwrite=False, what="synth output", flag="")
    make_dir(out.parent, parents=True)
    stale = remove_stale(out)
    if stale:
        print(f"snag-dist synth: {describe_removed(stale)}", file=sys.stderr)
    with atomic_dir(out, replace_existing=False, mkdir=make_dir) as tmp:  # out: absent or empty (checked)
        counts = _generate(tmp, opts, _reporter(progress))
    return counts
