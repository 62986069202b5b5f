"""Seeds for every random choice: (seed, epoch, rank, ...) -> a generator or a stable integer."""

from __future__ import annotations

import hashlib

import torch


def generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *parts), e.g. (seed, epoch, rank)."""
    g = torch.Generator()
    g.manual_seed(hash((seed, *parts)) & 0x7FFFFFFFFFFFFFFF)
    return g


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts that is the same in every process (Python's hash() of strings
    is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
