"""Optimizer groups and lr schedules: embedding tables at their own lr, cosine vs constant decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snag_dist.engine.optim import build_optimizer, warmup_cosine
from snag_dist.errors import ConfigError


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)


def _lr_of(opt: torch.optim.Optimizer, param: torch.Tensor) -> float:
    return next(g["lr"] for g in opt.param_groups if any(p is param for p in g["params"]))


def test_embedding_tables_get_their_own_lr_and_decay_rules():
    model = _Toy()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, embedding_lr_scale=20.0)
    assert _lr_of(opt, model.table.weight) == pytest.approx(2e-2)
    assert _lr_of(opt, model.proj.weight) == pytest.approx(1e-3)
    assert _lr_of(opt, model.proj.bias) == pytest.approx(1e-3)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(model.proj.weight)] == 0.1 and decay[id(model.table.weight)] == 0.1
    assert decay[id(model.proj.bias)] == 0.0 and decay[id(model.norm.weight)] == 0.0
    # Every parameter exactly once.
    assert sorted(decay) == sorted(id(p) for p in model.parameters())


def test_default_scale_keeps_two_groups_in_the_old_order():
    opt = build_optimizer(_Toy(), lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def _lrs(decay: str, steps: int = 20, warmup: float = 0.25) -> list[float]:
    model = _Toy()
    opt = build_optimizer(model, lr=1.0, weight_decay=0.0, embedding_lr_scale=4.0)
    sched = warmup_cosine(opt, steps, warmup, decay=decay)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_constant_schedule_holds_the_peak_after_warmup_and_cosine_reaches_zero():
    const, cos = _lrs("constant"), _lrs("cosine")
    assert const[:5] == cos[:5]  # the same linear warm-up
    assert [row[0] for row in const[4:]] == [1.0] * 16
    assert cos[-1][0] < 0.02 and all(a >= b for a, b in zip([r[0] for r in cos[4:]], [r[0] for r in cos[5:]]))
    # The schedule scales every group: the table's lr stays 4x the rest.
    assert all(row[1] == pytest.approx(4.0 * row[0]) for row in const + cos)


def test_lr_scales_by_pattern_multiply_the_table_scale_and_reject_unused_patterns():
    model = _Toy()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, embedding_lr_scale=5.0,
                          lr_scales={"proj.weight": 10.0, "proj.*": 3.0, "table.*": 2.0})
    assert _lr_of(opt, model.proj.weight) == pytest.approx(1e-2)  # the first matching pattern wins
    assert _lr_of(opt, model.proj.bias) == pytest.approx(3e-3)
    assert _lr_of(opt, model.table.weight) == pytest.approx(1e-2)  # 5 x 2
    assert _lr_of(opt, model.norm.weight) == pytest.approx(1e-3)
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    with pytest.raises(ConfigError, match="'fusion.\\*' matches no trainable parameter"):
        build_optimizer(model, lr=1e-3, weight_decay=0.0, lr_scales={"fusion.*": 2.0})
