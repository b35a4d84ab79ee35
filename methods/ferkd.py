"""Shen, "FerKD: Surgical Label Adaptation for Efficient Distillation", ICCV 2023 — distillbench definition.

FerKD's code is unreleased (its README: FKD's training with "different preprocessed soft labels"), so the
calibration below is the distillbench definition of ferkd.md §3, built from what is public: the crops
of an image are ranked by the teacher's confidence; the least confident ("hard", context-only) regions
get a label-smoothed ground truth instead of the teacher's soft label; the others keep the teacher's
label; SelfMix mixes regions of crops of the same image. The objective is FKD's soft cross-entropy.

With `q_hard = 0` and `selfmix = False` FerKD is FKD exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MethodError
from .fkd import FKD, FKD_DEFAULTS, mix_pairs, soft_cross_entropy, soft_label_stage, step_rng
from .registry import Stage, StageContext, register

NORMAL, HARD, EASY = 0, 1, 2
RULES = ("quantile", "threshold")
CONFIDENCES = ("gt_prob", "max_prob")

__all__ = ["EASY", "HARD", "NORMAL", "FerKD", "calibrate", "crop_categories", "self_mix", "soft_cross_entropy"]


def crop_categories(
    gt_prob: Tensor,
    rule: str = "quantile",
    q_hard: float = 0.1,
    tau_hard: float = 0.1,
    q_easy: float = 0.0,
) -> Tensor:
    """Category of every stored crop, (M, N) int8: NORMAL 0, HARD 1, EASY 2 (ferkd.md §3).

    c_{i,j} = teacher confidence of crop j of image i. Rank the N crops of each image by c (ascending,
    ties by crop index). `quantile`: the ⌊q_hard·N⌋ lowest are HARD; `threshold`: c < τ_hard is HARD.
    The ⌊q_easy·N⌋ highest (not already HARD) are EASY.
    """
    if rule not in RULES:
        raise MethodError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
    for name, q in (("q_hard", q_hard), ("q_easy", q_easy)):
        if not 0.0 <= q <= 1.0:
            raise MethodError(f"{name} must be in [0, 1], got {q}")
    c = torch.as_tensor(gt_prob, dtype=torch.float32)
    n = c.shape[1]
    rank = torch.argsort(torch.argsort(c, dim=1, stable=True), dim=1)  # 0 = least confident
    hard = rank < int(np.floor(q_hard * n + 1e-9)) if rule == "quantile" else c < tau_hard
    easy = (rank >= n - int(np.floor(q_easy * n + 1e-9))) & ~hard
    out = torch.full(c.shape, NORMAL, dtype=torch.int8)
    out[hard] = HARD
    out[easy] = EASY
    return out


def calibrate(soft_labels: Tensor, categories: Tensor, targets: Tensor, num_classes: int, epsilon: float) -> Tensor:
    """FerKD's label calibration: ŷ = (1 − ε)·onehot(y) + ε/K for HARD crops, the teacher's soft label
    otherwise. (B, K) → (B, K)."""
    smoothed = (1.0 - epsilon) * F.one_hot(targets, num_classes).to(soft_labels.dtype) + epsilon / num_classes
    hard = (categories.to(soft_labels.device) == HARD)[:, None]
    return torch.where(hard, smoothed, soft_labels)


def self_mix(
    images: Tensor, soft_labels: Tensor, num_crops: int, generator: np.random.Generator, mode: str = "cutmix"
) -> tuple[Tensor, Tensor]:
    """SelfMix: in a crop-major batch of b = B_img·n crops, sample i is mixed with its partner
    (i + B_img) mod b — the next stored crop of the same image — by `mix_pairs` (one λ and box per
    batch; labels mixed by the same area: λ·ŷ_i + (1 − λ)·ŷ_partner)."""
    b = len(images)
    if num_crops < 2 or b % num_crops:
        raise MethodError(f"SelfMix needs ≥ 2 crops per image dividing the batch ({b} crops, {num_crops} per image)")
    partner = (torch.arange(b, device=images.device) + b // num_crops) % b
    mixed, labels, _ = mix_pairs(images, soft_labels, partner, generator, mode)
    return mixed, labels


def ferkd_stage(context: StageContext) -> dict:
    """Stage `soft_labels`: the store (as FKD's), plus each stored crop's category from its confidence."""
    hp = context.hparams
    if hp["confidence"] not in CONFIDENCES:
        raise MethodError(f"confidence must be one of {', '.join(CONFIDENCES)}, got {hp['confidence']!r}")
    data = soft_label_stage(context)
    if hp["confidence"] == "gt_prob":
        confidence = data.crop_column("gt_prob")
    else:  # the teacher's top-1 probability: the first stored value of each crop's top-k
        confidence = data.crop_column("labels")[:, :, 1, 0]
    confidence = torch.from_numpy(np.asarray(confidence, dtype=np.float32))
    categories = crop_categories(confidence, hp["rule"], hp["q_hard"], hp["tau_hard"], hp["q_easy"])
    if hp["q_easy"] > 0 and hp["easy_action"] == "drop":
        data.restrict((categories != EASY).numpy())
    return {"data": data, "categories": categories}


@register(
    "ferkd",
    defaults={
        **FKD_DEFAULTS,
        "confidence": "gt_prob",
        "rule": "quantile",
        "q_hard": 0.1,
        "tau_hard": 0.1,
        "q_easy": 0.0,
        "easy_action": "keep",
        "epsilon": 0.1,
        "selfmix": True,
        "selfmix_mode": "cutmix",
    },
    stages=(Stage("soft_labels", ferkd_stage),),
)
class FerKD(FKD):
    """FerKD: FKD with hard (least-confident) crops relabelled to smoothed ground truth, plus SelfMix."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.hp.easy_action not in ("keep", "drop"):
            raise MethodError(f"easy_action must be 'keep' or 'drop', got {self.hp.easy_action!r}")
        if self.hp.mix != "none":
            raise MethodError("ferkd mixes with SelfMix (selfmix, selfmix_mode); leave FKD's batch `mix` at 'none'")
        if self.hp.selfmix and self.hp.num_crops < 2:
            raise MethodError("SelfMix needs num_crops ≥ 2 (it mixes crops of the same image)")
        artifact = self.artifacts.get("soft_labels") or {}
        self.categories: Tensor | None = artifact.get("categories")

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.categories is None:
            raise MethodError("ferkd needs the crop categories of its `soft_labels` stage")
        images, labels = batch["image"], batch["label"]
        cats = self.categories[batch["index"].cpu(), batch["crop"].cpu()]
        soft = calibrate(self.soft_targets(batch), cats, labels, self.num_classes, self.hp.epsilon)
        self.log_diagnostics({"hard_fraction": (cats == HARD).float().mean()})
        mixed = bool(self.hp.selfmix)
        if mixed:
            # after a multi-crop pass, the last epochs replay 1 crop per image: nothing to self-mix there
            n = self.hp.num_crops if len(images) % self.hp.num_crops == 0 and self._multi_crop(batch) else 1
            if n > 1:
                images, soft = self_mix(images, soft, n, step_rng(self), self.hp.selfmix_mode)
            else:
                mixed = False
        return self.distill(images, soft, labels, mixed)

    def _multi_crop(self, batch: Mapping[str, Tensor]) -> bool:
        index = batch["index"]
        n = self.hp.num_crops
        b = len(index) // n
        return bool(torch.equal(index[:b].repeat(n), index))
