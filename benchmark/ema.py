"""An exponential moving average of the student's weights (timm's ModelEmaV3), evaluated beside them.

OFA-KD's ViT/MLP-student recipe keeps an EMA with decay 0.99996 (ofa.md §4; official
configs/imagenet/vit_mlp.yaml `model_ema_decay`), updated after every optimizer step from the student
only (`ema.update(distiller.student)` in the official train.py). The official script evaluates the raw
student (its main checkpoint and summary) and every EMA separately; so does this callback: after each
validation pass it logs the EMA's `val/ema_top1`, `test/ema_top1` (and top-5) beside the student's
`val/top1`, `test/top1`. The run record's `metrics.top1` stays the student's own weights (the selection
rule); `metrics.ema_top1` is the EMA's, and the record's `ema` field says so.

The EMA state is this callback's checkpoint state, so a resumed run continues the same average.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from timm.utils import ModelEmaV3
from torchmetrics import MetricCollection

from ..methods.base import EVAL_SPLITS


class StudentEMA(Callback):
    def __init__(self, decay: float):
        self.decay = float(decay)
        self.ema: ModelEmaV3 | None = None
        self._pending: dict[str, Any] | None = None
        self._metrics: dict[str, MetricCollection] = {}
        self._seen: set[str] = set()

    @staticmethod
    def describe(decay: float) -> dict[str, Any]:
        """What the run record says about the evaluated weights."""
        return {
            "decay": decay,
            "implementation": "timm.utils.ModelEmaV3, updated after every optimizer step",
            "reported": "metrics.top1/top5: the student's own weights; metrics.ema_top1/ema_top5: the EMA's",
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # created here, after the module reached its device, so the average lives beside the weights
        self.ema = ModelEmaV3(pl_module.student, decay=self.decay)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None
        self._metrics = {
            split: pl_module._make_metrics(pl_module.num_classes).to(pl_module.device) for split in EVAL_SPLITS
        }

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.ema.update(pl_module.student)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self.ema is None:
            return
        split = EVAL_SPLITS[dataloader_idx]
        with torch.no_grad():
            self._metrics[split].update(self.ema.module(batch["image"]), batch["label"])
        self._seen.add(split)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for split in sorted(self._seen):
            for name, value in self._metrics[split].compute().items():
                pl_module.log(f"{split}/ema_{name}", 100.0 * value, sync_dist=False)
            self._metrics[split].reset()
        self._seen.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("ema")
        if state is None:
            return
        if self.ema is not None:
            self.ema.load_state_dict(state)
        else:  # restored before fit starts: applied when the EMA is created
            self._pending = state
