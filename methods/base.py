"""The shared LightningModule of every distillation method, and the frozen-teacher holder.

A method subclasses `DistillModule` and implements `losses(batch) -> dict[str, Tensor]` returning
the *weighted* terms; the base sums them, logs each, stops on a non-finite loss, builds the
optimizer and schedule from the protocol, and measures top-1/top-5 with torchmetrics on the
held-out validation split (dataloader 0) and the test split (dataloader 1) after every epoch.

Batches are dicts: `image` (B, C, H, W) float, `label` (B,) int64, `index` (B,) int64. With the
protocol's `mixup` (timm's Mixup/CutMix, applied once per training batch before `losses`, so teacher
and student see the same tensor) `label` becomes (B, K) soft targets, label smoothing included; only
methods with `mixed_labels = True` accept them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .errors import MethodError, NonFiniteLossError
from .mixing import build_mixup
from .optim import build_optimizer, build_scheduler, step_scheduler

EVAL_SPLITS = ("val", "test")


class _Renormalize(nn.Module):
    """x_teacher = (x · std_in + mean_in − mean_t) / std_t, as one affine map per channel."""

    def __init__(self, mean_in: Sequence[float], std_in: Sequence[float], mean_t, std_t):
        super().__init__()
        m_in, s_in = torch.tensor(mean_in), torch.tensor(std_in)
        m_t, s_t = torch.tensor(mean_t), torch.tensor(std_t)
        self.register_buffer("scale", (s_in / s_t).view(1, -1, 1, 1))
        self.register_buffer("shift", ((m_in - m_t) / s_t).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


def released(value: Any) -> Any:
    """`value` with every inference-mode tensor (in tuples, lists and dicts too) replaced by an ordinary
    copy, which autograd may save for a backward pass; anything else is returned as it is."""
    if isinstance(value, Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, tuple | list):
        items = [released(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)((k, released(v)) for k, v in value.items())
    return value


class FrozenTeacher:
    """A teacher network that can never train.

    Deliberately *not* an `nn.Module`: held outside the method module's tree, it is absent from
    `parameters()`, `state_dict()` (checkpoints store its path and sha256 instead), DDP's
    parameter list and `train()`. It is moved with the module through `DistillModule._apply`.
    Every call runs in eval mode under `torch.inference_mode()` (no autograd bookkeeping at all: no
    version counters, no graph) and re-normalises the student's batch to the teacher's own mean/std
    when they differ (heterogeneous pairs). Inference tensors may not be saved for the student's
    backward, so the tensors `run` returns are converted to ordinary (frozen) ones on the way out: a
    copy of what the caller receives (logits, features), small next to the forward.
    `to_channels_last()` stores a conv teacher's weights and takes its inputs in NHWC (the runner does
    it on CUDA, where cuDNN's NHWC kernels are the fast path, in bf16 above all).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        info: Mapping[str, Any] | None = None,
        input_stats: tuple[Sequence[float], Sequence[float]] | None = None,
        teacher_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.info = dict(info or {})
        self.renorm: nn.Module | None = None
        self.channels_last = False
        if input_stats and teacher_stats and tuple(map(tuple, input_stats)) != tuple(map(tuple, teacher_stats)):
            self.renorm = _Renormalize(*input_stats, *teacher_stats)

    def _apply(self, fn: Callable) -> None:
        self.model._apply(fn)
        if self.renorm is not None:
            self.renorm._apply(fn)

    def to_channels_last(self) -> FrozenTeacher:
        """NHWC weights and inputs for a teacher with 2-d convolutions (a no-op for one without)."""
        if any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            self.model.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self

    def prepare(self, x: Tensor) -> Tensor:
        if self.model.training:  # someone called train() on it: put it back
            self.model.eval()
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.renorm(x) if self.renorm is not None else x

    def run(self, fn: Callable[[nn.Module, Tensor], Any], x: Tensor) -> Any:
        """`fn(model, x)` on the prepared batch, frozen: e.g. `lambda m, x: m.forward_intermediates(x)`."""
        with torch.inference_mode():
            out = fn(self.model, self.prepare(x))
        return released(out)

    def logits(self, x: Tensor) -> Tensor:
        return self.run(lambda m, v: m(v), x)

    def embedding_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Penultimate embedding (`forward_head(pre_logits=True)`) and logits, in one pass."""

        def fn(m: nn.Module, v: Tensor) -> tuple[Tensor, Tensor]:
            emb = m.forward_head(m.forward_features(v), pre_logits=True)
            return emb, m.get_classifier()(emb)

        return self.run(fn, x)


class DistillModule(L.LightningModule):
    """Base of every method: subclasses implement `losses(batch)`.

    Trainable adapters (projectors, branch heads) are submodules of the subclass, so they train
    with the student and DDP never needs `find_unused_parameters`; `adapter_parameters()` counts
    them apart from the student's own.
    """

    method_name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    #: the student trained alone: the denominator of every overhead ratio (1 by definition)
    is_reference_student: ClassVar[bool] = False
    #: "labelled": the protocol's training split; "pool": an unlabelled web pool (datasets/webproxy.py)
    train_data: ClassVar[str] = "labelled"
    #: whether `losses` accepts (B, K) soft labels (mixup/cutmix); others need class indices
    mixed_labels: ClassVar[bool] = False

    def __init__(
        self,
        student: nn.Module,
        teacher: FrozenTeacher | None = None,
        *,
        num_classes: int,
        hparams: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        epochs: int = 1,
        label_smoothing: float = 0.0,
        artifacts: Mapping[str, Any] | None = None,
        mixup: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise MethodError(f"method {self.method_name!r} needs a teacher")
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # outside the module tree, on purpose
        self.num_classes = num_classes
        self.hp = SimpleNamespace(**dict(hparams or {}))
        self.optimizer_spec = dict(optimizer or {"name": "sgd", "lr": 0.1})
        self.schedule_spec = dict(schedule or {"name": "constant"})
        self.epochs = epochs
        self.artifacts = dict(artifacts or {})
        self.label_smoothing = label_smoothing
        self.mixup = build_mixup(mixup, num_classes, label_smoothing) if mixup else None
        if self.mixup is not None and not self.mixed_labels:
            raise MethodError(
                f"method {self.method_name!r} needs class-index labels, but this protocol pair trains with "
                "mixup/cutmix (soft labels); use a method that accepts them (vanilla, kd, ofa) or another pair"
            )
        self._batch_size = 1
        self._updated_splits: set[str] = set()
        self.eval_metrics = nn.ModuleDict({split: self._make_metrics(num_classes) for split in EVAL_SPLITS})

    @staticmethod
    def _make_metrics(num_classes: int) -> MetricCollection:
        metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
        if num_classes >= 5:
            metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        return MetricCollection(metrics)

    # -- the method contract -------------------------------------------------------------------
    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return the weighted loss terms whose sum is optimised."""
        raise NotImplementedError

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The protocol's criterion on student logits (CE, optionally label-smoothed), in float32; with
        (B, K) mixed labels, soft-target CE −Σ_k y_k log p_k (timm's SoftTargetCrossEntropy: the
        smoothing is already in the targets)."""
        if labels.dim() == 2:
            return -(labels.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def teacher_logits(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The teacher's logits for this batch: stored ones when the batch carries them (the soft-label
        store's teacher cache, `TEACHER_CACHE=1`: no teacher forward), else the frozen teacher, live."""
        if "teacher_logits" in batch:
            return batch["teacher_logits"]
        return self.teacher.logits(batch["image"])

    def log_diagnostics(self, values: Mapping[str, Tensor | float]) -> None:
        """Unweighted terms and other per-step quantities, logged under `diag/`."""
        for key, value in values.items():
            self.log(f"diag/{key}", value, on_step=False, on_epoch=True, batch_size=self._batch_size)

    def deployed_model(self) -> nn.Module:
        """What is deployed after distillation (its params/FLOPs go in the record): the student by default."""
        return self.student

    def reference_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The student-only training loss on `batch`, the step the cost overhead ratio times a method against:
        CE on the student's logits. Unlabelled (web-pool) batches carry label −1, and any class times the same
        step; a student with several heads (G2SD's distillation token: (class, dist) logits) is timed on its
        class head."""
        out = self.student(batch["image"])
        logits = out[0] if isinstance(out, tuple | list) else out
        return F.cross_entropy(logits, batch["label"].clamp_min(0))

    def adapter_parameters(self) -> list[nn.Parameter]:
        student_ids = {id(p) for p in self.student.parameters()}
        return [p for p in self.parameters() if id(p) not in student_ids]

    def adapter_inputs(self, x: Tensor) -> list[tuple[nn.Module, Tensor]]:
        """Each training-only adapter with the tensor it takes when the student sees images `x`, so the
        cost code counts adapter FLOPs apart from the student's. A method with adapters that leaves this
        empty gets no adapter FLOPs (unknown, never 0)."""
        return []

    # -- Lightning hooks -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn)
        return module

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        self._batch_size = int(batch["image"].shape[0])
        if self.mixup is not None:
            batch = self.mixup(batch, step=self.global_step, rank=self.global_rank)
        return self.optimise(self.losses(batch))

    def optimise(self, terms: Mapping[str, Tensor]) -> Tensor:
        """The training loss from the step's weighted terms: their sum, checked finite, each term logged."""
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                self.global_step, self.current_epoch, {k: float(v.detach()) for k, v in terms.items()}
            )
        # the step's terms, for callbacks that keep exact (resumable, all-rank) epoch means
        self.last_terms = {**{k: v.detach() for k, v in terms.items()}, "loss": loss.detach()}
        for key, value in terms.items():
            self.log(f"train/{key}", value.detach(), on_step=True, on_epoch=True, batch_size=self._batch_size)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=self._batch_size)
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, EVAL_SPLITS[dataloader_idx])

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Mapping[str, Tensor], split: str) -> None:
        logits = self.student(batch["image"])
        self.eval_metrics[split].update(logits, batch["label"])
        self._updated_splits.add(split)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics()

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics()

    def _log_eval_metrics(self) -> None:
        for split in sorted(self._updated_splits):
            metrics = self.eval_metrics[split]
            for name, value in metrics.compute().items():  # torchmetrics syncs across ranks here
                self.log(f"{split}/{name}", 100.0 * value, prog_bar=(name == "top1"), sync_dist=False)
            metrics.reset()
        self._updated_splits.clear()

    def configure_optimizers(self):
        optimizer = build_optimizer(self, self.optimizer_spec)
        interval = self.schedule_spec.get("interval", "epoch")
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max(self.trainer.max_epochs, 1))
        scheduler = build_scheduler(optimizer, self.schedule_spec, self.epochs, steps_per_epoch)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        step_scheduler(
            scheduler,
            interval=self.schedule_spec.get("interval", "epoch"),
            finished_epoch=self.current_epoch,
            global_step=self.global_step,
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.train_data == "pool" and datamodule is not None and not hasattr(datamodule, "pool_loader"):
            raise MethodError(
                f"method {self.method_name!r} trains on an unlabelled web pool, which dataset "
                f"{getattr(datamodule, 'name', '?')!r} does not have; use PROTOCOL=webproxy or webproxy-digits"
            )

    def on_train_epoch_start(self) -> None:
        if self.teacher is not None:
            self.teacher.model.eval()
