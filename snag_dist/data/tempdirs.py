"""Temp folders written beside an output and renamed into place, and the ones killed runs left.

A writer (``prepare``, ``synth``, the feature/graph store builds) fills ``.NAME.tmp-HOST-PID``
next to ``NAME`` and renames it at the end; an error removes it, but SIGKILL or a power cut leaves
it behind. ``remove_stale`` deletes those whose writer is gone: same host and a PID that is no
longer alive. Folders of other hosts (a shared file system) are never judged; names of older
versions (``.NAME.tmp-PID``, no host) are taken as this host's.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from snag_dist.errors import DataError


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """This process's temp folder for ``target``: ``.NAME.KIND-HOST-PID`` beside it."""
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}"


def _owner(folder: Path, prefix: str) -> tuple[str, int] | None:
    """(host, pid) from a temp folder name; host '' for names without one."""
    rest = folder.name[len(prefix):]
    host, _, pid = rest.rpartition("-")
    return (host, int(pid)) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we can judge: keep the folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(target: Path, kinds: tuple[str, ...] = ("tmp",)) -> list[Path]:
    """Remove ``.NAME.KIND-*`` folders beside ``target`` whose writer (same host) is dead; return them."""
    here, removed = _host(), []
    if not target.parent.is_dir():
        return removed
    for kind in kinds:
        prefix = f".{target.name}.{kind}-"
        for folder in sorted(target.parent.iterdir()):
            if not folder.name.startswith(prefix) or not folder.is_dir():
                continue
            owner = _owner(folder, prefix)
            if owner is None or (owner[0] and owner[0] != here) or pid_alive(owner[1]):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


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
