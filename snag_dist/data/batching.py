"""Blocks of rows re-cut into batches of a fixed size: the loop every row reader shares.

Readers get rows in blocks whose sizes follow the shards (a decoded sample, a shuffle window, a file
chunk) and hand them on in batches of exactly ``size`` rows. ``cut_batches`` only computes which row
ranges of which blocks make each batch, so every row is copied once, by the caller, into its batch
(``concat_rows`` for arrays; entity blocks have their own ``EntityStream.compact``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

import numpy as np

B = TypeVar("B", bound=Sized)


def cut_batches(blocks: Iterable[B], size: int, drop_last: bool = False) -> Iterator[list[tuple[B, int, int]]]:
    """Each batch as ``[(block, start, stop), ...]`` row ranges (in order) of exactly ``size`` rows,
    the last one shorter unless ``drop_last``. Lazy: a batch is yielded as soon as its last block is read."""
    pieces: list[tuple[B, int, int]] = []
    held = 0
    for block in blocks:
        pos, rows = 0, len(block)
        while pos < rows:
            take = min(size - held, rows - pos)
            pieces.append((block, pos, pos + take))
            held, pos = held + take, pos + take
            if held == size:
                yield pieces
                pieces, held = [], 0
    if pieces and not drop_last:
        yield pieces


def concat_rows(pieces: list[tuple[np.ndarray, int, int]]) -> np.ndarray:
    """The rows of ``pieces`` as one fresh array: a copy even for a single piece, since a view would
    keep its whole (possibly much larger) block alive."""
    if len(pieces) == 1:
        block, start, stop = pieces[0]
        return block[start:stop].copy()
    return np.concatenate([block[start:stop] for block, start, stop in pieces])
