"""Search spaces: a YAML of dotted config keys -> distributions, validated against the config schema.

```yaml
fixed:                                  # applied to every trial (optional)
  train.epochs: 30
params:                                 # searched
  noise.noise_ratio: {uniform: [0.0, 0.8]}
  train.lr: {loguniform: [1.0e-4, 3.0e-3]}
  model.hidden: {choice: [128, 256]}
```
Every key is a `--set` key of the config; every value a distribution can draw is checked against the
schema before Ray starts, so a typo or an out-of-range bound fails in one line naming file, key, value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from snag_dist.config import Config, nest_dotted, replace
from snag_dist.errors import ConfigError

# name -> (number of arguments or None for a list, what the arguments are)
DISTRIBUTIONS: dict[str, tuple[int | None, str]] = {
    "uniform": (2, "[low, high]"),
    "quniform": (3, "[low, high, q]"),
    "loguniform": (2, "[low, high] with 0 < low"),
    "randint": (2, "[low, high) integers"),
    "choice": (None, "[value, ...]"),
    "grid": (None, "[value, ...] (every value, times num_samples; random search only)"),
}


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key, e.g. noise.noise_ratio
    kind: str  # one of DISTRIBUTIONS
    args: tuple[Any, ...]

    def extremes(self) -> list[Any]:
        """Values a draw can take at its edges (all of them for choice/grid): what the schema must accept."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def to_ray(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


@dataclass(frozen=True)
class SearchSpace:
    path: str
    params: tuple[Param, ...]
    fixed: dict[str, Any]

    @property
    def has_grid(self) -> bool:
        return any(p.kind == "grid" for p in self.params)

    def to_ray(self) -> dict[str, Any]:
        """Ray Tune's param_space: flat dotted keys (the trial nests them back into the config)."""
        return {p.key: p.to_ray() for p in self.params}

    def keys(self) -> list[str]:
        return [p.key for p in self.params]


def apply(cfg: Config, fixed: dict[str, Any], params: dict[str, Any]) -> Config:
    """The config of one trial: ``cfg`` with the space's fixed values and the sampled ``params``."""
    flat = {**fixed, **params}
    return replace(cfg, nest_dotted(flat)) if flat else cfg


def _fail(path: str, msg: str) -> ConfigError:
    return ConfigError(f"search space {path}: {msg}")


# YAML 1.1 (PyYAML) reads ``1e-4`` (no dot) as a string; config YAML accepts it, so bounds do too.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(path: str, key: str, value: Any) -> float:
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        text = value.strip()
        value = int(text) if text.lstrip("+-").isdigit() else float(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, f"'{key}': bound {value!r} is not a number")
    return value


def parse_param(path: str, key: str, spec: Any) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(path, f"'{key}': want one distribution like {{uniform: [0.1, 0.5]}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise _fail(path, f"'{key}': unknown distribution '{kind}' (known: {', '.join(DISTRIBUTIONS)})")
    arity, shape = DISTRIBUTIONS[kind]
    if not isinstance(args, list) or (arity is not None and len(args) != arity) or not args:
        raise _fail(path, f"'{key}': {kind} takes {shape}, got {args!r}")
    if arity is not None:
        args = [_number(path, key, a) for a in args]
        low, high = args[0], args[1]
        if not low < high:
            raise _fail(path, f"'{key}': {kind} needs low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise _fail(path, f"'{key}': loguniform needs 0 < low, got {low!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise _fail(path, f"'{key}': randint takes integers, got {args!r}")
    return Param(key, kind, tuple(args))


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise _fail(str(path), f"invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise _fail(str(path), f"top level must be a mapping with 'params', got {type(data).__name__}")
    unknown = sorted(set(data) - {"params", "fixed"})
    if unknown:
        raise _fail(str(path), f"unknown top-level key '{unknown[0]}' (known: params, fixed)")
    for section in ("params", "fixed"):
        if not isinstance(data.get(section) or {}, dict):
            raise _fail(str(path), f"'{section}' must be a mapping of dotted config keys")
    if not data.get("params"):
        raise _fail(str(path), "'params' is empty: nothing to search")
    return data


def load_space(path: str | Path) -> SearchSpace:
    """Parse and shape-check a search-space YAML (values are checked against a config by `validate`)."""
    path = Path(path)
    data = _read(path)
    params = tuple(parse_param(str(path), str(k), v) for k, v in data["params"].items())
    fixed = {str(k): v for k, v in (data.get("fixed") or {}).items()}
    both = sorted(set(fixed) & {p.key for p in params})
    if both:
        raise _fail(str(path), f"'{both[0]}' is both fixed and searched")
    return SearchSpace(str(path), params, fixed)


def validate(space: SearchSpace, cfg: Config, search: str = "random") -> None:
    """Every key exists and every edge value of every distribution is a valid config value."""
    if space.has_grid and search != "random":
        key = next(p.key for p in space.params if p.kind == "grid")
        raise _fail(space.path, f"'{key}': grid works with --search random only (use choice with {search})")
    try:
        apply(cfg, space.fixed, {})
    except ConfigError as exc:
        raise _fail(space.path, f"fixed: {exc}") from None
    modalities = apply(cfg, space.fixed, {}).model.modalities
    for key in [*space.fixed, *space.keys()]:
        parts = key.split(".")
        if parts[:2] == ["noise", "per_modality"] and len(parts) == 4 and parts[2] not in modalities:
            raise _fail(space.path, f"'{key}': modality '{parts[2]}' is not in model.modalities "
                                    f"{modalities} of this config")
    for param in space.params:
        for value in param.extremes():
            try:
                apply(cfg, space.fixed, {param.key: value})
            except ConfigError as exc:
                raise _fail(space.path, f"'{param.key}' value {value!r}: {exc}") from None
