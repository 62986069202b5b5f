"""Human-readable summaries (rich tables) of shard directories and runs."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from snag_dist.data.manifest import Manifest


def manifest_table(manifest: Manifest, root: str | Path) -> Table:
    table = Table(title=f"{manifest.name} ({manifest.task}) -> {root}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    c = manifest.counts
    table.add_row("entities", f"{c['entities']:,}")
    table.add_row("relations", f"{c['relations']:,}")
    for split, n in c.get("triples", {}).items():
        table.add_row(f"triples/{split}", f"{n:,}")
    for split, n in c.get("links", {}).items():
        table.add_row(f"links/{split}", f"{n:,}")
    for name, m in manifest.modalities.items():
        table.add_row(f"modality {name}", f"{m.kind} dim {m.dim} {m.dtype}, coverage {m.coverage:.1%}")
    n_shards = sum(len(v) for v in manifest.shards.values())
    size = sum(s.bytes for v in manifest.shards.values() for s in v)
    table.add_row("shards", f"{n_shards} ({size / 2**20:.1f} MiB)")
    return table


def print_manifest(manifest: Manifest, root: str | Path) -> None:
    Console().print(manifest_table(manifest, root))


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
