"""What may differ between a run's stored config and the one a resume or an ``eval --set`` asks for.

Every config key falls in one class (first matching pattern of ``RULES``):

- ``shape``: the model's parameters, tables or checkpoint layout (``model.*``, ``task.name``, the
  RotatE head's size, ``data.shards`` / ``data.mode``): refused on resume and at ``eval``.
- ``training``: how the run trains (lr and schedule, batches, seed, objective, noise, backend,
  ``eval.split`` that selects the best epoch): refused on resume (the checkpoint's optimizer,
  schedule and data position belong to the stored values), free at ``eval``.
- ``extend``: ``train.epochs``: a resume may raise it while the run is unfinished (the lr schedule
  stretches to the new end); applied and recorded.
- ``free``: evaluation, cadence and bookkeeping (``eval.*``, ``train.eval_every``, ``patience``,
  ``checkpoint_every*``, ``keep_last``, ``tune.*``, ``name``...): applied and recorded on resume.

A refusal is one line naming the key, the stored and the requested value.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from pathlib import Path
from typing import Any

from snag_dist.errors import ConfigError

SHAPE, TRAINING, EXTEND, FREE = "shape", "training", "extend", "free"

# (pattern, class); first match wins, unmatched keys are TRAINING (refused on resume: the safe side).
RULES: tuple[tuple[str, str], ...] = (
    ("model.*", SHAPE),
    ("task.name", SHAPE),
    ("task.completion.dim", SHAPE),
    ("task.completion.entity_residual", SHAPE),
    ("task.completion.projection_layers", SHAPE),
    ("task.completion.readout", SHAPE),
    ("data.shards", SHAPE),
    ("data.mode", SHAPE),
    ("data.full_max_gib", SHAPE),  # decides data.mode=auto
    ("data.store_dir", FREE),
    ("task.alignment.csls_k", FREE),  # evaluation only
    ("train.epochs", EXTEND),
    ("train.eval_every", FREE),
    ("train.patience", FREE),
    ("train.checkpoint_every", FREE),
    ("train.checkpoint_every_steps", FREE),
    ("train.keep_last", FREE),
    ("engine.keep_freed_memory", FREE),
    ("eval.split", TRAINING),  # the stored best value was measured on the stored split
    ("eval.*", FREE),
    ("tune.*", FREE),
    ("name", FREE),
)

REASONS = {
    SHAPE: "it changes the model's parameters, tables or checkpoint layout",
    TRAINING: "the checkpoint's optimizer, lr schedule and data position belong to the stored value",
    EXTEND: "a resume may only raise train.epochs of an unfinished run",
}


def key_class(key: str) -> str:
    return next((cls for pattern, cls in RULES if fnmatch.fnmatchcase(key, pattern)), TRAINING)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value over the dataclass fields (dict- and list-valued fields are leaves)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def show(value: Any) -> str:
    """A value as it would be written after ``--set key=`` (JSON for numbers, lists, mappings)."""
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value, default=str)


def _same_shards(a: str, b: str) -> bool:
    """Two data.shards values name the same data: the same folder, or a copy with the same manifest."""
    if a == b or os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return (Path(a) / "manifest.json").read_bytes() == (Path(b) / "manifest.json").read_bytes()
    except OSError:
        return False


def differences(stored: Any, requested: Any) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, requested value)`` for every key that differs, in config order."""
    a, b = flatten(stored), flatten(requested)
    out = []
    for key, value in a.items():
        if b.get(key) == value:
            continue
        if key == "data.shards" and _same_shards(str(value), str(b.get(key))):
            continue
        out.append((key, value, b.get(key)))
    return out


def refusal(context: str, key: str, stored: Any, requested: Any, reason: str, hint: str, more: int = 0) -> ConfigError:
    extra = f" (and {more} more changed key{'s' if more > 1 else ''})" if more else ""
    return ConfigError(f"{context}: config key '{key}' differs from the run's: stored {show(stored)}, "
                       f"requested {show(requested)} ({reason}){extra}; {hint}")


RESUME_HINT = ("resume with the run's values (its config.yaml), or train a new run "
               "(another --out, or --overwrite)")
EVAL_HINT = "eval may change eval.*, data.store_dir and other keys that leave the model as trained"


def check_eval(stored: Any, requested: Any) -> None:
    """``eval --set``: refuse any key that changes what the checkpoint's tensors mean or their shapes."""
    bad = [d for d in differences(stored, requested) if key_class(d[0]) == SHAPE]
    if bad:
        key, a, b = bad[0]
        raise refusal("eval --set", key, a, b, REASONS[SHAPE], EVAL_HINT, len(bad) - 1)


def check_resume(stored: Any, requested: Any) -> list[tuple[str, Any, Any]]:
    """The changes a resume applies (free keys and ``train.epochs``); raises on a refused key.
    Whether a ``train.epochs`` change extends an unfinished run is the caller's check (it needs the
    task's phases and the checkpoint)."""
    diffs = differences(stored, requested)
    bad = [d for d in diffs if key_class(d[0]) in (SHAPE, TRAINING)]
    if bad:
        key, a, b = bad[0]
        raise refusal("--resume auto", key, a, b, REASONS[key_class(key)], RESUME_HINT, len(bad) - 1)
    for key, a, b in diffs:
        if key_class(key) == EXTEND and b < a:
            raise refusal("--resume auto", key, a, b, "a resume can extend train.epochs, not shorten it", RESUME_HINT)
    return diffs
