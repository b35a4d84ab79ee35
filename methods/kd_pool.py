"""KD on an unlabelled web pool — the baselines of KD³'s small protocol (shared/methods/kd3.md §9).

Plain KD on the whole pool (Hinton's T²·KL only: the pool has no labels) and confidence-threshold
KD, which keeps a pool image only where the teacher is confident (FixMatch-style mask, recomputed on
every augmented view).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from .base import DistillModule
from .kd import kd_per_sample
from .registry import register


def confident_kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float, confidence: float) -> Tensor:
    """Masked KD over a batch of B unlabelled images:

        m_b = 1[max_k softmax(z_T,b)_k > confidence],  L = (1/B) Σ_b m_b · T² · KL(p_T,b ‖ p_S,b),  p = softmax(z/T)

    (mean over the whole batch, as FixMatch's masked loss). `confidence` = 0 keeps every image: plain KD.
    """
    per_sample = kd_per_sample(logits_student, logits_teacher, temperature)
    if confidence <= 0:
        return per_sample.mean()
    mask = F.softmax(logits_teacher.float(), dim=1).max(dim=1).values > confidence
    return (per_sample * mask).mean()


@register("kd_pool", defaults={"temperature": 4.0, "confidence": 0.0})
class KDPool(DistillModule):
    """KD on an unlabelled web pool: T²·KL(p_T ‖ p_S), optionally where the teacher's max-prob > confidence."""

    train_data = "pool"

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        loss = confident_kd_loss(self.student(x), self.teacher.logits(x), self.hp.temperature, self.hp.confidence)
        return {"kd": loss}
