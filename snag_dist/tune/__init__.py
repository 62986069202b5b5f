"""Ray Tune hyperparameter search over SNAG's noise/mask ratios, objective weights, lr and sizes.

``space`` reads and validates search-space YAMLs, ``trainable`` is the trial (a real engine run that
reports every validation with a checkpoint), ``runner`` builds and runs the Tuner, ``outputs`` writes
the results table, the best config and plots. Ray is imported lazily: ``import snag_dist.tune`` is cheap.
"""

from snag_dist.tune.space import SearchSpace, load_space, validate

__all__ = ["SearchSpace", "load_space", "validate"]
