"""The student trained alone with the protocol's criterion: the reference every method is read against."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .base import DistillModule
from .registry import register


@register("vanilla", needs_teacher=False)
class Vanilla(DistillModule):
    """Vanilla student: the protocol's classification loss only, no teacher."""

    needs_teacher = False
    is_reference_student = True
    mixed_labels = True

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"ce": self.classification_loss(self.student(batch["image"]), batch["label"])}
