"""Typed config tree, YAML presets and dotted overrides."""

from snag_dist.config.load import load_config, nest_dotted, preset_names, replace, save_config, to_dict
from snag_dist.config.schema import (
    AlignmentConfig,
    CompletionConfig,
    Config,
    DataConfig,
    EngineConfig,
    EvalConfig,
    ModelConfig,
    NoiseConfig,
    TaskConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "AlignmentConfig", "CompletionConfig", "Config", "DataConfig", "EngineConfig", "EvalConfig",
    "ModelConfig", "NoiseConfig", "TaskConfig", "TrainConfig", "TuneConfig",
    "load_config", "nest_dotted", "preset_names", "replace", "save_config", "to_dict",
]
