"""Reading the datasets' plain-text files: whitespace-separated integer tables (triples, links, id
lists), parsed in chunks, and ``id<TAB>name`` lists.

Files are never read whole (integer tables in byte blocks, name lists line by line), so a
100M-line triple file is parsed with bounded memory. Every problem names the file and, where it can, the line.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from snag_dist.errors import DataError

BLOCK_BYTES = 16 << 20
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark some editors put first; never part of a value
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _blocks(path: Path, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Yield (first line number, block of complete lines); a leading BOM is dropped."""
    line_no = 1
    rest = b""
    with open(path, "rb") as fh:
        first = True
        while True:
            chunk = fh.read(block_bytes)
            if not chunk:
                break
            if first:
                chunk, first = chunk.removeprefix(BOM), False
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


def _shown(line: bytes) -> str:
    return line.decode("utf-8", "replace").strip()[:80]


def _int_or_none(token: bytes) -> int | None:
    try:
        return int(token)
    except ValueError:
        return None


def _bad_line(path: Path, first_line: int, block: bytes, cols: int) -> DataError:
    """The error for the first line of ``block`` that is not ``cols`` int64 values."""
    for offset, line in enumerate(block.split(b"\n")):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}: line {first_line + offset}"
        values = [_int_or_none(p) for p in parts]
        if len(parts) != cols or None in values:
            return DataError(f"{where}: expected {cols} integer columns, got '{_shown(line)}'")
        big = next((p for p, v in zip(parts, values) if not _INT64[0] <= v <= _INT64[1]), None)
        if big is not None:
            return DataError(f"{where}: integer {big.decode()} does not fit in 64 bits")
    return DataError(f"{path}: malformed integer table near line {first_line}")


def _tokens_per_line(block: bytes) -> np.ndarray:
    """Whitespace-separated tokens on each line of ``block`` (which ends with a newline)."""
    buf = np.frombuffer(block, np.uint8)
    space = (buf == 32) | ((buf >= 9) & (buf <= 13))  # exactly what bytes.split() splits on
    start = ~space
    start[1:] &= space[:-1]  # first byte of each token
    ends = np.flatnonzero(buf == 10)
    firsts = np.empty(len(ends), np.int64)
    firsts[0], firsts[1:] = 0, ends[:-1] + 1
    return np.add.reduceat(start, firsts, dtype=np.int64)


def _parse_ints(block: bytes, expected: int) -> np.ndarray | None:
    """numpy's C parser (~6x faster than converting ``block.split()``); None where it cannot vouch for
    the result, and the caller parses strictly: non-ASCII bytes, a token it stops at, a count that
    differs, or a value clamped at the int64 bounds (it saturates instead of failing)."""
    try:
        text = block.decode("ascii")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # older numpy warns (DeprecationWarning) where 2.x raises
            flat = np.fromstring(text, dtype=np.int64, sep=" ")
    except (UnicodeDecodeError, ValueError, DeprecationWarning):
        return None
    if flat.size != expected or (flat.size and (flat.max() == _INT64[1] or flat.min() == _INT64[0])):
        return None
    return flat


def iter_int_rows(path: str | Path, cols: int, block_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """Yield int64 arrays of shape (rows, cols) from a text table, block by block.

    Every non-blank line must hold exactly ``cols`` integers: the column count is checked per line
    (a 2-column line next to a 4-column one is an error naming the line, not two re-cut rows).
    A leading BOM, CR-LF line ends, blank lines and surrounding whitespace are accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    for first_line, block in _blocks(path, block_bytes):
        block = block.replace(b"\r", b"")
        per_line = _tokens_per_line(block)
        filled = per_line > 0
        n_lines = int(filled.sum())
        if n_lines == 0:
            continue
        if (filled & (per_line != cols)).any():
            raise _bad_line(path, first_line, block, cols)
        flat = _parse_ints(block, n_lines * cols)
        if flat is None:
            try:
                flat = np.array(block.split(), dtype=np.int64)
            except (ValueError, OverflowError):
                raise _bad_line(path, first_line, block, cols) from None
            if flat.size != n_lines * cols:
                raise _bad_line(path, first_line, block, cols)
        yield flat.reshape(n_lines, cols)


def read_int_rows(path: str | Path, cols: int) -> np.ndarray:
    parts = list(iter_int_rows(path, cols))
    return np.concatenate(parts) if parts else np.zeros((0, cols), dtype=np.int64)


def line_of_row(path: str | Path, row: int) -> int:
    """The line number (1-based) of the ``row``-th (0-based) non-blank line: rows as the readers count
    them. For error messages only (it re-reads the file); 0 when the file has fewer rows."""
    seen = -1
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1:
                raw = raw.removeprefix(BOM)
            if raw.strip():
                seen += 1
                if seen == row:
                    return line_no
    return 0


def read_id_names(path: str | Path, sep: bytes | None = b"\t", id_last: bool = False,
                  skip_count_line: bool = False) -> tuple[np.ndarray, list[str]]:
    """Read ``id<TAB>name`` (or ``name id`` when ``id_last``) lines -> (ids int64, names).

    Lines must be UTF-8 (a leading BOM is dropped); a byte that is not is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    ids: list[int] = []
    names: list[str] = []
    split = None if sep is None else sep.decode()
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1:
                raw = raw.removeprefix(BOM)
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: line {line_no}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); re-encode the file as UTF-8") from None
            if not line.strip() or (skip_count_line and line_no == 1 and line.strip().isdigit()):
                continue
            if id_last:
                name, _, id_part = line.rstrip().rpartition(" " if split is None else split)
            else:
                id_part, _, name = line.partition(split if split is not None else " ")
            try:
                ids.append(int(id_part))
            except ValueError:
                raise DataError(f"{path}: line {line_no}: expected an integer id, got '{line.strip()[:80]}'") from None
            names.append(name.strip())
    return np.asarray(ids, dtype=np.int64), names
