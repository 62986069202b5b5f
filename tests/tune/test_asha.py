"""The search's ASHA: a trial that reaches max_t finishes its run even below the last rung's cutoff (Ray's
ASHAScheduler with stop_last_trials=False stops it there), and early rungs still stop weak trials."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from snag_dist.tune.asha import FinishingASHA


def _decisions(scheduler) -> tuple[list[str], list[str]]:
    """A strong trial reports epochs 1-4; then a weak trial at epoch 1 and another only at max_t: the strong
    trial's actions, and the two weak trials' actions."""
    scheduler.set_search_properties(metric="mrr", mode="max")
    strong, weak = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    for t in (strong, weak):
        scheduler.on_trial_add(None, t)
    first = [scheduler.on_trial_result(None, strong, {"epochs": e, "mrr": 0.8}) for e in (1, 2, 3, 4)]
    late = SimpleNamespace(trial_id="c")
    scheduler.on_trial_add(None, late)
    weak_early = scheduler.on_trial_result(None, late, {"epochs": 1, "mrr": 0.1})
    # "b" reports only at max_t (as a weak trial does when it passed the early rungs before any other)
    return first, [weak_early, scheduler.on_trial_result(None, weak, {"epochs": 4, "mrr": 0.1})]


def test_finishing_asha_lets_a_trial_at_max_t_finish_and_still_cuts_early():
    kwargs = dict(time_attr="epochs", max_t=4, grace_period=1, reduction_factor=2)
    first, (early, at_max) = _decisions(ASHAScheduler(stop_last_trials=False, **kwargs))
    assert at_max == TrialScheduler.STOP  # Ray's: the rung at max_t stops it, before its test split and summary
    first, (early, at_max) = _decisions(FinishingASHA(**kwargs))
    assert first == [TrialScheduler.CONTINUE] * 4
    assert early == TrialScheduler.STOP  # a weak trial is still cut at the first rung
    assert at_max == TrialScheduler.CONTINUE
