"""Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (FKD), ECCV 2022.

The teacher runs once, offline: the soft-label store (`distillbench.datasets.soft_labels`) holds its
top-k softmax for N stored crops per image. Training replays n of those crops per image per pass
(crop-major batches, FKD's epoch accounting) and minimises the soft cross-entropy to the recovered
region labels — no hard-label term and no teacher forward (ferkd.md §2; official `train_FKD.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DistillModule
from .errors import MethodError
from .optim import set_schedule_epoch
from .registry import Stage, StageContext, register

MIX_MODES = ("none", "cutmix", "mixup", "switch")


def soft_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """FKD's `Soft_CrossEntropy`: L = (1/B) Σ_b −Σ_k p_{b,k} · log softmax(z_b)_k, in float32.

    Equals `cross_entropy(logits, y)` for one-hot targets; ln K for zero logits and any distribution.
    """
    return -(soft_targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """FKD/timm `rand_bbox`: a box of side ratio √(1 − λ) centred at a uniform pixel, clipped to the image.
    Returns (y1, y2, x1, x2)."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y1, y2 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x1, x2 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return int(y1), int(y2), int(x1), int(x2)


def mix_pairs(
    images: Tensor, soft_labels: Tensor, partner: Tensor, rng: np.random.Generator, mode: str = "cutmix"
) -> tuple[Tensor, Tensor, float]:
    """Mix every sample with `images[partner]`, one λ (and one box) per batch (FKD `mixup_cutmix`):

    - cutmix: λ ~ Beta(1, 1); x_i[box] = x_partner[box]; λ ← 1 − |box| / (H·W);
    - mixup: λ ~ Beta(0.8, 0.8); x_i = λ·x_i + (1 − λ)·x_partner;
    - switch: cutmix with probability 0.5, else mixup.

    Labels: ŷ_i = λ·ŷ_i + (1 − λ)·ŷ_partner. Returns (images, labels, λ).
    """
    if mode not in MIX_MODES[1:]:
        raise MethodError(f"unknown mix mode {mode!r}; valid: {', '.join(MIX_MODES[1:])}")
    if mode == "switch":
        mode = "cutmix" if rng.random() < 0.5 else "mixup"
    if mode == "cutmix":
        lam = float(rng.beta(1.0, 1.0))
        h, w = images.shape[-2:]
        y1, y2, x1, x2 = cutmix_box(h, w, lam, rng)
        images = images.clone()
        images[:, :, y1:y2, x1:x2] = images[partner][:, :, y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
    else:
        lam = float(rng.beta(0.8, 0.8))
        images = lam * images + (1.0 - lam) * images[partner]
    return images, lam * soft_labels + (1.0 - lam) * soft_labels[partner], lam


def step_rng(module: DistillModule) -> np.random.Generator:
    """Per-step randomness from (run seed, global step): reproducible and identical after a resume."""
    return np.random.default_rng([torch.initial_seed() % (1 << 63), module.global_step])


def soft_label_stage(context: StageContext):
    """Stage `soft_labels`: open (or generate) the run's store and train from n replayed crops per image."""
    if context.soft_labels is None:
        raise MethodError(f"method {context.method!r} trains from the soft-label store; run it through the runner")
    hp = context.hparams
    return context.soft_labels(crops_per_image=int(hp["num_crops"]), recover_mode=hp["recover_mode"])


FKD_DEFAULTS = {"num_crops": 2, "recover_mode": "marginal_smoothing", "temperature": 1.0, "mix": "none"}


@register("fkd", defaults=FKD_DEFAULTS, stages=(Stage("soft_labels", soft_label_stage),))
class FKD(DistillModule):
    """FKD: soft CE to stored region soft labels, n crops per image, no teacher at train time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.hp.mix not in MIX_MODES:
            raise MethodError(f"mix must be one of {', '.join(MIX_MODES)}, got {self.hp.mix!r}")

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """FKD's epoch accounting (§2): a per-epoch schedule is evaluated once per n-crop pass, at the pass's
        start epoch e (the official loop runs e = 0, n, 2n, …); per-step schedules are left as they are."""
        lr_epoch = getattr(self.trainer.datamodule, "lr_epoch", None)
        if lr_epoch is None or self.schedule_spec.get("interval", "epoch") != "epoch":
            return super().lr_scheduler_step(scheduler, metric)
        set_schedule_epoch(scheduler, lr_epoch(self.current_epoch + 1))

    @staticmethod
    def soft_targets(batch: Mapping[str, Tensor]) -> Tensor:
        if "soft_target" not in batch:
            raise MethodError("this method trains on soft-label-store batches (`soft_target` missing)")
        return batch["soft_target"]

    def distill(self, images: Tensor, soft: Tensor, labels: Tensor, mixed: bool) -> dict[str, Tensor]:
        logits = self.student(images)
        if not mixed:  # display only: FKD has no hard-label term
            self.log_diagnostics({"ce_hard": F.cross_entropy(logits.detach().float(), labels)})
        return {"soft_ce": soft_cross_entropy(logits / self.hp.temperature, soft)}

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        images, soft = batch["image"], self.soft_targets(batch)
        mixed = self.hp.mix != "none"
        if mixed:
            rng = step_rng(self)
            partner = torch.from_numpy(rng.permutation(len(images))).to(images.device)
            images, soft, _ = mix_pairs(images, soft, partner, rng, self.hp.mix)
        return self.distill(images, soft, batch["label"], mixed)
