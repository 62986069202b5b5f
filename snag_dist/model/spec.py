"""What the model needs to know about the data: entity count and the feature modalities.

The spec is built by the data layer from the shard manifest, so the model never reads files.
'structure' is not a feature modality: it is learned (an entity embedding) and is not listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snag_dist.errors import ConfigError

STRUCTURE = "structure"  # the learned modality; every other modality is a feature modality


@dataclass(frozen=True, eq=False)
class ModalitySpec:
    """One dense feature modality (relation, attribute, image, name, ...).

    Equality is spelled out because the generated one would call bool() on element-wise tensor ==.
    """

    name: str
    dim: int  # D, input feature size
    mean: torch.Tensor | None = None  # (D,) per-dimension mean over entities (GMNM noise centre)
    std: torch.Tensor | None = None  # (D,) per-dimension std over entities (GMNM noise scale)

    def __post_init__(self) -> None:
        if self.name == STRUCTURE:
            raise ConfigError("'structure' is learned, not a feature modality; leave it out of the spec")
        if self.dim < 1:
            raise ConfigError(f"modality '{self.name}' has dim {self.dim}; need >= 1")
        for what, t in (("mean", self.mean), ("std", self.std)):
            if t is not None and tuple(t.shape) != (self.dim,):
                raise ConfigError(f"modality '{self.name}' {what} has shape {tuple(t.shape)}, want ({self.dim},)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModalitySpec):
            return NotImplemented
        return (self.name, self.dim) == (other.name, other.dim) and all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in ((self.mean, other.mean), (self.std, other.std))
        )

    def __hash__(self) -> int:
        return hash((self.name, self.dim))


@dataclass(frozen=True)
class ModelSpec:
    """The data-dependent sizes of a model: entity count and feature modalities (in manifest order)."""

    num_entities: int
    modalities: tuple[ModalitySpec, ...] = ()

    def __post_init__(self) -> None:
        if self.num_entities < 1:
            raise ConfigError(f"num_entities is {self.num_entities}; need >= 1")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate modality names in spec: {names}")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def get(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise ConfigError(f"unknown modality '{name}' (known: {', '.join(self.names) or 'none'})")
