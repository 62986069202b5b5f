"""Registration of the training-side verbs (train, eval, export, tune) on the CLI parser."""

from __future__ import annotations

from collections.abc import Callable

REGISTER: list[Callable] = []
