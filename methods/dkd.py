"""Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022 — mdistiller's definition (baselines.md §3)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DistillModule
from .registry import register


def dkd_terms(
    logits_student: Tensor, logits_teacher: Tensor, target: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Per-sample (TCKD, NCKD), T² included (DKD paper Eq. 3–4; mdistiller `dkd_loss`).

    TCKD = T² · KL(b_T ‖ b_S) with binary b = [p_y, 1 − p_y] (sums of the softmax, not a log-softmax);
    NCKD = T² · KL(p̂_T ‖ p̂_S) over the non-target classes, p̂ = softmax(z/T − 1000·onehot(y)).
    Identity: KD = TCKD + (1 − p_T,y) · NCKD per sample.
    """
    t = float(temperature)
    z_s, z_t = logits_student.float() / t, logits_teacher.float() / t
    gt = F.one_hot(target, z_s.shape[1]).to(z_s.dtype)
    p_s, p_t = z_s.softmax(dim=1), z_t.softmax(dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="none").sum(1) * (t * t)
    log_q_s = F.log_softmax(z_s - 1000.0 * gt, dim=1)
    q_t = F.softmax(z_t - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="none").sum(1) * (t * t)
    return tckd, nckd


def dkd_loss(
    logits_student: Tensor, logits_teacher: Tensor, target: Tensor, alpha: float, beta: float, temperature: float
) -> Tensor:
    """DKD = α · TCKD + β · NCKD, each summed over classes and averaged over the batch (DKD Eq. 5)."""
    tckd, nckd = dkd_terms(logits_student, logits_teacher, target, temperature)
    return (alpha * tckd + beta * nckd).mean()


def warmup_factor(epoch_index: int, warmup: int) -> float:
    """min((epoch_index + 1) / W, 1) for a 0-based epoch index (mdistiller counts epochs from 1)."""
    return min((epoch_index + 1) / max(warmup, 1), 1.0)


@register(
    "dkd",
    defaults={"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20},
    extensions=("nd",),
)
class DKD(DistillModule):
    """DKD: L = w_ce · CE + min((e + 1)/W, 1) · (α · TCKD + β · NCKD)."""

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        logits_s = self.student(x)
        logits_t = self.teacher_logits(batch)
        tckd, nckd = dkd_terms(logits_s, logits_t, y, self.hp.temperature)
        factor = warmup_factor(self.current_epoch, self.hp.warmup_epochs)
        self.log_diagnostics({"tckd": tckd.mean().detach(), "nckd": nckd.mean().detach(), "dkd_factor": factor})
        return {
            "ce": self.hp.ce_weight * self.classification_loss(logits_s, y),
            "dkd": factor * (self.hp.alpha * tckd + self.hp.beta * nckd).mean(),
        }
