"""Gauss Modality Noise Masking (GMNM), the "noise" of SNAG.

During training, for each modality m a Bernoulli(noise_ratio_m) draw per entity picks the noised
entities; their input x becomes (1 - mask_ratio_m) * x + mask_ratio_m * eps with
eps ~ N(mean_m, std_m) per dimension, from that modality's statistics over all entities. The
structure modality uses both ratios times `structure_scale` (0.5 in the paper) and its statistics
are recomputed from the learned embedding at every resample. Evaluation always sees clean inputs.

Resampling: "epoch" fixes the chosen entities and their eps for a whole epoch, indexed by entity
id (the reference redraws once per epoch); "step" draws afresh on every call (one step counter over
all modality calls, reset by `resample`, saved in the state).

Both ways of drawing index every draw by ENTITY ID, never by row position or process, so a
data-parallel run (any world size, any split of a batch over the ranks) noises an entity exactly as
one process does, as long as every rank makes the same calls (one model call per training step):
- table (keyed=False, the full-graph path): every draw uses a torch.Generator seeded from (seed,
  epoch, step, modality), so a run replays exactly; draws made on different device types (CPU vs
  CUDA generators) differ. A draw is a mask over all N entity ids and eps for the K noised ones
  (O(N + K x D), cached per modality: once per epoch, or once per step in step mode); a call
  indexes it by the rows' entity ids.
- keyed (keyed=True, the stream path): a draw is a pure function of (seed, epoch[, step], modality,
  entity id) by a counter-based hash, made only for the rows of the call (eps only for the noised
  ones): nothing N-sized, and an entity gets the same noise whichever process or batch holds it.
  The integer part is exact on every device; the float part (Box-Muller) may differ by an ulp
  between CPU and CUDA.

Keyed dropout (`KeyedDropout`, the same idea for the fusion Transformer's dropout): a row's mask is a
pure function of (seed, epoch, step, site, call, entity id of the row), so a rank that holds a share of
the batch drops out exactly what one process drops for those entities (torch's dropout draws from
each process's RNG over the rows that process has: another mask as soon as the batch is split).

Shapes: N entities, B batch rows, D dims, K noised entities (or noised rows), J = ceil(D / 2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.config.schema import NoiseConfig
from snag_dist.errors import ConfigError, DataError
from snag_dist.model.spec import STRUCTURE
from snag_dist.seeding import stable_seed, torch_generator

draw_seed = stable_seed  # a stable 63-bit seed from any parts (kept under its old name)


# ---- keyed draws: splitmix64 on int64 tensors ------------------------------------------------
# Hand-written because torch has no counter-based per-element RNG keyed by arbitrary ids on CPU: a
# torch.Generator stream depends on the call order and the shape drawn, so the same entity would get
# other noise in another batch. torch int64 multiply wraps (mod 2**64, as splitmix64 needs); `>>` on
# int64 is arithmetic, so each shift is masked to make it logical; constants above 2**63 are written
# as their two's complement int64 values.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15, the splitmix64 increment
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
_LOW32 = (1 << 32) - 1


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 z by s (0 < s < 64)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place on an int64 tensor (a bijection of 64-bit values)."""
    for shift, mult in ((30, _MIX1), (27, _MIX2)):
        z ^= _srl(z, shift)
        z *= mult
    z ^= _srl(z, 31)
    return z


def mix_rows(x_BD: torch.Tensor, rows_K: torch.Tensor, eps_KD: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """x_BD with rows ``rows_K`` replaced by (1 - mask_ratio) x + mask_ratio eps. Only those rows are
    computed: the same values and gradients as a where() over all rows, without two (B, D) passes each
    way for the ~noise_ratio of rows that change."""
    mixed_KD = (1.0 - mask_ratio) * x_BD.index_select(0, rows_K) + mask_ratio * eps_KD.to(x_BD.dtype)
    return x_BD.index_copy(0, rows_K, mixed_KD)


def keyed_hash(key: int, ids: torch.Tensor) -> torch.Tensor:
    """(B,) int64: output e+1 of splitmix64 seeded with `key`, for each id e (a counter-based draw)."""
    return _mix_(ids.long() * _GOLDEN + (key + _GOLDEN))


def keyed_uniform(key: int, ids: torch.Tensor) -> torch.Tensor:
    """(B,) float64 in [0, 1): U(key, e), the top 53 bits of the hash (exact in float64)."""
    return _srl(keyed_hash(key, ids), 11).double() * 2.0**-53


def keyed_below(key: int, ids: torch.Tensor, p: float) -> torch.Tensor:
    """(B,) bool: U(key, e) < p, decided on integers (no float64 needed on the device)."""
    return _srl(keyed_hash(key, ids), 11) < math.ceil(p * 2.0**53)  # k * 2**-53 < p  <=>  k < ceil(p * 2**53)


def keyed_normal(key: int, ids: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) float32 standard normals Z(key, e, d), by Box-Muller from the splitmix64 stream of e.

    Row e's stream is seeded with keyed_hash(key, e); its output j+1 gives two 32-bit uniforms u1
    (high half) and u2 (low half), and r = sqrt(-2 ln(1 - u1)), theta = 2 pi u2 give Z[e, j] =
    r cos(theta) and Z[e, j + J] = r sin(theta) (J = ceil(dim / 2)). |Z| < 6.67 (32-bit u1).
    """
    half = (dim + 1) // 2
    seed_B = keyed_hash(key, ids)
    g_BJ = _mix_(seed_B[:, None] + torch.arange(1, half + 1, device=ids.device) * _GOLDEN)
    one_minus_u1 = ((1 << 32) - _srl(g_BJ, 32)).float().mul_(2.0**-32)  # (0, 1]: ln is finite
    r_BJ = one_minus_u1.log_().mul_(-2.0).sqrt_()
    theta_BJ = (g_BJ & _LOW32).float().mul_(2.0 * math.pi * 2.0**-32)
    # sin(t) = cos(t - pi/2): one contiguous cos over (B, 2, J) beats writing cos/sin into strided halves.
    shift_2 = torch.arange(2, device=ids.device, dtype=torch.float32).mul_(-0.5 * math.pi)
    z_B2J = (theta_BJ[:, None, :] + shift_2[None, :, None]).cos_().mul_(r_BJ[:, None, :])
    return z_B2J.view(ids.shape[0], 2 * half)[:, :dim]


def keyed_keep(key: int, ids: torch.Tensor, width: int, keep: float) -> torch.Tensor:
    """(B, width) bool: element (e, j) is kept iff the j-th 32-bit uniform of row e's splitmix64 stream
    (seeded with keyed_hash(key, e), as in keyed_normal: output j+1 gives the high and low halves of
    columns j and j + J) is below `keep`, decided on integers: the same mask on every device."""
    half = (width + 1) // 2
    g_BJ = _mix_(keyed_hash(key, ids)[:, None] + torch.arange(1, half + 1, device=ids.device) * _GOLDEN)
    limit = math.ceil(keep * 2.0**32)
    out_B2J = torch.empty(ids.shape[0], 2, half, dtype=torch.bool, device=ids.device)
    torch.lt(_srl(g_BJ, 32), limit, out=out_B2J[:, 0])
    torch.lt(g_BJ.bitwise_and_(_LOW32), limit, out=out_B2J[:, 1])
    return out_B2J.view(ids.shape[0], 2 * half)[:, :width]


class DropoutKeys:
    """What keyed dropout masks are keyed by, shared by a model's `KeyedDropout` modules: the run's seed,
    the training position (epoch, step) that the task sets, and the entity ids of the rows of the model
    call in flight (`rows(ids)`, set by the task's input path around each call). Not module state:
    nothing to save, since the position comes back with the data position on a resume."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.position: tuple[int, int] | None = None
        self.ids: torch.Tensor | None = None
        self._calls: dict[str, int] = {}

    def set_position(self, epoch: int, step: int) -> None:
        self.position = (int(epoch), int(step))

    @contextmanager
    def rows(self, ids: torch.Tensor) -> Iterator[None]:
        """Rows of the calls inside are entities `ids` (one id per row, in order)."""
        saved = self.ids, self._calls
        self.ids, self._calls = ids, {}
        try:
            yield
        finally:
            self.ids, self._calls = saved

    def key(self, site: str) -> int:
        """The key of the next mask at `site` in this call (a site called twice draws two masks)."""
        call = self._calls.get(site, 0)
        self._calls[site] = call + 1
        return draw_seed("dropout", self.seed, *self.position, site, call)


class KeyedDropout(nn.Module):
    """nn.Dropout whose mask is keyed by (seed, epoch, step, site, call, entity id of each row).

    Keyed when the input's rows are the entities of `keys.rows(...)` and a training position is set;
    otherwise (a model called directly, a task that sets no position) plain dropout from torch's RNG.
    """

    def __init__(self, p: float, site: str, keys: DropoutKeys) -> None:
        super().__init__()
        self.p, self.site = float(p), site
        self.keys = keys  # shared plain attribute: not a submodule, not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        ids, keys = self.keys.ids, self.keys
        if ids is None or keys.position is None or x.dim() == 0 or ids.shape[0] != x.shape[0]:
            return F.dropout(x, self.p, training=True)
        if self.p >= 1.0:
            return x * 0.0
        width = math.prod(x.shape[1:])
        keep = keyed_keep(keys.key(self.site), ids.to(device=x.device, dtype=torch.long), width, 1.0 - self.p)
        return x * keep.view(x.shape).to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}, keyed by entity id"


def use_keyed_dropout(module: nn.Module, keys: DropoutKeys) -> int:
    """Replace every nn.Dropout inside `module` (whose inputs have one row per entity, as the fusion's)
    by a KeyedDropout sharing `keys`, named by its path; returns how many were replaced."""
    swapped = 0
    for path, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, KeyedDropout(child.p, f"{path}.{name}" if path else name, keys))
                swapped += 1
    return swapped


def check_overrides(cfg: NoiseConfig, known: Iterable[str]) -> None:
    """Fail on per-modality overrides for a modality nobody knows (most likely a typo)."""
    known = set(known)
    unknown = sorted(set(cfg.per_modality) - known)
    if unknown:
        raise ConfigError(f"noise.per_modality has unknown modality {unknown} (known: {', '.join(sorted(known))})")


class GaussModalityNoise(nn.Module):
    """GMNM over named modalities: call `noise(name, x_BD, entity_ids_B)` on each modality input.

    `stats[name] = (mean (D,), std (D,))` per modality; a 'structure' entry is a placeholder that
    `resample(..., struct_weight)` / `set_structure_stats` overwrite. `num_entities` is needed for
    table draws (masks are drawn for every entity id). `keyed=True` makes every draw a
    pure function of (seed, epoch[, step], modality, entity id), with no N-sized state (the caller
    resolves NoiseConfig.draws="auto"); `mask_of(name, ids)` then tells which rows a draw noises.
    """

    def __init__(
        self,
        cfg: NoiseConfig,
        stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        num_entities: int | None = None,
        *,
        keyed: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_entities = num_entities
        self.keyed = bool(keyed)
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
        # name -> (device, step or None, pos_N, eps_KD): the table draw of the epoch or of one step
        self._drawn: dict[str, tuple[torch.device, int | None, torch.Tensor, torch.Tensor]] = {}
        self._last: dict[str, torch.Tensor] = {}  # name -> mask_B of the last call
        self._last_step: dict[str, int] = {}  # name -> step of the last step-mode call

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
    def set_stats(self, name: str, mean_D: torch.Tensor, std_D: torch.Tensor) -> None:
        """Overwrite a modality's eps statistics (e.g. structure stats all-reduced over processes)."""
        mean, std = self.stats(name)
        if mean_D.shape != mean.shape or std_D.shape != std.shape:
            raise DataError(
                f"stats for '{name}' have shapes {tuple(mean_D.shape)}/{tuple(std_D.shape)}, want ({mean.shape[0]},)")
        mean.copy_(mean_D)
        std.copy_(std_D)
        self._drawn.pop(name, None)

    @torch.no_grad()
    def set_structure_stats(self, weight_ND: torch.Tensor) -> None:
        """Per-dimension mean/std of the current structure embedding (the reference's ent_mean/ent_std)."""
        mean, _ = self.stats(STRUCTURE)
        if weight_ND.shape[1:] != mean.shape:
            raise DataError(f"structure weight has shape {tuple(weight_ND.shape)}, want (N, {mean.shape[0]})")
        self.set_stats(STRUCTURE, weight_ND.float().mean(dim=0), weight_ND.float().std(dim=0))

    def resample(self, epoch: int, seed: int, struct_weight: torch.Tensor | None = None) -> None:
        """Start a new epoch of draws: new masks and eps (epoch mode), step counter reset."""
        self._seed, self._epoch, self._step = int(seed), int(epoch), 0
        self._drawn.clear()
        self._last_step.clear()
        if struct_weight is not None:
            self.set_structure_stats(struct_weight)

    # ---- state (a tensor, so safetensors checkpoints can hold it) ------------------------
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self._seed, self._epoch, self._step], dtype=torch.long)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self._seed, self._epoch, self._step = (int(v) for v in state.tolist())
        self._drawn.clear()  # redrawn lazily from the restored seed, identical to the saved run
        self._last_step.clear()

    # ---- draws ---------------------------------------------------------------------------
    def _generator(self, device: torch.device, name: str, step: int | None) -> torch.Generator:
        gen = torch_generator(draw_seed(self._seed, self._epoch, step, name), device)
        return gen

    def _table_draw(self, name: str, step: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pos_N, eps_KD) of the epoch (step None) or of one step: pos_N[e] is e's row in eps_KD, or
        -1 when e is not noised. Drawn over all N entity ids, so a row's noise depends on its entity
        id only (not on which rows, or which process, the call has)."""
        mean, std = self.stats(name)
        cached = self._drawn.get(name)
        if cached is not None and cached[0] == mean.device and cached[1] == step:
            return cached[2], cached[3]
        if self.num_entities is None:
            raise ConfigError("table GMNM draws need GaussModalityNoise(num_entities=...)")
        noise_ratio, _ = self.ratios(name)
        gen = self._generator(mean.device, name, step=step)
        mask_N = torch.rand(self.num_entities, generator=gen, device=mean.device) < noise_ratio
        pos_N = torch.where(mask_N, torch.cumsum(mask_N, 0) - 1, -1)
        k = int(mask_N.sum())
        eps_KD = mean + std * torch.randn(k, mean.shape[0], generator=gen, device=mean.device)
        self._drawn[name] = (mean.device, step, pos_N, eps_KD)
        return pos_N, eps_KD

    def _next_step(self, name: str) -> int | None:
        """The step of this call (step mode: the counter moves on; epoch mode: None)."""
        if self.cfg.resample != "step":
            return None
        step, self._step = self._step, self._step + 1  # one counter over all modalities
        self._last_step[name] = step
        return step

    def _call_step(self, name: str) -> int | None:
        """The step of the last call for `name` (step mode), None in epoch mode."""
        if self.cfg.resample != "step":
            return None
        if name not in self._last_step:
            raise KeyError(f"no step-mode noise call for modality '{name}' yet")
        return self._last_step[name]

    def _key(self, part: str, name: str, step: int | None) -> int:
        """The 63-bit key of a keyed draw, part "mask" or "eps" (step None: the epoch's draw)."""
        return draw_seed("keyed", part, self._seed, self._epoch, step, name)

    def _keyed_mask(self, name: str, ids_B: torch.Tensor, step: int | None) -> torch.Tensor:
        noise_ratio, _ = self.ratios(name)
        return keyed_below(self._key("mask", name, step), ids_B, noise_ratio)

    def _keyed_eps(self, name: str, ids_K: torch.Tensor, step: int | None) -> torch.Tensor:
        """(K, D) eps = mean + std * Z on ids_K's device: only for the rows that are noised."""
        mean, std = self.stats(name)
        z_KD = keyed_normal(self._key("eps", name, step), ids_K, mean.shape[0])
        return torch.addcmul(mean.to(ids_K.device), std.to(ids_K.device), z_KD)

    def entity_mask(self, name: str) -> torch.Tensor:
        """(N,) bool: the entities noised in modality `name` (table draws; epoch mode: this epoch's,
        step mode: the last call's)."""
        if self.keyed:
            raise ConfigError("keyed GMNM draws keep no per-entity table; use mask_of(name, entity_ids)")
        self.stats(name)
        return self._table_draw(name, self._call_step(name))[0] >= 0

    def mask_of(self, name: str, entity_ids_B: torch.Tensor) -> torch.Tensor:
        """(B,) bool: whether the draw noises these entities (epoch mode: this epoch's; step mode: the
        last call's for `name`). Independent of train/eval; nothing N-sized when keyed."""
        self.stats(name)  # a known modality
        if not self.keyed:
            mask_N = self.entity_mask(name)
            return mask_N[entity_ids_B.to(mask_N.device)].to(entity_ids_B.device)
        return self._keyed_mask(name, entity_ids_B, self._call_step(name))

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
        step = self._next_step(name)
        if self.keyed:
            return self._keyed_forward(name, x_BD, entity_ids_B, mask_ratio, step)
        pos_N, eps_KD = self._table_draw(name, step)
        pos_B = pos_N.to(x_BD.device)[entity_ids_B.to(x_BD.device)]
        mask_B = pos_B >= 0
        self._last[name] = mask_B
        if eps_KD.shape[0] == 0:  # nobody drawn (tiny N or ratio)
            return x_BD
        rows_K = mask_B.nonzero().squeeze(1)
        return mix_rows(x_BD, rows_K, eps_KD.to(x_BD.device)[pos_B.index_select(0, rows_K)], mask_ratio)

    def _keyed_forward(
        self, name: str, x_BD: torch.Tensor, entity_ids_B: torch.Tensor, mask_ratio: float, step: int | None
    ) -> torch.Tensor:
        """Keyed GMNM: the mask from the ids, eps only for the noised rows (O(K x D) draws)."""
        ids_B = entity_ids_B.to(device=x_BD.device, dtype=torch.long)
        mask_B = self._keyed_mask(name, ids_B, step)
        self._last[name] = mask_B
        rows_K = mask_B.nonzero().squeeze(1)
        if rows_K.shape[0] == 0:
            return x_BD
        return mix_rows(x_BD, rows_K, self._keyed_eps(name, ids_B.index_select(0, rows_K), step), mask_ratio)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"enabled={c.enabled}, noise_ratio={c.noise_ratio}, mask_ratio={c.mask_ratio}, "
            f"structure_scale={c.structure_scale}, resample={c.resample}, "
            f"draws={'keyed' if self.keyed else 'table'}, modalities={self.names}"
        )
