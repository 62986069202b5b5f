"""NpyWriter: a .npy appended row block by row block is the file np.save writes for the whole array."""

from __future__ import annotations

import io

import numpy as np
import pytest

from snag_dist.data.npy_writer import NpyWriter


def _saved(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize("dtype, shape", [(np.float16, (1000, 7)), (np.uint8, (999,)), (np.bool_, (50, 3)),
                                          (np.float32, (0, 4))])
def test_appended_blocks_equal_np_save(tmp_path, dtype, shape):
    rng = np.random.default_rng(0)
    whole = (rng.standard_normal(shape) * 3).astype(dtype)
    path = tmp_path / "x.npy"
    with NpyWriter(path, dtype, shape) as out:
        for a in range(0, shape[0], 137):
            out.append(whole[a:a + 137].astype(np.float64))  # cast back to dtype on the way
    assert path.read_bytes() == _saved(whole)
    assert np.array_equal(np.load(path, mmap_mode="r"), whole)


def test_bool_rows_become_0_1_bytes(tmp_path):
    has = np.array([True, False, True])
    with NpyWriter(tmp_path / "p.npy", np.uint8, (3,)) as out:
        out.append(has)
    assert np.load(tmp_path / "p.npy").tolist() == [1, 0, 1]
