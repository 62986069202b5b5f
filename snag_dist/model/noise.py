"""Gauss Modality Noise Masking (GMNM), the "noise" of SNAG.

During training, for each modality m a Bernoulli(noise_ratio_m) draw per entity picks the noised
entities; their input x becomes (1 - mask_ratio_m) * x + mask_ratio_m * eps with
eps ~ N(mean_m, std_m) per dimension, from that modality's statistics over all entities. The
structure modality uses both ratios times `structure_scale` (0.5 in the paper) and its statistics
are recomputed from the learned embedding at every resample. Evaluation always sees clean inputs.

Resampling: "epoch" fixes the chosen entities and their eps for a whole epoch, indexed by entity
id (the reference redraws once per epoch); "step" draws afresh on every call. Every draw uses a
torch.Generator seeded from (seed, epoch, step, modality), so a run replays exactly; draws made on
different device types (CPU vs CUDA generators) differ. Pass a rank-mixed seed to `resample` for
per-rank draws. Shapes: N entities, B batch rows, D dims, K noised entities.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from snag_dist.config.schema import NoiseConfig
from snag_dist.errors import ConfigError, DataError
from snag_dist.model.spec import STRUCTURE


def draw_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_overrides(cfg: NoiseConfig, known: Iterable[str]) -> None:
    """Fail on per-modality overrides for a modality nobody knows (most likely a typo)."""
    known = set(known)
    unknown = sorted(set(cfg.per_modality) - known)
    if unknown:
        raise ConfigError(f"noise.per_modality has unknown modality {unknown} (known: {', '.join(sorted(known))})")


class GaussModalityNoise(nn.Module):
    """GMNM over named modalities: call `noise(name, x_BD, entity_ids_B)` on each modality input.

    `stats[name] = (mean (D,), std (D,))` per modality; a 'structure' entry is a placeholder that
    `resample(..., struct_weight)` / `set_structure_stats` overwrite. `num_entities` is needed only
    for epoch resampling (masks are drawn for every entity id).
    """

    def __init__(
        self,
        cfg: NoiseConfig,
        stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        num_entities: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_entities = num_entities
        self.names = list(stats)
        for name, (mean, std) in stats.items():
            if mean.shape != std.shape or mean.dim() != 1:
                raise DataError(f"noise stats for '{name}' need mean and std of shape (D,)")
            # Feature stats come from the manifest each run; the structure stats follow the learned
            # weights, so they are saved to replay the same noise after a mid-epoch resume.
            persistent = name == STRUCTURE
            self.register_buffer(f"{name}_mean", mean.detach().float().clone(), persistent=persistent)
            self.register_buffer(f"{name}_std", std.detach().float().clone(), persistent=persistent)
        self._seed, self._epoch, self._step = 0, 0, 0
        self._drawn: dict[str, tuple[torch.device, torch.Tensor, torch.Tensor]] = {}  # name -> (dev, pos_N, eps_KD)
        self._last: dict[str, torch.Tensor] = {}  # name -> mask_B of the last call

    # ---- configuration -------------------------------------------------------------------
    def ratios(self, name: str) -> tuple[float, float]:
        """(noise_ratio, mask_ratio) of a modality: override, else the structure-scaled or global ones."""
        if name in self.cfg.per_modality:
            override = self.cfg.per_modality[name]
            return override.noise_ratio, override.mask_ratio
        if name == STRUCTURE:
            scale = self.cfg.structure_scale
            return self.cfg.noise_ratio * scale, self.cfg.mask_ratio * scale
        return self.cfg.noise_ratio, self.cfg.mask_ratio

    def stats(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.names:
            raise DataError(f"no GMNM statistics for modality '{name}' (have: {', '.join(self.names) or 'none'})")
        return getattr(self, f"{name}_mean"), getattr(self, f"{name}_std")

    @torch.no_grad()
    def set_structure_stats(self, weight_ND: torch.Tensor) -> None:
        """Per-dimension mean/std of the current structure embedding (the reference's ent_mean/ent_std)."""
        mean, std = self.stats(STRUCTURE)
        if weight_ND.shape[1:] != mean.shape:
            raise DataError(f"structure weight has shape {tuple(weight_ND.shape)}, want (N, {mean.shape[0]})")
        mean.copy_(weight_ND.float().mean(dim=0))
        std.copy_(weight_ND.float().std(dim=0))
        self._drawn.pop(STRUCTURE, None)

    def resample(self, epoch: int, seed: int, struct_weight: torch.Tensor | None = None) -> None:
        """Start a new epoch of draws: new masks and eps (epoch mode), step counter reset."""
        self._seed, self._epoch, self._step = int(seed), int(epoch), 0
        self._drawn.clear()
        if struct_weight is not None:
            self.set_structure_stats(struct_weight)

    # ---- state (a tensor, so safetensors checkpoints can hold it) ------------------------
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self._seed, self._epoch, self._step], dtype=torch.long)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self._seed, self._epoch, self._step = (int(v) for v in state.tolist())
        self._drawn.clear()  # redrawn lazily from the restored seed, identical to the saved run

    # ---- draws ---------------------------------------------------------------------------
    def _generator(self, device: torch.device, name: str, step: int | None) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(draw_seed(self._seed, self._epoch, step, name))
        return gen

    def _epoch_draw(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(pos_N, eps_KD): pos_N[e] is e's row in eps_KD, or -1 when e is not noised this epoch."""
        mean, std = self.stats(name)
        cached = self._drawn.get(name)
        if cached is not None and cached[0] == mean.device:
            return cached[1], cached[2]
        if self.num_entities is None:
            raise ConfigError("epoch resampling needs GaussModalityNoise(num_entities=...)")
        noise_ratio, _ = self.ratios(name)
        gen = self._generator(mean.device, name, step=None)
        mask_N = torch.rand(self.num_entities, generator=gen, device=mean.device) < noise_ratio
        pos_N = torch.where(mask_N, torch.cumsum(mask_N, 0) - 1, -1)
        k = int(mask_N.sum())
        eps_KD = mean + std * torch.randn(k, mean.shape[0], generator=gen, device=mean.device)
        self._drawn[name] = (mean.device, pos_N, eps_KD)
        return pos_N, eps_KD

    def _step_draw(self, name: str, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask_B, eps_BD) drawn afresh; the step counter moves on every call."""
        mean, std = self.stats(name)
        noise_ratio, _ = self.ratios(name)
        gen = self._generator(device, name, step=self._step)
        self._step += 1
        mask_B = torch.rand(rows, generator=gen, device=device) < noise_ratio
        eps_BD = torch.randn(rows, mean.shape[0], generator=gen, device=device)
        return mask_B, mean.to(device) + std.to(device) * eps_BD

    def entity_mask(self, name: str) -> torch.Tensor:
        """(N,) bool: the entities noised in modality `name` this epoch (epoch mode)."""
        return self._epoch_draw(name)[0] >= 0

    def last_mask(self, name: str) -> torch.Tensor:
        """(B,) bool: the rows noised by the last call for `name` (all False when noise is off)."""
        if name not in self._last:
            raise KeyError(f"no noise call for modality '{name}' yet")
        return self._last[name]

    # ---- the op --------------------------------------------------------------------------
    def forward(self, name: str, x_BD: torch.Tensor, entity_ids_B: torch.Tensor) -> torch.Tensor:
        """x_BD with GMNM applied to the chosen entities; x_BD itself when off (eval, disabled)."""
        noise_ratio, mask_ratio = self.ratios(name)
        if not (self.training and self.cfg.enabled) or noise_ratio == 0.0 or mask_ratio == 0.0:
            self._last[name] = torch.zeros(x_BD.shape[0], dtype=torch.bool, device=x_BD.device)
            return x_BD
        mean, _ = self.stats(name)
        if x_BD.dim() != 2 or x_BD.shape[1] != mean.shape[0]:
            raise DataError(f"'{name}' input has shape {tuple(x_BD.shape)}, its noise stats have D={mean.shape[0]}")
        if self.cfg.resample == "epoch":
            pos_N, eps_KD = self._epoch_draw(name)
            pos_B = pos_N.to(x_BD.device)[entity_ids_B.to(x_BD.device)]
            mask_B = pos_B >= 0
            if eps_KD.shape[0] == 0:  # nobody drawn this epoch (tiny N or ratio)
                self._last[name] = mask_B
                return x_BD
            eps_BD = eps_KD.to(x_BD.device)[pos_B.clamp_min(0)]
        else:
            mask_B, eps_BD = self._step_draw(name, x_BD.shape[0], x_BD.device)
        self._last[name] = mask_B
        mixed_BD = (1.0 - mask_ratio) * x_BD + mask_ratio * eps_BD.to(x_BD.dtype)
        return torch.where(mask_B[:, None], mixed_BD, x_BD)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"enabled={c.enabled}, noise_ratio={c.noise_ratio}, mask_ratio={c.mask_ratio}, "
            f"structure_scale={c.structure_scale}, resample={c.resample}, modalities={self.names}"
        )
