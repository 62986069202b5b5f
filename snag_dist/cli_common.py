"""Conventions every verb shares: what a verb writes goes to ``--out``, inputs are positional.

Older spellings of an output (a positional folder, ``--json``, ``--out-json``) are still accepted:
they print one deprecation line on stderr. Giving an old and the new spelling is an error, and so is
giving neither where the verb has to write something.
"""

from __future__ import annotations

import argparse
import sys

from snag_dist.errors import ConfigError

LEGACY_OUT = "legacy_out"  # dest of an output's deprecated spelling


def deprecated(verb: str, old: str, new: str) -> None:
    """The one stderr line a deprecated spelling costs."""
    print(f"snag-dist {verb}: deprecated: {old}; use {new}", file=sys.stderr)


def add_out(parser: argparse.ArgumentParser, help: str, *, metavar: str = "DIR", required: bool = True,
            default: str | None = None, legacy_positional: bool = False, legacy_option: str = "") -> None:
    """``--out METAVAR``: where the verb writes. The verb's old spelling is accepted with a deprecation
    line (``resolve_out``): ``legacy_option`` (an option name), or ``legacy_positional``, one positional
    after the verb's own (``take_positional_out``: not an argparse argument, whose optional positional
    would swallow nothing before the first option and refuse the path after it).
    ``required``: without ``default``, leaving the output out is a one-line error."""
    note = f"; default: {default}" if default is not None else "; required" if required else ""
    if legacy_positional:
        note += f" (the old trailing positional {metavar} is deprecated)"
    parser.add_argument("--out", metavar=metavar, help=help + note)
    if legacy_option:
        parser.add_argument(legacy_option, dest=LEGACY_OUT, metavar=metavar, help="deprecated: the old name of --out")
    parser.set_defaults(out_spec=(metavar, required, default, "positional" if legacy_positional else legacy_option))


def take_positional_out(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The arguments argparse left over, less a verb's old positional output (one path, kept in ``args``)."""
    spec = getattr(args, "out_spec", None)
    if spec and spec[3] == "positional" and len(extra) == 1 and not extra[0].startswith("-"):
        setattr(args, LEGACY_OUT, extra[0])
        return []
    return extra


def resolve_out(args: argparse.Namespace) -> None:
    """Set ``args.out`` from ``--out``, the deprecated spelling or the default (a verb made with ``add_out``);
    both spellings, or no output where one is required, are one-line ConfigErrors."""
    if not hasattr(args, "out_spec"):
        return
    metavar, required, default, legacy_name = args.out_spec
    legacy = getattr(args, LEGACY_OUT, None)
    if legacy is not None:
        old = f"the output as a positional argument ({legacy})" if legacy_name == "positional" \
            else f"{legacy_name} {legacy}"
        if args.out is not None:
            raise ConfigError(f"--out {args.out} and {old} both name the output: give --out only")
        deprecated(args.verb, old, f"--out {legacy}")
        args.out = legacy
    if args.out is None:
        args.out = default
    if args.out is None and required:
        raise ConfigError(f"nothing says where to write: pass --out {metavar}")
