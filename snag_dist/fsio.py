"""Files and folders written beside their target and renamed into place (never seen half-written).

Every writer here fills a temp sibling ``.NAME.tmp-HOST-PID`` of ``NAME`` (same directory, so the same
file system and an atomic rename) and renames it over ``NAME`` at the end; an error removes it, so a
reader finds the old version or the new one, never a partial one. SIGKILL or a power cut can leave a
temp folder behind: ``remove_stale`` deletes those whose writer is gone (same host, a PID that is no
longer alive). Folders of other hosts (a shared file system) are never judged; names of older versions
(``.NAME.tmp-PID``, no host) are taken as this host's.

* files: ``atomic_path`` (a temp path to write, renamed on success), ``atomic_open`` (a file handle),
  ``atomic_write_bytes`` / ``atomic_write_text`` / ``atomic_write_json``;
* folders: ``atomic_dir`` (a fresh temp folder to fill, renamed on success) and ``install_dir`` (rename
  a complete folder over another: the old one is renamed aside first and deleted last).

The temp name holds the process id, not a random part: one process writes a given target at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def temp_path(target: str | Path, kind: str = "tmp") -> Path:
    """This process's temp sibling of ``target``: ``.NAME.KIND-HOST-PID`` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}"


# -- files -----------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for the caller to write (e.g. ``fig.savefig(tmp)``); on success it
    is renamed to ``path``, on an error it is removed and ``path`` keeps its old content (if any)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` on a temp file that replaces ``path`` once closed without error."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, **dumps: Any) -> Path:
    """``json.dumps(data, **dumps)`` written atomically (e.g. ``indent=1``)."""
    return atomic_write_text(path, json.dumps(data, **dumps))


# -- folders ---------------------------------------------------------------------------------------
def install_dir(tmp: str | Path, final: str | Path, aside: str | Path | None = None) -> None:
    """Rename the complete folder ``tmp`` to ``final``. An existing ``final`` is renamed to ``aside``
    (default ``temp_path(final, "old")``) first and deleted last, so at every instant either ``final``
    or its aside copy is whole: a kill between the two renames leaves the old version under ``aside``."""
    tmp, final = Path(tmp), Path(final)
    old = Path(aside) if aside is not None else temp_path(final, "old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True)


@contextmanager
def atomic_dir(target: str | Path, *, replace_existing: bool = True,
               mkdir: Callable[[Path], None] = _mkdir) -> Iterator[Path]:
    """Yield a fresh, empty temp folder beside ``target`` (``temp_path(target)``, created by ``mkdir``)
    to fill; on success it becomes ``target``, on an error (or a failed rename) it is removed.

    An existing ``target`` is replaced whole (``install_dir``); with ``replace_existing=False`` it may
    only be an empty folder (the caller checked it is): it is removed first, and a folder someone filled
    in the meantime makes the rename fail (OSError) instead of being replaced.
    """
    target = Path(target)
    tmp = temp_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    mkdir(tmp)
    try:
        yield tmp
        if replace_existing:
            install_dir(tmp, target)
        else:
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- what killed writers left ----------------------------------------------------------------------
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


def remove_stale(target: str | Path, kinds: tuple[str, ...] = ("tmp",)) -> list[Path]:
    """Remove ``.NAME.KIND-*`` folders beside ``target`` whose writer (same host) is dead; return them."""
    target = Path(target)
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
