"""DeepSpeed backend: ZeRO stages 0-3 from an editable ds_config JSON, bf16 autocast / fp16 loss scaling.

The loop stays ours: DeepSpeed gets the model and our AdamW (ZeRO partitions its state), its engine
does backward/all-reduce/clipping/step; our warm-up + cosine schedule drives the optimizer's lr.
We never use DeepSpeed's data loader, so its batch keys only have to agree with each other:
train_micro_batch_size_per_gpu = 1 "unit" (one rank's slice of a step), gradient_accumulation_steps =
train.grad_accum, train_batch_size = their product with the world size.

Checkpoints stay safetensors (no pickles, unlike DeepSpeed's own format): the whole model (gathered
under ZeRO-3) and, per rank, its ZeRO partition of the fp32 master weights plus the AdamW moments.
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snag_dist.config import EngineConfig, TrainConfig
from snag_dist.engine.checkpoint import load_rank_shard
from snag_dist.errors import BackendError, ConfigError


def load_ds_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"engine.ds_config: no such file {path}")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"engine.ds_config {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"engine.ds_config {path}: want a JSON object, got {type(cfg).__name__}")
    return cfg


def build_ds_config(engine: EngineConfig, train: TrainConfig, world_size: int, cpu: bool) -> dict[str, Any]:
    """The ds_config DeepSpeed gets: the user's file (if any) completed and checked against ours."""
    src = engine.ds_config or "engine"
    cfg = load_ds_config(engine.ds_config) if engine.ds_config else {}

    def agree(key: str, ours: Any, name: str) -> None:
        if key in cfg and cfg[key] not in ("auto", ours):
            raise ConfigError(f"{src}: {key}={cfg[key]!r} disagrees with {name}={ours!r} (drop it or make them equal)")
        cfg[key] = ours

    agree("gradient_accumulation_steps", train.grad_accum, "train.grad_accum")
    micro = cfg.get("train_micro_batch_size_per_gpu", 1)
    if micro == "auto":
        micro = 1
    cfg["train_micro_batch_size_per_gpu"] = micro
    agree("train_batch_size", micro * train.grad_accum * world_size, "micro x grad_accum x world size")
    agree("gradient_clipping", float(train.grad_clip), "train.grad_clip")
    zero = cfg.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{src}: zero_optimization must be an object")
    stage = zero.get("stage", engine.zero_stage)
    if engine.zero_stage and stage != engine.zero_stage:
        raise ConfigError(f"{src}: zero_optimization.stage={stage} disagrees with engine.zero_stage={engine.zero_stage}")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage={stage!r}; want 0, 1, 2 or 3")
    zero["stage"] = stage
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(f"{src}: leave 'optimizer'/'scheduler' out; train.lr, train.weight_decay and "
                          "train.warmup_ratio configure snag-dist's AdamW and schedule")
    half = [k for k in ("fp16", "bf16") if cfg.get(k, {}).get("enabled")]
    if engine.precision == "fp16":
        if cpu:
            raise BackendError("engine.precision=fp16 needs a GPU (loss scaling); use bf16 or fp32 on CPU")
        cfg["fp16"] = {"loss_scale": 0, "initial_scale_power": 16, **cfg.get("fp16", {}), "enabled": True}
    elif half:
        raise ConfigError(f"{src}: '{half[0]}' is enabled but engine.precision={engine.precision}; "
                          "set engine.precision instead (bf16 runs as autocast with fp32 master weights)")
    cfg.setdefault("steps_per_print", 1 << 30)  # the loop reports progress, not DeepSpeed
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def _single_process_env() -> None:
    """`python -m snag_dist train` without a launcher: a world of one on this host."""
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)


class DeepSpeedBackend:
    def __init__(self, cfg: EngineConfig, train: TrainConfig) -> None:
        cpu = cfg.cpu or not torch.cuda.is_available()
        if cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        _single_process_env()
        self.ds = deepspeed
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", auto_mpi_discovery=False)
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cpu:
            self.device = torch.device("cpu")
        else:
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        self.precision = cfg.precision
        self.ds_config = build_ds_config(cfg, train, self.world_size, cpu)
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.engine = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, module: nn.Module, optimizer, scheduler):
        if isinstance(module, self.ds.DeepSpeedEngine):
            module = module.module
        try:
            engine, ds_optimizer, _, _ = self.ds.initialize(model=module, optimizer=optimizer, config=self.ds_config)
        except (ValueError, AssertionError, KeyError, TypeError) as exc:
            raise BackendError(f"DeepSpeed rejected the configuration: {exc}".splitlines()[0]) from None
        self.engine = engine
        # The schedule sets lr on the param groups ZeRO steps with (the client optimizer's own dicts).
        return engine, ds_optimizer, scheduler

    def autocast(self) -> AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divided by grad_accum

    def step(self, optimizer, scheduler, max_norm: float, boundary: bool = True) -> float:
        self.engine.step()  # every micro-batch: DeepSpeed counts them and updates at its boundary
        if not boundary:
            return 0.0
        scheduler.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, self.ds.DeepSpeedEngine) else module

    # -- whole parameters / partitioned optimizer state ----------------------------------------
    def full_params(self, module: nn.Module, modify: bool = False) -> AbstractContextManager:
        if self.stage < 3:
            return nullcontext()
        params = list(self.unwrap(module).parameters())
        return self.ds.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def _inner(self, optimizer) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        """(torch optimizer ZeRO steps, this rank's fp32 master partitions)."""
        if self.stage == 0:
            return getattr(optimizer, "optimizer", optimizer), []
        masters = (optimizer.fp32_partitioned_groups_flat if self.stage == 3
                   else optimizer.single_partition_of_fp32_groups)
        return optimizer.optimizer, list(masters)

    def optimizer_shards(self, optimizer) -> dict[str, torch.Tensor]:
        """This rank's fp32 master partitions and the AdamW moments kept for them."""
        if self.stage == 0:
            return {}
        inner, masters = self._inner(optimizer)
        out = {}
        for i, master in enumerate(masters):
            out[f"master.{i}"] = master.detach()
            for key, value in inner.state.get(master, {}).items():
                out[f"state.{i}.{key}"] = value.detach() if torch.is_tensor(value) else torch.tensor(value)
        return out

    def load_optimizer_shards(self, optimizer, path) -> None:
        if self.stage == 0:
            return
        shard = load_rank_shard(Path(path), self.rank)
        inner, masters = self._inner(optimizer)
        with torch.no_grad():
            for i, master in enumerate(masters):
                saved = shard.get(f"master.{i}")
                if saved is None or saved.shape != master.shape:
                    raise BackendError(f"checkpoint {path}: ZeRO partition {i} of rank {self.rank} does not match "
                                       "this run (different world size, ZeRO stage or model?)")
                master.copy_(saved)
                prefix = f"state.{i}."
                slots = {k[len(prefix):]: v for k, v in shard.items() if k.startswith(prefix)}
                if slots:
                    inner.state[master] = {k: v.to(master.device) if v.dim() else v for k, v in slots.items()}
        # The model's weights were loaded (whole) before deepspeed.initialize partitioned them, so
        # they already equal these masters (in their own precision).

    # DeepSpeed's dynamic loss scaler (fp16): its scale and the iteration counters it grows it by.
    _SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

    def scaler_state(self, optimizer) -> dict:
        scaler = getattr(optimizer, "loss_scaler", None)
        if scaler is None or self.precision != "fp16":
            return {}
        return {k: float(getattr(scaler, k)) for k in self._SCALER_FIELDS if hasattr(scaler, k)}

    def load_scaler_state(self, optimizer, state: dict) -> None:
        scaler = getattr(optimizer, "loss_scaler", None)
        for key, value in (state or {}).items():
            if scaler is not None and hasattr(scaler, key):
                setattr(scaler, key, type(getattr(scaler, key))(value))

    # -- collectives ---------------------------------------------------------------------------
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def reduce_mean(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        self.engine = None
