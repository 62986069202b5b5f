"""Output folders of the data commands (``prepare``, ``synth``): checks with one-line errors.

The folders are written as temp siblings renamed into place, and temp folders that killed runs left
are removed, by ``snag_dist.fsio`` (``atomic_dir``, ``remove_stale``; ``temp_path``, ``remove_stale``
and ``pid_alive`` stay importable from here).
"""

from __future__ import annotations

from pathlib import Path

from snag_dist.errors import DataError
from snag_dist.fsio import pid_alive, remove_stale, temp_path

__all__ = ["check_output", "describe_removed", "make_dir", "pid_alive", "remove_stale", "temp_path"]


def describe_removed(folders: list[Path]) -> str:
    n = len(folders)
    names = ", ".join(f.name for f in folders)
    return f"removed {n} stale temp folder{'s' if n != 1 else ''} left by killed runs: {names}"


def check_output(out: Path, overwrite: bool, what: str = "output", flag: str = "--overwrite") -> None:
    """``out`` may be created (or, with ``overwrite``, replaced): a one-line error otherwise."""
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == out else f"lies under {parent}, which is"
            raise DataError(f"{what} {out} {where} a file, not a directory")
        if parent.is_dir():
            break
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        hint = f" (use {flag})" if flag else ""
        raise DataError(f"{what} directory {out} exists and is not empty{hint}")


def make_dir(path: Path, parents: bool = False) -> None:
    """mkdir whose failure (permissions, a file in the way, a full disk) is a one-line error."""
    try:
        path.mkdir(parents=parents, exist_ok=parents)
    except OSError as exc:
        raise DataError(f"cannot create {path}: {exc.strerror or exc}") from None
