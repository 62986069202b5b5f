"""Config tree: presets load, overrides apply, bad keys/values give one-line errors naming them."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from snag_dist.config import load_config, preset_names, save_config, to_dict
from snag_dist.errors import ConfigError


def test_every_preset_loads_and_round_trips(tmp_path):
    assert {"quickstart", "dbp15k_fr_en", "dbp15k_ja_en", "dbp15k_zh_en", "db15k", "mkg_w", "mkg_y"} <= set(
        preset_names())
    for name in preset_names():
        cfg = load_config(name)
        path = tmp_path / f"{name}.yaml"
        save_config(cfg, path)
        assert load_config(str(path)) == cfg


def test_paper_defaults():
    cfg = load_config("dbp15k_fr_en")
    assert (cfg.model.hidden, cfg.model.fusion_layers, cfg.model.fusion_heads, cfg.model.intermediate) == (
        300, 1, 1, 400)
    assert (cfg.noise.noise_ratio, cfg.noise.mask_ratio, cfg.noise.structure_scale) == (0.2, 0.7, 0.5)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.epochs) == (5e-4, 1e-3, 3500, 1000)
    assert cfg.task.alignment.tau == 0.1 and cfg.task.alignment.csls_k == 3
    c = load_config("db15k")
    assert (c.task.completion.margin, c.task.completion.negatives, c.train.batch_size, c.train.lr) == (
        12.0, 32, 1024, 1e-4)


def test_dotted_overrides_are_typed():
    cfg = load_config("quickstart", ["train.lr=1e-4", "model.modalities=[structure,name]",
                                     "noise.per_modality={name: {noise_ratio: 0.5, mask_ratio: 0.1}}"])
    assert cfg.train.lr == 1e-4
    assert cfg.model.modalities == ["structure", "name"]
    assert cfg.noise.per_modality["name"].noise_ratio == 0.5


@pytest.mark.parametrize("override, needles", [
    ("train.lrr=1", ["train.lrr", "did you mean 'train.lr'"]),
    ("noize.noise_ratio=0.1", ["noize", "did you mean 'noise'"]),
    ("train.lr=abc", ["train.lr", "'abc'"]),
    ("noise.noise_ratio=1.5", ["noise.noise_ratio", "1.5"]),
    ("engine.backend=horovod", ["engine.backend", "horovod"]),
    ("train.epochs=0", ["train.epochs", "0"]),
    ("trainlr", ["trainlr", "key=value"]),
])
def test_bad_override_errors(override, needles):
    with pytest.raises(ConfigError) as info:
        load_config("quickstart", [override])
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg


def test_engine_backend_is_checked_against_the_backend_registry():
    from snag_dist.engine.registry import BACKENDS

    with pytest.raises(ConfigError) as info:
        load_config("quickstart", ["engine.backend=horovod"])
    assert f"registered: {', '.join(BACKENDS.names())}" in str(info.value)
    for name in BACKENDS.names():
        assert load_config("quickstart", [f"engine.backend={name}"]).engine.backend == name


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": -3}}))
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="did you mean preset 'quickstart'"):
        load_config("quickstrat")


def test_config_is_frozen():
    cfg = load_config("quickstart")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    assert to_dict(cfg)["train"]["lr"] == cfg.train.lr


@pytest.mark.parametrize("overrides,match", [
    (["engine.zero_stage=2"], "engine.zero_stage=2 applies to engine.backend=deepspeed"),
    (["engine.ds_config=launchers/deepspeed/zero2.json"], "engine.ds_config=.* applies to engine.backend=deepspeed"),
    (["engine.backend=deepspeed", "engine.fsdp=true"], "engine.fsdp=true applies to engine.backend=accelerate"),
    (["eval.split=test"], "eval.split=test would select epochs on the test split"),
])
def test_keys_that_would_do_nothing_or_mislead_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("quickstart", overrides)
    load_config("quickstart", ["engine.backend=deepspeed", "engine.zero_stage=2"])  # where they apply: fine


def test_nest_dotted_and_its_conflicts():
    from snag_dist.config.load import DottedKeyConflict, nest_dotted, parse_overrides, set_dotted

    assert nest_dotted({"noise.noise_ratio": 0.3, "train.lr": 1e-4, "noise.per_modality.name.mask_ratio": 0.1,
                        "seed": 1}) == {"noise": {"noise_ratio": 0.3, "per_modality": {"name": {"mask_ratio": 0.1}}},
                                        "train": {"lr": 1e-4}, "seed": 1}
    assert nest_dotted({}) == {}
    tree = {"train": {"lr": 1.0}}
    set_dotted(tree, "train", 5)  # a later key replaces an earlier value, mappings included
    assert tree == {"train": 5}
    with pytest.raises(DottedKeyConflict, match="'train.lr' conflicts with another value of 'train'") as err:
        set_dotted(tree, "train.lr", 2)
    assert isinstance(err.value, ConfigError) and err.value.part == "train"
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d="]) == {"a": {"b": 1, "c": ["x", "y"]}, "d": ""}
    with pytest.raises(ConfigError, match="override 'train.lr.x=1' conflicts with another override of 'lr'"):
        parse_overrides(["train.lr=1", "train.lr.x=1"])
