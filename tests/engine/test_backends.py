"""Backend configuration and precision paths in one process: ds_config checks, bf16 autocast, fp16 on CPU."""

from __future__ import annotations

import json
import math

import pytest

from snag_dist.config import EngineConfig, TrainConfig, load_config
from snag_dist.engine.deepspeed_backend import build_ds_config
from snag_dist.engine.run import train
from snag_dist.errors import BackendError, ConfigError
from tests.distributed.launch import ROOT, losses
from tests.tasks.test_alignment_task import sample_shards  # noqa: F401  (module-scoped fixture)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_ds_configs_build(stage):
    path = ROOT / "launchers" / "deepspeed" / f"zero{stage}.json"
    cfg = build_ds_config(EngineConfig(backend="deepspeed", ds_config=str(path)), TrainConfig(grad_accum=2), 4, cpu=True)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["train_batch_size"] == 8 and cfg["gradient_clipping"] == 1.0


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("{ not json", "invalid JSON at line 1"),
    ("[1, 2]", "want a JSON object"),
    ('{"gradient_accumulation_steps": 4}', "gradient_accumulation_steps=4 disagrees with train.grad_accum=1"),
    ('{"zero_optimization": {"stage": 2}}', "stage=2 disagrees with engine.zero_stage=3"),
    ('{"zero_optimization": {"stage": 7}}', None),
    ('{"optimizer": {"type": "Adam"}}', "leave 'optimizer'/'scheduler' out"),
    ('{"bf16": {"enabled": true}}', "set engine.precision instead"),
])
def test_bad_ds_config_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    stage = 0 if content and '"stage": 7' in content else 3
    with pytest.raises(ConfigError, match=match or "stage=7; want 0, 1, 2 or 3") as info:
        build_ds_config(EngineConfig(backend="deepspeed", ds_config=str(path), zero_stage=stage), TrainConfig(), 1, True)
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_fp16_on_cpu_is_refused():
    with pytest.raises(BackendError, match="fp16 needs a GPU"):
        build_ds_config(EngineConfig(backend="deepspeed", precision="fp16"), TrainConfig(), 1, cpu=True)


def test_bf16_autocast_path_trains_close_to_fp32(sample_shards, tmp_path):  # noqa: F811
    over = [f"data.shards={sample_shards}", "model.modalities=[structure,relation]", "model.hidden=32",
            "train.epochs=2", "train.eval_every=2", "train.batch_size=200"]
    train(load_config("quickstart", over), tmp_path / "fp32", progress=False)
    train(load_config("quickstart", [*over, "engine.precision=bf16"]), tmp_path / "bf16", progress=False)
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert all(math.isfinite(x) for x in b)
    assert a != b  # bf16 matmuls really ran
    assert all(math.isclose(x, y, rel_tol=0.05) for x, y in zip(a, b)), (a, b)
    best = {p: json.loads((tmp_path / p / "summary.json").read_text())["best_valid"] for p in ("fp32", "bf16")}
    assert best["bf16"] > 0.1 and abs(best["bf16"] - best["fp32"]) < 0.1, best  # chance is ~1/60
