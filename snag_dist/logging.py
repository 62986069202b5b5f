"""Run metrics: JSONL files people can grep and TensorBoard scalars they can watch (rank 0 only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from snag_dist.fsio import atomic_write_text

LOGS = ("metrics.jsonl", "train.jsonl")  # what MetricsLogger appends to


class MetricsLogger:
    """``metrics.jsonl`` (one object per evaluation), ``train.jsonl`` (one per epoch), ``tb/``."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume: bool = False) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                for name in LOGS:
                    (run_dir / name).unlink(missing_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def _write(self, name: str, record: dict[str, Any], prefix: str) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / name, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = int(record.get("epoch", 0))
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        self._tb.flush()

    def rewind(self, epoch: int) -> None:
        """Resuming before ``epoch``: drop records a killed run wrote after its last checkpoint."""
        if not self.enabled:
            return
        for name in LOGS:
            trim_jsonl(self.run_dir / name, epoch)

    def train(self, record: dict[str, Any]) -> None:
        self._write("train.jsonl", record, "train")

    def eval(self, record: dict[str, Any]) -> None:
        self._write("metrics.jsonl", record, "eval")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trim_jsonl(path: Path, epochs: int) -> int:
    """Resuming before epoch ``epochs``: keep exactly the records of ``path`` whose ``epoch`` (0 when
    absent) is below it, as they were written, and drop blank lines; the file is rewritten atomically.
    A missing file stays missing. Returns the records kept."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if int(json.loads(line).get("epoch", 0)) < epochs]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(kept)
