"""Mixup / CutMix on training batches through timm's `Mixup`, reproducible per optimizer step.

timm's `Mixup` (the one OFA-KD's train script uses: mixup α 0.8, cutmix α 1.0, prob 1, switch 0.5,
mode `batch`, label smoothing folded into the targets) draws λ, the mode and the box from NumPy's
global generator. `BatchMixup` runs it with that generator seeded from (run seed, optimizer step, rank)
and restores its state afterwards, so a resumed run mixes its batches exactly as an uninterrupted one and
nothing else's randomness moves. The mixed image replaces the batch's image before `losses`, so the
teacher and the student see the same tensor (DESIGN.md); `label` becomes the (B, K) soft targets.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from torch import Tensor

from .errors import MethodError

MIXUP_DEFAULTS = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5}


@contextlib.contextmanager
def _numpy_seeded(seed: int) -> Iterator[None]:
    state, py = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
        random.setstate(py)


class BatchMixup:
    """`BatchMixup(spec, num_classes, label_smoothing)(batch, step=, rank=)` → the mixed batch (a copy)."""

    def __init__(self, spec: Mapping[str, Any], num_classes: int, label_smoothing: float = 0.0):
        unknown = set(spec) - set(MIXUP_DEFAULTS) - {"seed"}
        if unknown:
            raise MethodError(f"mixup: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(MIXUP_DEFAULTS)}")
        self.spec = {**MIXUP_DEFAULTS, **{k: v for k, v in spec.items() if k != "seed"}}
        self.seed = int(spec.get("seed", 0))
        self.fn = Mixup(
            mixup_alpha=float(self.spec["mixup_alpha"]),
            cutmix_alpha=float(self.spec["cutmix_alpha"]),
            prob=float(self.spec["prob"]),
            switch_prob=float(self.spec["switch_prob"]),
            mode="batch",
            label_smoothing=float(label_smoothing),
            num_classes=num_classes,
        )

    def __call__(self, batch: Mapping[str, Tensor], *, step: int, rank: int = 0) -> dict[str, Tensor]:
        if "teacher_logits" in batch:
            raise MethodError("mixup/cutmix changes the images: stored teacher logits (TEACHER_CACHE) cannot be used")
        x, y = batch["image"], batch["label"]
        if x.shape[0] % 2:
            raise MethodError(f"mixup/cutmix needs an even per-device batch, got {x.shape[0]}")
        seed = (self.seed * 1_000_003 + step) * 1_009 + rank
        with _numpy_seeded(seed), torch.no_grad():
            mixed, targets = self.fn(x.clone(), y)
        return {**batch, "image": mixed, "label": targets}


def build_mixup(spec: Mapping[str, Any] | None, num_classes: int, label_smoothing: float) -> BatchMixup | None:
    return BatchMixup(spec, num_classes, label_smoothing) if spec else None
