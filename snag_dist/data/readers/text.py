"""Chunked parsing of whitespace-separated integer tables (triples, links, id lists).

Files are read in byte blocks (never whole), so a 100M-line triple file is parsed with bounded
memory. Every problem names the file and, where it can, the line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from snag_dist.errors import DataError

BLOCK_BYTES = 16 << 20


def _blocks(path: Path, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Yield (first line number, block of complete lines)."""
    line_no = 1
    rest = b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(block_bytes)
            if not chunk:
                break
            data = rest + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            block, rest = data[: cut + 1], data[cut + 1 :]
            yield line_no, block
            line_no += block.count(b"\n")
    if rest.strip():
        yield line_no, rest + b"\n"


def _bad_line(path: Path, first_line: int, block: bytes, cols: int) -> DataError:
    for offset, line in enumerate(block.split(b"\n")):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != cols or not all(p.lstrip(b"-").isdigit() for p in parts):
            shown = line.decode("utf-8", "replace").strip()[:80]
            return DataError(
                f"{path}: line {first_line + offset}: expected {cols} integer columns, got '{shown}'"
            )
    return DataError(f"{path}: malformed integer table near line {first_line}")


def iter_int_rows(path: str | Path, cols: int, block_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """Yield int64 arrays of shape (rows, cols) from a text table, block by block."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    for first_line, block in _blocks(path, block_bytes):
        block = block.replace(b"\r", b"")
        n_lines = sum(1 for line in block.split(b"\n") if line.strip())
        if n_lines == 0:
            continue
        try:
            flat = np.array(block.split(), dtype=np.int64)
        except ValueError:
            raise _bad_line(path, first_line, block, cols) from None
        if flat.size != n_lines * cols:
            raise _bad_line(path, first_line, block, cols)
        yield flat.reshape(n_lines, cols)


def read_int_rows(path: str | Path, cols: int) -> np.ndarray:
    parts = list(iter_int_rows(path, cols))
    return np.concatenate(parts) if parts else np.zeros((0, cols), dtype=np.int64)


def read_id_names(path: str | Path, sep: bytes | None = b"\t", id_last: bool = False,
                  skip_count_line: bool = False) -> tuple[np.ndarray, list[str]]:
    """Read ``id<TAB>name`` (or ``name id`` when ``id_last``) lines -> (ids int64, names)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    ids: list[int] = []
    names: list[str] = []
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip() or (skip_count_line and line_no == 1 and line.strip().isdigit()):
                continue
            if id_last:
                name, _, id_part = line.rpartition(b" " if sep is None else sep)
            else:
                id_part, _, name = line.partition(sep if sep is not None else b" ")
            try:
                ids.append(int(id_part))
            except ValueError:
                shown = line.decode("utf-8", "replace")[:80]
                raise DataError(f"{path}: line {line_no}: expected an integer id, got '{shown}'") from None
            names.append(name.decode("utf-8", "replace").strip())
    return np.asarray(ids, dtype=np.int64), names
