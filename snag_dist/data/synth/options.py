"""What ``synth`` generates: its options and the ``--modalities`` spec."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from snag_dist.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ModalityOption:
    """One dense feature modality written to ``features/<name>.npy``."""

    name: str  # file stem; letters, digits, '_' or '-'
    dim: int  # feature width
    coverage: float  # share of entities that have it (the rest: zero rows, present = 0)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name == "relation":
            raise ConfigError(
                f"bad modality name '{self.name}' (letters, digits, _ or -; 'relation' is derived by prepare)"
            )
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigError(f"modality '{self.name}': dim must be a positive integer, got {self.dim!r}")
        if not 0.0 <= self.coverage <= 1.0:
            raise ConfigError(f"modality '{self.name}': coverage must be in [0, 1], got {self.coverage!r}")


DEFAULT_MODALITIES = (
    ModalityOption("image", 256, 0.7),
    ModalityOption("name", 384, 1.0),
    ModalityOption("attribute", 128, 0.9),
)


@dataclass(frozen=True)
class SynthOptions:
    """What to generate; ``prepare`` adds the 'relation' bag from the triples."""

    entities: int  # total entities N (mmea: KG1 gets N // 2, KG2 the rest)
    triples: int  # target triple count (mmea: over both KGs); self loops and duplicates are dropped
    task: Literal["mmea", "mkgc"] = "mkgc"  # entity alignment or KG completion layout
    relations: int = 200  # relations R (mmea: per KG, so 2R ids in all)
    modalities: tuple[ModalityOption, ...] = DEFAULT_MODALITIES  # dense feature modalities
    dtype: str = "float16"  # feature dtype
    link_ratio: float = 0.8  # mmea: share of KG1 entities with a KG2 counterpart
    seed: int = 0  # every random choice derives from it
    valid_ratio: float = 0.05  # mkgc: share of triples in valid.txt
    test_ratio: float = 0.05  # mkgc: share of triples in test.txt

    def __post_init__(self) -> None:
        for field, least in (("entities", 2), ("triples", 1), ("relations", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"synth {field} must be an integer >= {least}, got {value!r}")
        if self.task not in ("mmea", "mkgc"):
            raise ConfigError(f"unknown synth task '{self.task}' (known: mkgc, mmea)")
        try:
            kind = np.dtype(self.dtype).kind
        except TypeError:
            kind = ""
        if kind != "f" or np.dtype(self.dtype).itemsize > 8:
            raise ConfigError(f"synth dtype must be float16, float32 or float64, got '{self.dtype}'")
        if not 0.0 < self.link_ratio <= 1.0:
            raise ConfigError(f"synth link_ratio must be in (0, 1], got {self.link_ratio!r}")
        if self.valid_ratio < 0 or self.test_ratio < 0 or self.valid_ratio + self.test_ratio >= 1:
            raise ConfigError("synth valid_ratio and test_ratio must be >= 0 with a sum below 1")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate modality names in {', '.join(names)}")


def parse_modalities(spec: str) -> tuple[ModalityOption, ...]:
    """``"image:256:0.7,name:384:1.0"`` -> options; coverage may be left out (1.0)."""
    out = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        fields = item.split(":")
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            coverage = float(fields[2]) if len(fields) == 3 else 1.0
            out.append(ModalityOption(fields[0], int(fields[1]), coverage))
        except ValueError:
            raise ConfigError(f"bad modality '{item}': expected name:dim[:coverage], e.g. image:256:0.7") from None
    if not out:
        raise ConfigError(f"no modalities in '{spec}' (expected e.g. image:256:0.7,name:384:1.0)")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate modality names in '{spec}'")
    return tuple(out)
