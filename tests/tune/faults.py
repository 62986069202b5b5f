"""Fault injection for the Ray Tune tests: an ``on_report`` callback (``run_search(on_report=...)``) that
makes real trials raise after a report, to exercise Tune's retries from checkpoints and ``Tuner.restore``.

Ray pickles it into the trials by reference: the trial processes import ``tests.tune.faults`` (Ray puts
the driver's working folder, the repository root under pytest, on their ``sys.path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAULT_MARKER = "fault_injected"  # in the trial folder: "FIRED EPOCHS", how many faults fired so far and when


class InjectedFault(RuntimeError):
    """What a trial raises when the fault fires."""


@dataclass(frozen=True)
class Fault:
    """A trial raises after reporting epoch >= ``epoch``, ``times`` times in all (a retried attempt raises
    again at its first report until the count is reached); only trials whose name ends with ``trial``
    (e.g. ``00002``, the third), every trial when empty. The count lives in the trial folder
    (``FAULT_MARKER``), so it survives the failed attempt's process."""

    epoch: int
    times: int = 1
    trial: str = ""

    def __call__(self, trial_dir: Path, metrics: dict[str, Any]) -> None:
        epochs = metrics["epochs"]
        marker = trial_dir / FAULT_MARKER
        fired = int(marker.read_text().split()[0]) if marker.is_file() else 0
        if trial_dir.name.endswith(self.trial) and epochs >= self.epoch and fired < self.times:
            marker.write_text(f"{fired + 1} {epochs}")
            raise InjectedFault(f"injected fault {fired + 1}/{self.times} after epoch {epochs}")
