"""Load a Config from YAML (a file or a shipped preset) plus dotted ``key=value`` overrides.

Errors are one line and name the key: unknown keys get the closest valid key as a hint,
wrong types / out-of-range values name the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from snag_dist.config.schema import Config
from snag_dist.errors import ConfigError
from snag_dist.fsio import atomic_open

PRESET_PACKAGE = "snag_dist.config.presets"


def preset_names() -> list[str]:
    files = resources.files(PRESET_PACKAGE).iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {source}")
        text = path.read_text()
    elif source in preset_names():
        text = resources.files(PRESET_PACKAGE).joinpath(f"{source}.yaml").read_text()
    else:
        hint = difflib.get_close_matches(source, preset_names(), n=1)
        extra = f" (did you mean preset '{hint[0]}'?)" if hint else f" (presets: {', '.join(preset_names())})"
        raise ConfigError(f"config '{source}' is neither a file nor a preset{extra}")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {source}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        return deep_merge(_read_yaml(str(base)), data)
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class DottedKeyConflict(ConfigError):
    """A dotted key runs through a part that already holds a value that is not a mapping."""

    def __init__(self, key: str, part: str) -> None:
        super().__init__(f"'{key}' conflicts with another value of '{part}'")
        self.key, self.part = key, part


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``key`` 'a.b.c', creating the mappings on the way (a later key
    overwrites an earlier one's value, and a mapping). ``DottedKeyConflict`` when a part on the way
    already holds a non-mapping ('a=1' then 'a.b=2')."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DottedKeyConflict(key, part)
    node[parts[-1]] = value


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"noise.noise_ratio": 0.3}`` -> ``{"noise": {"noise_ratio": 0.3}}`` (``set_dotted`` in order)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        set_dotted(tree, key, value)
    return tree


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.modalities=[structure,name]"]`` -> nested dict."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        try:
            set_dotted(tree, key.strip(), value)
        except DottedKeyConflict as exc:
            raise ConfigError(f"override '{item}' conflicts with another override of '{exc.part}'") from None
    return tree


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    return None


def check_keys(data: dict[str, Any], cls: type, prefix: str = "") -> None:
    """Reject unknown keys anywhere in the tree, naming the closest valid one."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        sub = _dataclass_of(hints[key])
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' must be a mapping, got {value!r}")
            check_keys(value, sub, prefix=f"{dotted}.")
        else:
            _refuse_bool_number(dotted, hints[key], value)


def _base(tp: Any) -> Any:
    """``Annotated[int, Field(ge=1)]`` -> int."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _refuse_bool_number(key: str, tp: Any, value: Any) -> None:
    """YAML ``true`` is not a number: pydantic would take it as 1 (``train.epochs=true`` -> 1 epoch)."""
    tp = _base(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (int, float) and isinstance(value, bool):
        want = "an integer" if tp is int else "a number"
        raise ConfigError(f"config key '{key}': bad value {value!r}: want {want}, not a boolean")
    if origin is list and args and isinstance(value, list):
        for item in value:
            _refuse_bool_number(key, args[0], item)
    elif origin is dict and len(args) == 2 and isinstance(value, dict):
        for name, item in value.items():
            sub = _dataclass_of(_base(args[1]))
            if sub is not None and isinstance(item, dict):
                check_keys(item, sub, prefix=f"{key}.{name}.")
            else:
                _refuse_bool_number(f"{key}.{name}", args[1], item)


def build(data: dict[str, Any]) -> Config:
    check_keys(data, Config)
    try:
        cfg = Config(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        raise ConfigError(f"config key '{loc}': bad value {value!r}: {err['msg']}") from None
    except TypeError as exc:
        raise ConfigError(f"config: {exc}") from None
    check_consistency(cfg)
    return cfg


def check_consistency(cfg: Config) -> None:
    """Keys that would silently do nothing, or mislead, given the others: one line each."""
    e = cfg.engine
    if e.backend != "deepspeed":
        for key, value, default in (("zero_stage", e.zero_stage, 0), ("ds_config", e.ds_config, "")):
            if value != default:
                raise ConfigError(f"engine.{key}={value!r} applies to engine.backend=deepspeed; this config uses "
                                  f"engine.backend={e.backend} (set engine.backend=deepspeed, or drop engine.{key})")
    if e.backend != "accelerate" and e.fsdp:
        raise ConfigError(f"engine.fsdp=true applies to engine.backend=accelerate; this config uses "
                          f"engine.backend={e.backend} (DeepSpeed shards with engine.zero_stage)")
    if cfg.eval.split == "test":
        raise ConfigError("eval.split=test would select epochs on the test split, which then no longer measures "
                          "held-out quality; select on valid (eval.test_at_end tests the best weights once)")


def load_config(source: str | None = None, overrides: list[str] | None = None) -> Config:
    data = _read_yaml(source) if source else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return build(data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def replace(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A new Config with nested ``overrides`` applied (and validated)."""
    return build(deep_merge(to_dict(cfg), overrides))


def save_config(cfg: Config, path: str | Path) -> None:
    """Atomic write of the resolved config (a YAML that `snag-dist train --config` takes unchanged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
