"""Integer rows to text: the id, triple and link files, formatted without per-row Python."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

ROW_CHUNK = 1 << 17  # lines formatted per chunk


def format_rows(pieces: Sequence[bytes | np.ndarray]) -> bytes:
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


def write_rows(path: Path, n: int, pieces: Callable[[np.ndarray], Sequence[bytes | np.ndarray]]) -> None:
    """Write n lines, ``pieces(ids)`` formatting a chunk of row indices."""
    with open(path, "wb") as fh:
        for start in range(0, n, ROW_CHUNK):
            fh.write(format_rows(pieces(np.arange(start, min(n, start + ROW_CHUNK)))))


def write_triples(fh: BinaryIO, tri: np.ndarray) -> None:
    fh.write(format_rows([tri[:, 0], b"\t", tri[:, 1], b"\t", tri[:, 2]]))


def write_id_files(tmp: Path, n: int, relations: int) -> None:
    write_rows(tmp / "entities.txt", n, lambda ids: [ids])
    write_rows(tmp / "relations.txt", relations, lambda ids: [ids])
    write_rows(tmp / "entity2id.txt", n, lambda ids: [b"ent_", ids, b" ", ids])


def write_uris(path: Path, n: int, id_offset: int, uri_prefix: str, uri_offset: int) -> None:
    """Lines ``id<TAB>uri_prefix<number>`` for ids id_offset.. and numbers uri_offset..."""
    prefix = f"\t{uri_prefix}".encode()
    write_rows(path, n, lambda i: [i + id_offset, prefix, i + uri_offset])
