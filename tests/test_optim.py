"""Optimizer and schedule semantics from the protocol spec."""

from __future__ import annotations

import pytest
import torch
from distillbench.methods.optim import build_optimizer, build_scheduler, step_scheduler


def _lrs(schedule: dict, epochs: int) -> list[float]:
    """The lr used in each 0-based epoch, stepped as the base module steps it."""
    opt = build_optimizer(torch.nn.Linear(2, 2), {"name": "sgd", "lr": 1.0})
    sched = build_scheduler(opt, schedule, epochs)
    out = []
    for epoch in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        step_scheduler(sched, epoch)
    return out


def test_multistep_decays_at_zero_based_milestones():
    lrs = _lrs({"name": "multistep", "milestones": [2, 4], "gamma": 0.1}, 6)
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_cosine_with_warmup_per_epoch():
    lrs = _lrs({"name": "cosine", "warmup_epochs": 2, "warmup_lr": 0.0, "min_lr": 0.0}, 6)
    assert lrs[0] == pytest.approx(0.0) and lrs[1] == pytest.approx(0.5)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


def test_no_decay_groups_exclude_bias_and_norm():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    opt = build_optimizer(model, {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4, "no_decay_bias_norm": True})
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 5e-4]
    assert sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] == 0) == 3


def test_unknown_optimizer_and_schedule():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        build_optimizer(model, {"name": "lion", "lr": 1})
    with pytest.raises(ValueError, match="unknown schedule 'poly'"):
        build_scheduler(build_optimizer(model, {"lr": 1}), {"name": "poly"}, 3)
