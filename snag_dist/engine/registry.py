"""Backend name -> builder ``(EngineConfig, TrainConfig) -> Backend``: the one list of backends.

A builder imports its backend when called, so the names are known without loading Accelerate or
DeepSpeed (or torch): the config schema checks ``engine.backend`` against ``BACKENDS`` and names the
registered backends in its error, and ``snag-dist prepare`` never loads a backend."""

from __future__ import annotations

from snag_dist.registry import Registry

BACKENDS: Registry = Registry("backend")


@BACKENDS.register("accelerate")
def _accelerate(cfg, train):
    from snag_dist.engine.accelerate_backend import AccelerateBackend

    return AccelerateBackend(cfg, train)


@BACKENDS.register("deepspeed")
def _deepspeed(cfg, train):
    from snag_dist.engine.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(cfg, train)
