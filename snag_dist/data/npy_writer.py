"""``.npy`` files written front to back: the header for the final shape first, then rows appended.

Plain file writes, not ``np.lib.format.open_memmap``: every page a process writes through a mapping
stays in its RSS until the mapping closes, so filling a 1M x 384 feature table (or a 1M-entity
store's 1.5 GiB of features) that way would hold all of it. The feature store build and ``synth``
write their tables with ``NpyWriter``; ``np.load`` (``mmap_mode="r"``) reads them back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class NpyWriter:
    """A ``.npy`` of ``shape`` and ``dtype`` at ``path``; ``append`` rows in order (cast to ``dtype``)
    until ``shape[0]`` rows are written, then ``close`` (or use it as a context manager)."""

    def __init__(self, path: str | Path, dtype, shape: tuple[int, ...]) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.fh = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.fh, header)

    def append(self, rows: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
