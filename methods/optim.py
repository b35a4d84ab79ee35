"""Optimizer and learning-rate schedule built from a protocol's plain-dict specification.

Schedules are per epoch, as in the reference recipes. `multistep` uses torch's MultiStepLR because
its 0-based milestones are mdistiller's semantics (decay when the 1-based epoch exceeds the
milestone); timm's MultiStepLRScheduler decays one epoch earlier. `multistep` with `warmup_epochs`
(OFA's ImageNet CNN recipe: timm's `step` schedule with a linear warm-up) uses timm's
MultiStepLRScheduler with the milestones shifted to the same semantics, warm-up counted inside the
schedule (`warmup_prefix=False`, timm 0.6's behaviour): epoch e < W runs at
warmup_lr + e·(lr − warmup_lr)/W, then lr·γ^(number of milestones ≤ e). `cosine` uses timm's
CosineLRScheduler (with linear warm-up), stepped by the base module at each epoch end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from .errors import MethodError

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("multistep", "cosine", "constant")
INTERVALS = ("epoch", "step")


def build_optimizer(module: nn.Module, spec: Mapping[str, Any]) -> torch.optim.Optimizer:
    """`spec`: name, lr, weight_decay, momentum, nesterov, betas, eps, no_decay_bias_norm."""
    name = spec.get("name", "sgd")
    lr = float(spec["lr"])
    wd = float(spec.get("weight_decay", 0.0))
    if spec.get("no_decay_bias_norm", False):
        params = param_groups_weight_decay(module, weight_decay=wd)
        wd = 0.0  # carried by the groups
    else:
        params = [p for p in module.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=float(spec.get("momentum", 0.9)),
            nesterov=bool(spec.get("nesterov", False)),
            weight_decay=wd,
        )
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(
            params,
            lr=lr,
            betas=tuple(spec.get("betas", (0.9, 0.999))),
            eps=float(spec.get("eps", 1e-8)),
            weight_decay=wd,
        )
    raise MethodError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, spec: Mapping[str, Any], epochs: int, steps_per_epoch: int = 1):
    """A scheduler (torch LRScheduler or timm Scheduler), or None for a constant lr.

    `interval: epoch` (default) changes the lr once per epoch, as the reference recipes do;
    `interval: step` evaluates the cosine per optimizer step (used by the short small protocols,
    where a per-epoch staircase would leave the last epoch at a large lr).
    """
    name = spec.get("name", "constant")
    interval = spec.get("interval", "epoch")
    if interval not in INTERVALS:
        raise MethodError(f"unknown schedule interval {interval!r}; valid: {', '.join(INTERVALS)}")
    if name == "constant":
        return None
    if name == "multistep":
        if interval != "epoch":
            raise MethodError("multistep schedules are per epoch (milestones are epochs)")
        if int(spec.get("warmup_epochs", 0)) > 0:
            return MultiStepLRScheduler(
                optimizer,
                # timm applies milestone m at epoch m − 1 (bisect on t + 1): m + 1 decays at epoch m
                decay_t=[int(m) + 1 for m in spec.get("milestones", [])],
                decay_rate=float(spec.get("gamma", 0.1)),
                warmup_t=int(spec["warmup_epochs"]),
                warmup_lr_init=float(spec.get("warmup_lr", 0.0)),
                warmup_prefix=False,
            )
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(spec.get("milestones", [])), gamma=float(spec.get("gamma", 0.1))
        )
    if name == "cosine":
        unit = steps_per_epoch if interval == "step" else 1
        return CosineLRScheduler(
            optimizer,
            t_initial=epochs * unit,
            lr_min=float(spec.get("min_lr", 0.0)),
            warmup_t=int(spec.get("warmup_epochs", 0)) * unit,
            warmup_lr_init=float(spec.get("warmup_lr", 0.0)),
            t_in_epochs=interval == "epoch",
        )
    raise MethodError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")


def step_scheduler(scheduler, *, interval: str, finished_epoch: int, global_step: int) -> None:
    """Advance the scheduler after an epoch (`interval: epoch`) or an optimizer step (`step`).

    `finished_epoch` is 0-based; `global_step` counts the optimizer steps taken so far.
    """
    if isinstance(scheduler, Scheduler):
        if interval == "step":
            scheduler.step_update(num_updates=global_step)
        else:
            scheduler.step(epoch=finished_epoch + 1)
    else:
        scheduler.step()


def set_schedule_epoch(scheduler, epoch: int) -> None:
    """Put a per-epoch schedule at its value for `epoch` (closed form), whatever the previous epoch was —
    e.g. FKD's accounting, where an n-crop pass runs at the lr of its start epoch (ferkd.md §2)."""
    if isinstance(scheduler, Scheduler):
        scheduler.step(epoch=epoch)
    elif isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR):  # lr = base · γ^#{milestones ≤ epoch}
        decays = sum(count for milestone, count in scheduler.milestones.items() if milestone <= epoch)
        scheduler.last_epoch = epoch
        scheduler._last_lr = [base * scheduler.gamma**decays for base in scheduler.base_lrs]
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler._last_lr, strict=True):
            group["lr"] = lr
    else:
        raise MethodError(f"cannot set {type(scheduler).__name__} to an epoch")
