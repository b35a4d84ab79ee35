"""Optimizer and schedule semantics from the protocol spec."""

from __future__ import annotations

import math

import pytest
import torch
from distillbench.methods.optim import build_optimizer, build_scheduler, step_scheduler


def _lrs(schedule: dict, epochs: int, steps_per_epoch: int = 1) -> list[float]:
    """The lr of every optimizer step, stepped as the base module steps it."""
    opt = build_optimizer(torch.nn.Linear(2, 2), {"name": "sgd", "lr": 1.0})
    sched = build_scheduler(opt, schedule, epochs, steps_per_epoch)
    interval = schedule.get("interval", "epoch")
    out, step = [], 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            step += 1
            if interval == "step":
                step_scheduler(sched, interval="step", finished_epoch=epoch, global_step=step)
        if interval == "epoch":
            step_scheduler(sched, interval="epoch", finished_epoch=epoch, global_step=step)
    return out


def test_multistep_decays_at_zero_based_milestones():
    lrs = _lrs({"name": "multistep", "milestones": [2, 4], "gamma": 0.1}, 6)
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_cosine_with_warmup_per_epoch():
    lrs = _lrs({"name": "cosine", "warmup_epochs": 2, "warmup_lr": 0.0, "min_lr": 0.0}, 6)
    assert lrs[0] == pytest.approx(0.0) and lrs[1] == pytest.approx(0.5)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


def test_cosine_per_step_reaches_zero_smoothly():
    lrs = _lrs({"name": "cosine", "interval": "step"}, epochs=2, steps_per_epoch=4)
    expected = [0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    assert lrs == pytest.approx(expected)
    per_epoch = _lrs({"name": "cosine"}, epochs=2, steps_per_epoch=4)
    assert per_epoch == pytest.approx([1.0] * 4 + [0.5] * 4)


def test_multistep_per_step_is_refused():
    opt = build_optimizer(torch.nn.Linear(2, 2), {"lr": 1})
    with pytest.raises(ValueError, match="multistep schedules are per epoch"):
        build_scheduler(opt, {"name": "multistep", "interval": "step", "milestones": [1]}, 3)


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


def test_multistep_with_linear_warmup():
    """OFA's ImageNet CNN recipe (timm `step`, decay 30, warm-up 3 from 1e-4), scaled down: warm-up
    epochs ramp linearly from warmup_lr, then the lr decays at the same 0-based milestones as without it."""
    spec = {"name": "multistep", "milestones": [3, 5], "gamma": 0.1, "warmup_epochs": 2, "warmup_lr": 0.1}
    assert _lrs(spec, 7) == pytest.approx([0.1, 0.55, 1.0, 0.1, 0.1, 0.01, 0.01])
    plain = _lrs({**spec, "warmup_epochs": 0}, 7)
    assert _lrs(spec, 7)[2:] == pytest.approx(plain[2:])  # the same decays as torch's MultiStepLR
    full = _lrs({"name": "multistep", "milestones": [30, 60, 90], "warmup_epochs": 3, "warmup_lr": 1e-4}, 100)
    assert full[:4] == pytest.approx([1e-4, 1e-4 + (1 - 1e-4) / 3, 1e-4 + 2 * (1 - 1e-4) / 3, 1.0])
    assert (full[29], full[30], full[59], full[60], full[89], full[90]) == pytest.approx(
        (1.0, 0.1, 0.1, 0.01, 0.01, 0.001)
    )
