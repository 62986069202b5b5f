"""Helpers to launch `snag-dist train` under torchrun with real processes (gloo) from tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], extra: list[str] | None = None, script: str = "") -> list[str]:
    """torchrun running ``snag_dist`` (or ``script``) with ``args``; ``extra`` are torchrun options."""
    target = [script] if script else ["-m", "snag_dist"]
    rdzv = extra if extra and any(e.startswith("--rdzv") for e in extra) else [
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *(extra or [])]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *rdzv, *target, *args]


def train_args(config: str, sets: list[str], shards: Path, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """``snag-dist train`` arguments: ``config`` with every ``--set`` of ``sets``, the shards and ``extra``."""
    pairs = [a for kv in [*sets, f"data.shards={shards}", *extra] for a in ("--set", kv)]
    return ["train", "--config", config, "--out", str(out), "--quiet", *pairs]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def kill_when(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL the whole process group (agent + workers) as soon as ``path`` exists."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            _kill_tree(proc)
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)
    _kill_tree(proc)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the agent and every worker at once (torchrun's workers get their own sessions)."""
    import psutil

    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train.jsonl").read_text().splitlines()]


def evals(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / tag / "model.safetensors"))
