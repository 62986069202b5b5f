"""Accelerate backend: DDP (or FSDP) across processes/GPUs/nodes, bf16/fp16 mixed precision."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from snag_dist.config import EngineConfig, TrainConfig
from snag_dist.engine.backend import ReplicatedState
from snag_dist.errors import BackendError


class AccelerateBackend(ReplicatedState):
    def __init__(self, cfg: EngineConfig, train: TrainConfig) -> None:
        use_cpu = cfg.cpu or not torch.cuda.is_available()
        if cfg.precision == "fp16" and use_cpu:
            raise BackendError("engine.precision=fp16 needs a GPU (loss scaling); use bf16 or fp32 on CPU")
        plugin = None
        if cfg.fsdp:
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin()
        # Some parameters (e.g. a dropped loss term's weights) may get no gradient in a step.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        # Accelerate keeps one process-wide state; a process may train several runs (tests, Ray Tune
        # trials), each with its own precision, so start from a clean one (the process group stays).
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        # Accumulation is the loop's (it scales the loss and calls step at boundaries), not Accelerate's.
        self.acc = Accelerator(cpu=use_cpu, mixed_precision="no" if cfg.precision == "fp32" else cfg.precision,
                               kwargs_handlers=[ddp], fsdp_plugin=plugin)
        self.fsdp = cfg.fsdp
        self.device = self.acc.device
        self.rank = self.acc.process_index
        self.world_size = self.acc.num_processes

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def setup(self, module: nn.Module, optimizer, scheduler):
        # The scheduler stays ours: Accelerate would step it once per process per step.
        module, optimizer = self.acc.prepare(module, optimizer)
        return module, optimizer, scheduler

    def autocast(self):
        return self.acc.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def step(self, optimizer, scheduler, max_norm: float, boundary: bool = True) -> float:
        if not boundary:
            return 0.0
        norm = 0.0
        if max_norm > 0:
            norm = float(self.acc.clip_grad_norm_(self.acc._models[0].parameters(), max_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def full_params(self, module: nn.Module, modify: bool = False):
        """FSDP keeps only this rank's shard between forwards: evaluation, checkpoints and the task's
        epoch hooks see whole parameters inside (``modify``: changes are written back to the shards)."""
        if not self.fsdp:
            return super().full_params(module, modify)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(module, writeback=modify)

    def scaler_state(self, optimizer) -> dict:
        scaler = self.acc.scaler  # a GradScaler with fp16 on GPU, else None
        if scaler is None:
            return {}
        return {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}

    def load_scaler_state(self, optimizer, state: dict) -> None:
        if state and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.acc.unwrap_model(module)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(tensor)

    def reduce_mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.acc.reduce(t, reduction="mean"))

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def close(self) -> None:
        self.acc.end_training()
