"""Lightning callbacks that feed the run record: per-epoch metric history and training throughput."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def batch_size_of(batch) -> int:
    """Images in a batch: a `{"image": (B, ...)}` dict, or a detection batch `(list of images, targets)`."""
    if isinstance(batch, dict) and "image" in batch:
        return int(batch["image"].shape[0])
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], list | tuple):
        return len(batch[0])
    return 1


class EpochHistory(Callback):
    """After each training epoch (validation has run by then), keep its evaluation metrics, the lr and
    the epoch means of the training loss terms.

    The training means are accumulated here from the module's `last_terms` (sum and count per
    term, in float64), reduced over all ranks at the epoch end, and saved in checkpoints with the
    rest of this callback's state — so they are exact after a mid-epoch resume and under DDP,
    unlike Lightning's own epoch aggregation of logged values (rank 0's, restarted on resume).
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        terms = getattr(pl_module, "last_terms", None) or {}
        n = batch_size_of(batch)
        for key, value in terms.items():
            total = value.detach().double() * n
            self._sums[key] = self._sums[key] + total if key in self._sums else total
        self._count += n

    def _train_means(self, trainer: L.Trainer) -> dict[str, float]:
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        device = trainer.strategy.root_device
        sums = torch.stack([torch.as_tensor(self._sums[k], dtype=torch.float64, device=device) for k in keys])
        totals = torch.cat([sums, torch.tensor([float(self._count)], dtype=torch.float64, device=device)])
        totals = trainer.strategy.reduce(totals, reduce_op="sum")  # every rank calls this hook
        self._sums, self._count = {}, 0
        return {f"train/{k}": round(float(totals[i] / totals[-1]), 6) for i, k in enumerate(keys)}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row: dict[str, Any] = {"epoch": trainer.current_epoch}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("val/", "test/")) or (key.endswith("_epoch") and not key.startswith("train/")):
                row[key.removesuffix("_epoch")] = round(float(value), 6)
        row.update(self._train_means(trainer))
        if trainer.optimizers:
            row["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        sums = {k: float(v) for k, v in self._sums.items()}  # float64 → float is exact
        return {"history": self.history, "sums": sums, "count": self._count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._sums = {k: torch.tensor(v, dtype=torch.float64) for k, v in state_dict.get("sums", {}).items()}
        self._count = int(state_dict.get("count", 0))


class Throughput(Callback):
    """Training images per second (all ranks together) and the mean step / data-wait time.

    Steps are timed from batch start to batch end (forward, backward, optimizer); data wait is the
    gap since the previous batch ended. The first `warmup` steps of the run are excluded.
    """

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.steps = 0
        self.images = 0
        self.step_time = 0.0
        self.data_time = 0.0
        self._start = 0.0
        self._prev_end: float | None = None
        self.per_device_batch: int | None = None
        self.world_size = 1

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prev_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.per_device_batch is None:  # what each rank really receives: global batch / world size
            self.per_device_batch = batch_size_of(batch)
            self.world_size = trainer.world_size
        self._start = self._now(trainer)
        self._data_gap = self._start - self._prev_end if self._prev_end is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end = self._now(trainer)
        self._prev_end = end
        self.steps += 1
        if self.steps <= self.warmup:
            return
        self.step_time += end - self._start
        if self._data_gap is not None:
            self.data_time += self._data_gap
        self.images += batch_size_of(batch) * trainer.world_size

    def summary(self) -> dict[str, float | None]:
        batch = {
            "per_device_batch": self.per_device_batch,
            "global_batch": self.per_device_batch * self.world_size if self.per_device_batch else None,
        }
        timed = max(self.steps - self.warmup, 0)
        if timed == 0:
            return {"throughput_img_s": None, "step_time_ms": None, "data_time_ms": None, **batch}
        return {
            **batch,
            "throughput_img_s": round(self.images / (self.step_time + self.data_time), 2),
            "step_time_ms": round(1000 * self.step_time / timed, 3),
            "data_time_ms": round(1000 * self.data_time / timed, 3),
        }
