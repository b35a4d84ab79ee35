"""Hinton et al., "Distilling the Knowledge in a Neural Network", 2015 — mdistiller's `kd_loss`."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from .base import DistillModule
from .registry import register


def kd_per_sample(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """Per-sample KD term, T² included (baselines.md §2):

        kd_b = T² · Σ_k p_T[b,k] · (log p_T[b,k] − log p_S[b,k]),  p = softmax(z / T)

    with 0·log 0 = 0. Computed in float32 whatever the input dtype.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(logits_student.float() / t, dim=1)
    p_t = F.softmax(logits_teacher.float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(dim=1) * (t * t)


def kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """KD loss: T² · KL(p_T ‖ p_S) summed over classes, averaged over the batch (Hinton 2015, Eq. 1's
    gradient scaling; mdistiller `kd_loss`)."""
    return kd_per_sample(logits_student, logits_teacher, temperature).mean()


@register("kd", defaults={"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}, extensions=("nd",))
class KD(DistillModule):
    """KD: L = w_ce · CE(z_S, y) + w_kd · kd_loss(z_S, z_T, T)."""

    mixed_labels = True  # CE takes soft targets; the KD term does not read labels

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        logits_s = self.student(x)
        logits_t = self.teacher_logits(batch)
        return {
            "ce": self.hp.ce_weight * self.classification_loss(logits_s, y),
            "kd": self.hp.kd_weight * kd_loss(logits_s, logits_t, self.hp.temperature),
        }
