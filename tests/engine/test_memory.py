"""glibc allocator settings: applied on Linux/glibc, and large buffers still allocate and free."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from snag_dist.engine.memory import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_keep_freed_memory_applies_and_large_blocks_still_work():
    assert keep_freed_memory() is True
    for _ in range(3):  # 64 MiB blocks, above glibc's default mmap threshold
        block = torch.ones(1 << 24)
        assert float(block.sum()) == float(1 << 24)
        del block
