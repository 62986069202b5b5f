"""``manifest.json``: what a shard directory holds, and the checksums that prove it.

Layout of a shard directory written by ``snag-dist prepare``::

    manifest.json              this file (schema_version, counts, modalities, shards, sources, options)
    stats.safetensors          per-modality, per-dimension mean/std (GMNM draws its noise from them)
    entities/entities-NNNNNN.tar   samples of consecutive entities ("ents", see records.py; id range in the manifest)
    triples/{train,valid,test}-NNNNNN.tar   blocks of (head, relation, tail) int64 rows ("hrt.npy")
    links/{train,valid,test}-NNNNNN.tar     blocks of (left, right) int64 rows ("pairs.npy"), alignment only

An entity sample is one ``ents`` member: a block of ``entity_block`` consecutive entities stored
column by column (kg, per-modality mask, dense features in the manifest's dtype, relation-style
bags as CSR rows); ``records.py`` has the byte layout. ``ShardInfo.samples`` counts blocks and
``ShardInfo.rows`` entities, triples or links.

Schema versions: 2 = entity blocks (1 held one sample per entity; re-run ``prepare`` for those).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snag_dist.errors import DataError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
STATS = "stats.safetensors"


@dataclass
class ShardInfo:
    file: str  # relative to the shard directory
    samples: int
    bytes: int
    sha256: str
    rows: int = 0  # entities / triples / links inside (blocks hold many rows per sample)
    first_id: int = -1  # entity shards: id range [first_id, last_id]
    last_id: int = -1


@dataclass
class ModalityInfo:
    kind: str  # "dense" | "bag"
    dim: int
    dtype: str  # storage dtype: float16 | float32
    coverage: float  # share of entities that have the modality
    mean: float  # scalar summaries (per-dimension stats live in stats.safetensors)
    std: float
    source: str = ""


@dataclass
class Manifest:
    task: str
    name: str
    counts: dict[str, Any]
    modalities: dict[str, ModalityInfo]
    shards: dict[str, list[ShardInfo]]  # group ("entities", "triples/train", "links/test", ...) -> shards
    sources: dict[str, str]  # source file -> sha256
    options: dict[str, Any]
    stats_sha256: str = ""
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    relation_names: list[str] = field(default_factory=list)

    @property
    def num_entities(self) -> int:
        return int(self.counts["entities"])

    @property
    def num_relations(self) -> int:
        return int(self.counts["relations"])

    def modality_order(self) -> list[str]:
        return list(self.modalities)

    def shard_paths(self, root: str | Path, group: str) -> list[str]:
        if group not in self.shards:
            known = ", ".join(sorted(self.shards))
            raise DataError(f"{root}: no shard group '{group}' in the manifest (has: {known})")
        return [str(Path(root) / s.file) for s in self.shards[group]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["modalities"] = {k: ModalityInfo(**v) for k, v in data["modalities"].items()}
        data["shards"] = {k: [ShardInfo(**s) for s in v] for k, v in data["shards"].items()}
        return cls(**data)


def sha256_file(path: str | Path, block: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(root: str | Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: missing (is {root} a directory written by `snag-dist prepare`?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {version!r} not supported (expected {SCHEMA_VERSION}; "
                        "re-run `snag-dist prepare`)")
    try:
        return Manifest.from_json(data)
    except (TypeError, KeyError) as exc:
        raise DataError(f"{path}: malformed manifest ({exc})") from None
