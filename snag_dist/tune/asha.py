"""ASHA that lets a trial at max_t finish its run (imported only when a search uses ASHA: it imports Ray).

`stop_last_trials=False` alone does not: Ray's bracket also has a rung at max_t, so a trial that reached it
below the rung's cutoff was stopped on its last report, after training every epoch but before its test
split and `summary.json` (a "stopped" trial with all its epochs; it happened when a weak trial reported its
early rungs before any stronger one, so no early rung could cut it).
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler


class FinishingASHA(ASHAScheduler):
    """`ASHAScheduler` whose decisions at or past ``max_t`` are always CONTINUE (the run then ends itself)."""

    def __init__(self, *, time_attr: str, max_t: int, **kwargs) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, stop_last_trials=False, **kwargs)
        self.finish_attr, self.finish_at = time_attr, max_t

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        # Decided before ASHA's bracket sees it (its stop count stays true); the trial's last result still
        # reaches the bracket through on_trial_complete.
        if result.get(self.finish_attr, 0) >= self.finish_at:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
