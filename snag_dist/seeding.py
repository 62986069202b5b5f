"""Seeds for every random choice: (seed, epoch, rank, ...) -> a generator or a stable integer.

Every random stream of the package comes from here, so one grep finds them all. A stream is named by
the run's seed and the parts that tell its draws apart (epoch, rank, step, worker, a name); the parts
become a key in one of two ways, then the key seeds the generator the caller needs:

* ``stable_seed(*parts)``: any parts (strings too), the same in every process and Python version;
* ``tuple_seed(*parts, bits)``: integer parts only, Python's tuple hash (not salted for integers, so
  the same in every process of a run), the older and faster way; kept where it seeds existing streams.

Generators: ``generator(seed, *parts)`` (torch, keyed by ``tuple_seed``), ``torch_generator(key)``,
``numpy_rng(*parts)`` (numpy's SeedSequence of the parts), ``python_rng(key)``, and ``seed_torch(seed)``
for torch's global generator (weight initialisation). Changing which way a stream is keyed changes
its draws, so existing streams keep theirs.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts that is the same in every process (Python's hash() of strings
    is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def tuple_seed(*parts: int, bits: int = 63) -> int:
    """``hash(parts)`` cut to ``bits`` bits: integer parts only (their hash is not salted)."""
    return hash(parts) & ((1 << bits) - 1)


def torch_generator(key: int, device: torch.device | str | None = None) -> torch.Generator:
    """A torch generator (CPU unless ``device``) seeded with ``key``."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    g.manual_seed(key)
    return g


def generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *parts), e.g. (seed, epoch, rank)."""
    return torch_generator(tuple_seed(seed, *parts))


def numpy_rng(*parts: int) -> np.random.Generator:
    """A numpy generator (PCG64) seeded with the SeedSequence of non-negative integer ``parts``, e.g.
    (seed, epoch, rank, worker); ``numpy_rng(s)`` is ``np.random.default_rng(s)``."""
    return np.random.default_rng(list(parts))


def python_rng(key: int) -> random.Random:
    """A ``random.Random`` seeded with ``key`` (what WebDataset's shuffle and shard shuffles take)."""
    return random.Random(key)


def seed_torch(seed: int) -> None:
    """Seed torch's global generators (CPU and every GPU): identical initial weights on every rank."""
    torch.manual_seed(seed)
