"""The ``tune`` verb: Ray Tune search over a search-space YAML around a config (see tuning/README.md)."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

from snag_dist.cli_common import add_out, deprecated
from snag_dist.errors import ConfigError

DEFAULT_OUT = "runs/tune/search"


class _BareResume(str):
    """The value of a bare ``--resume`` (the old switch): the same as ``auto``, told apart by identity."""


BARE_RESUME = _BareResume("auto")


def _sources(args: argparse.Namespace, out: Path) -> tuple[str, str]:
    """--config/--space, or with --resume auto the copies an earlier run saved in the experiment folder."""
    config, space = args.config, args.space
    if args.resume == "auto":
        config = config or (str(out / "base.yaml") if (out / "base.yaml").is_file() else None)
        space = space or (str(out / "space.yaml") if (out / "space.yaml").is_file() else None)
    if not config or not space:
        missing = "--config" if not config else "--space"
        raise ConfigError(f"tune needs {missing} (it can be left out only with --resume auto of a search "
                          f"saved in --out)")
    return config, space


def _cmd_tune(args: argparse.Namespace) -> int:
    from snag_dist.config import load_config, save_config
    from snag_dist.tune import load_space, validate
    from snag_dist.tune.runner import absolute_paths, holds_search, run_search

    if args.resume is BARE_RESUME:
        deprecated("tune", "--resume without a value", "--resume auto")
    out = Path(args.out).expanduser().resolve()
    for folder in (out, *out.parents):  # --out (or a folder above it) that is a file
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"--out {args.out}: {folder} is a file, not a folder")
            break
    restore = holds_search(out)
    if restore and args.resume == "never":
        raise ConfigError(f"{out} already holds a search: pass --resume auto to continue it or choose another --out")
    config, space_path = _sources(args, out)
    overrides = list(args.set or [])
    for flag, key in (("num_samples", "num_samples"), ("search", "search"), ("scheduler", "scheduler"),
                      ("max_concurrent", "max_concurrent"), ("workers_per_trial", "workers_per_trial")):
        if getattr(args, flag) is not None:
            overrides.append(f"tune.{key}={getattr(args, flag)}")
    cfg = absolute_paths(load_config(config, overrides))
    space = load_space(space_path)
    validate(space, cfg, cfg.tune.search)
    if not restore:  # a fresh search: keep its sources next to it (a later --resume auto needs neither flag)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "base.yaml")
        if Path(space_path).resolve() != (out / "space.yaml"):
            shutil.copyfile(space_path, out / "space.yaml")
    run_search(cfg, space, out, resume=restore, verbose=0 if args.quiet else 1)
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="Ray Tune search (ASHA, random/Optuna) over a search-space YAML")
    p.add_argument("--space", help="search-space YAML, e.g. tuning/alignment.yaml")
    p.add_argument("--config", help="base config: YAML file or preset name (e.g. quickstart)")
    p.add_argument("--num-samples", dest="num_samples", type=int, help="trials (sets tune.num_samples)")
    p.add_argument("--search", choices=["random", "optuna"], help="search algorithm (sets tune.search)")
    p.add_argument("--scheduler", choices=["asha", "none"], help="trial scheduler (sets tune.scheduler)")
    p.add_argument("--max-concurrent", dest="max_concurrent", type=int, help="trials at once (tune.max_concurrent)")
    p.add_argument("--workers-per-trial", dest="workers_per_trial", type=int,
                   help="processes per trial; > 1 runs a Ray Train TorchTrainer (tune.workers_per_trial)")
    add_out(p, "experiment folder (Ray state, trials, results)", default=DEFAULT_OUT)
    p.add_argument("--resume", nargs="?", choices=["auto", "never"], const=BARE_RESUME, default="never",
                   help="auto: continue the interrupted search in --out (Tuner.restore; --config and --space "
                        "default to the copies it saved), a fresh search when --out holds none. never (default): "
                        "a fresh search, refused if --out already holds one. A bare --resume (deprecated) is auto")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override of the base config, e.g. train.epochs=20")
    p.add_argument("--quiet", action="store_true", help="no Ray progress tables")
    p.set_defaults(fn=_cmd_tune)


REGISTER: list[Callable] = [_add_tune]
