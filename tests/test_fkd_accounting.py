"""FKD's epoch accounting (ferkd.md §2, §7 test 6): E = 12, n = 4 → passes at 0 and 4 with 4 crops, then 8,
9, 10, 11 with one; a per-epoch learning rate is evaluated at those values, once per pass."""

from __future__ import annotations

import math

import pytest
import torch
from distillbench.benchmark import runner
from distillbench.benchmark.runner import RunRequest
from distillbench.datasets.soft_labels import epoch_plan
from distillbench.methods.optim import build_scheduler, set_schedule_epoch
from lightning.pytorch.callbacks import Callback

from .conftest import TINY_PROTOCOL, write_protocol

LR_EPOCHS_12_4 = [0, 0, 0, 0, 4, 4, 4, 4, 8, 9, 10, 11]


def _pass_starts(epochs: int, n: int) -> list[int]:
    return [start for start, _, _ in epoch_plan(epochs, n)]


@pytest.mark.parametrize("schedule", ["cosine", "multistep"])
def test_the_lr_is_evaluated_at_the_pass_start(schedule):
    assert _pass_starts(12, 4) == LR_EPOCHS_12_4
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=0.1)
    spec = {"name": schedule, "milestones": [2, 5, 9], "gamma": 0.5}
    scheduler = build_scheduler(optimizer, spec, 12)
    seen = [optimizer.param_groups[0]["lr"]]
    for e in range(1, 12):  # after Lightning epoch e − 1: set the lr of epoch e
        set_schedule_epoch(scheduler, _pass_starts(12, 4)[e])
        seen.append(optimizer.param_groups[0]["lr"])
    if schedule == "cosine":  # 0.5·(1 + cos(π e / E)) at e = the official epoch value
        expected = [0.1 * 0.5 * (1 + math.cos(math.pi * e / 12)) for e in LR_EPOCHS_12_4]
    else:  # ×0.5 per milestone ≤ e: 2 and (at 8) 5; milestone 9 from epoch 9 on
        expected = [0.1 * 0.5 ** sum(m <= e for m in (2, 5, 9)) for e in LR_EPOCHS_12_4]
    assert seen == pytest.approx(expected, abs=1e-12)
    if schedule == "multistep":  # a resumed run restores the epoch the schedule stands at
        assert scheduler.state_dict()["last_epoch"] == 11


def test_fkd_runs_each_pass_at_the_lr_of_its_start(teacher_store, tmp_path, monkeypatch):
    """6 epochs, n = 2: passes at 0, 2 (2 crops), then 4, 5; milestone 3 falls inside the pass at 2, so
    the decay starts at epoch 4 (the live per-epoch schedule would decay at 3)."""
    soft = {"num_crops": 4, "k": 3, "scale": [0.25, 1.0], "ratio": [0.75, 1.3333], "flip": False}
    data = {
        **TINY_PROTOCOL,
        "epochs": 6,
        "schedule": {"name": "multistep", "milestones": [3], "gamma": 0.1},
        "soft_labels": soft,
    }
    protocol = write_protocol(tmp_path / "tinydigits.yaml", data)
    request = RunRequest(
        method="fkd",
        protocol=str(protocol),
        teachers=str(teacher_store),
        results=str(tmp_path / "results"),
        progress=False,
        wandb=False,
        measure_overhead=False,
    )
    used = []

    class LrAtEpochStart(Callback):
        def on_train_epoch_start(self, trainer, module):
            used.append(trainer.optimizers[0].param_groups[0]["lr"])

    build = runner.build_trainer
    monkeypatch.setattr(
        runner, "build_trainer", lambda *a, **kw: build(*a, **{**kw, "callbacks": [*kw["callbacks"], LrAtEpochStart()]})
    )
    record = runner.run(request, say=lambda m: None)
    assert record["status"] == "finished"
    assert used == pytest.approx([0.05] * 4 + [0.005] * 2)
