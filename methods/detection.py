"""Distillation for object detection (Faster R-CNN FPN, torchvision): `vanilla`, `kd` and ND's `kd++`
registered for `task: detection` protocols (spec: shared/methods/nd.md §4 "COCO"; official code
WangYZ1608/Knowledge-Distillation-via-ND `Detection/model/rcnn.py`, Detectron2).

Both distillation terms act on the ROI head's **sampled proposals of the student** (the sampler's boxes
with their assigned classes, background = 0 included): the teacher's box head runs on the same boxes
with its own backbone/FPN features. With z the (R, K+1) box-classifier logits and e the (R, D) box-head
embeddings of the R sampled proposals of the batch:

    L = L_rpn_cls + L_rpn_box + L_cls + L_box                     (Faster R-CNN, torchvision's losses)
      + w_kd · kd_loss(z_S, z_T, T)                               (`kd`, `kd++`; T = 1 on COCO)
      + λ_nd · nd_loss(P(e_S), e_T, C, y)                         (`kd++`; C: (K+1, D) class means)

`kd_loss` and `nd_loss` are the classification methods' pure functions (methods/kd.py, methods/nd.py),
applied with the proposals as the batch. P is ND's projector when the box-head widths differ.

Batches are `(list of CHW float images in [0, 1], list of torchvision targets)` (datasets/coco.py). The
test metric is COCOeval's AP, AP50, AP75, APs, APm, APl (percent) on the evaluation split.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import fastrcnn_loss

from .base import DistillModule, FrozenTeacher
from .errors import MethodError
from .kd import kd_loss
from .nd import EmbProjector, cached_class_means, class_means_identity, mean_by_label, nd_loss
from .registry import Stage, StageContext, register

#: RNG seed of the class-means pass's proposal sampling: the means are a property of the teacher
CLASS_MEANS_SAMPLE_SEED = 0
#: metric names as logged and recorded (percent), in COCOeval's order
AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# -- pure losses -----------------------------------------------------------------------------------
def roi_kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KD on the box classifier of R sampled proposals (ND's Detectron2 `rcnn.py`, T = 1):

        L_kd = (1/R) Σ_r T² · Σ_{k=0..K} p_T[r,k] · (log p_T[r,k] − log p_S[r,k]),  p = softmax(z / T)

    over the K + 1 classes (background included). This is `methods.kd.kd_loss` with the proposals as the
    batch; `logits_*`: (R, K+1)."""
    if logits_student.ndim != 2 or logits_student.shape != logits_teacher.shape:
        raise MethodError(
            f"ROI KD: student and teacher logits must both be (R, K+1), got {tuple(logits_student.shape)} and "
            f"{tuple(logits_teacher.shape)}"
        )
    return kd_loss(logits_student, logits_teacher, temperature)


def roi_nd_loss(emb_student: Tensor, emb_teacher: Tensor, class_means: Tensor, labels: Tensor) -> Tensor:
    """ND on the box-head embeddings of R sampled proposals (nd.md §1 and §4 "COCO"):

        e_y = c_y / ‖c_y‖₂,  ℓ_r = 1 − ⟨s_r, e_y⟩ / max(‖s_r‖₂, ‖t_r‖₂),  L_nd = (1/R) Σ_r ℓ_r

    with y ∈ {0 (background), 1..K} the sampler's label of proposal r and C the (K+1, D) class means.
    This is `methods.nd.nd_loss` with the proposals as the batch."""
    if labels.ndim != 1 or labels.shape[0] != emb_student.shape[0]:
        n = emb_student.shape[0]
        raise MethodError(f"ROI ND: labels must be (R,) for {n} proposals, got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= class_means.shape[0]):
        raise MethodError(f"ROI ND: labels outside 0..{class_means.shape[0] - 1} (K+1 class means incl. background)")
    return nd_loss(emb_student, emb_teacher, class_means, labels)


# -- detector passes (torchvision's Faster R-CNN, opened up) -----------------------------------------
@dataclass
class RoiPass:
    """The student's training pass: sampled proposals (in the transformed images' coordinates), their
    labels, box-head embeddings and classifier outputs, and the four detector losses."""

    image_sizes: list[tuple[int, int]]
    proposals: list[Tensor]
    labels: Tensor  # (R,) 0 = background
    embeddings: Tensor  # (R, D)
    class_logits: Tensor  # (R, K+1)
    losses: dict[str, Tensor]


def student_roi_pass(model: nn.Module, images: Sequence[Tensor], targets: Sequence[dict]) -> RoiPass:
    """What `model(images, targets)` computes in training (torchvision's GeneralizedRCNN + RoIHeads), with
    the sampled proposals and box-head embeddings kept for distillation."""
    targets = [{k: v for k, v in t.items() if k in ("boxes", "labels")} for t in targets]
    image_list, targets = model.transform(list(images), targets)
    features = model.backbone(image_list.tensors)
    proposals, rpn_losses = model.rpn(image_list, features, targets)
    roi = model.roi_heads
    proposals, _, labels, regression_targets = roi.select_training_samples(proposals, targets)
    emb = roi.box_head(roi.box_roi_pool(features, proposals, image_list.image_sizes))
    class_logits, box_regression = roi.box_predictor(emb)
    loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    losses = {
        "rpn_cls": rpn_losses["loss_objectness"],
        "rpn_box": rpn_losses["loss_rpn_box_reg"],
        "cls": loss_cls,
        "box": loss_box,
    }
    return RoiPass(list(image_list.image_sizes), proposals, torch.cat(labels), emb, class_logits, losses)


def scale_boxes(boxes: Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> Tensor:
    """xyxy boxes of an image resized from (h, w) `from_size` to `to_size`."""
    (h0, w0), (h1, w1) = from_size, to_size
    factor = torch.tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0], dtype=boxes.dtype, device=boxes.device)
    return boxes * factor


def teacher_roi_outputs(
    model: nn.Module, images: Sequence[Tensor], proposals: Sequence[Tensor], sizes: Sequence[tuple[int, int]]
) -> tuple[Tensor, Tensor]:
    """(box-head embeddings, classifier logits) of the teacher on the student's proposals: the teacher's own
    transform, backbone and FPN; the boxes rescaled when its transform resized the images differently."""
    image_list, _ = model.transform(list(images))
    features = model.backbone(image_list.tensors)
    boxes = [
        p if tuple(s) == tuple(t) else scale_boxes(p, s, t)
        for p, s, t in zip(proposals, sizes, image_list.image_sizes, strict=True)
    ]
    roi = model.roi_heads
    emb = roi.box_head(roi.box_roi_pool(features, boxes, image_list.image_sizes))
    logits, _ = roi.box_predictor(emb)
    return emb, logits


def box_head_width(model: nn.Module) -> int:
    return int(model.roi_heads.box_predictor.cls_score.in_features)


# -- the module ------------------------------------------------------------------------------------
class DetectionDistillModule(DistillModule):
    """Base of the detection methods: `losses((images, targets))` returns the weighted terms (the base sums,
    checks and logs them); evaluation runs the student detector on the evaluation split and computes
    COCOeval's metrics against the split's pycocotools ground truth (`coco_gt`, or the datamodule's
    `val_set.coco`)."""

    task = "detection"

    def __init__(self, student: nn.Module, teacher: FrozenTeacher | None = None, *, coco_gt=None, **kwargs):
        for key in ("label_smoothing", "mixup"):
            if kwargs.get(key):
                raise MethodError(f"detection methods take no {key}")
            kwargs.pop(key, None)
        super().__init__(student, teacher, **kwargs)
        self.coco_gt = coco_gt
        self._detections: dict[int, dict[str, Tensor]] = {}

    @staticmethod
    def _make_metrics(num_classes: int) -> nn.ModuleDict:
        return nn.ModuleDict()  # COCOeval, not torchmetrics

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, _ = batch
        self._batch_size = len(images)
        return self.optimise(self.losses(batch))

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, targets = batch
        for target, det in zip(targets, self.student(list(images)), strict=True):
            self._detections[int(target["image_id"])] = {k: v.detach().cpu() for k, v in det.items()}

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx)

    def _log_eval_metrics(self) -> None:
        from ..datasets.coco_eval import coco_metrics

        detections, self._detections = self._detections, {}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, detections)
            detections = {k: v for part in parts for k, v in part.items()}
        coco_gt = self.coco_gt
        if coco_gt is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            coco_gt = getattr(getattr(datamodule, "val_set", None), "coco", None)
        if coco_gt is None:
            raise MethodError("detection evaluation needs the split's COCO ground truth (coco_gt)")
        metrics = coco_metrics(coco_gt, detections)
        for name, value in metrics.items():
            self.log(f"test/{name}", 100.0 * value, prog_bar=(name == "AP"), sync_dist=False)

    def reference_loss(self, batch) -> Tensor:
        """The detector's own four losses (the vanilla student's step), for the cost overhead ratio."""
        return sum(self.student_pass(batch).losses.values())

    def student_pass(self, batch) -> RoiPass:
        images, targets = batch
        return student_roi_pass(self.student, images, targets)

    def teacher_pass(self, batch, roi: RoiPass) -> tuple[Tensor, Tensor]:
        images, _ = batch
        return self.teacher.run(lambda m, x: teacher_roi_outputs(m, x, roi.proposals, roi.image_sizes), list(images))

    def on_train_epoch_start(self) -> None:
        if self.teacher is not None:
            self.teacher.model.eval()


@register("vanilla", needs_teacher=False, task="detection")
class DetectionVanilla(DetectionDistillModule):
    """Vanilla detector: Faster R-CNN's four losses (RPN objectness and boxes, box classifier and regression)."""

    needs_teacher = False
    is_reference_student = True

    def losses(self, batch) -> dict[str, Tensor]:
        return self.student_pass(batch).losses


@register("kd", defaults={"temperature": 1.0, "kd_weight": 1.0}, task="detection")
class DetectionKD(DetectionDistillModule):
    """KD on the ROI classifier: detector losses + w_kd · kd_loss(z_S, z_T, T) on the student's sampled proposals."""

    def losses(self, batch) -> dict[str, Tensor]:
        roi = self.student_pass(batch)
        _, logits_t = self.teacher_pass(batch, roi)
        return {**roi.losses, "kd": self.hp.kd_weight * roi_kd_loss(roi.class_logits, logits_t, self.hp.temperature)}


# -- ND's class means for detection (nd.md §4 "COCO") -----------------------------------------------
def detection_class_means(
    teacher: nn.Module | FrozenTeacher, batches: Iterable, num_classes: int, seed: int = CLASS_MEANS_SAMPLE_SEED
) -> Tensor:
    """(K+1, D) means of the teacher's box-head embeddings per assigned class, background (0) included.

    One pass, teacher in eval mode under no_grad (an `nn.Module` gets its previous mode back): per image,
    the teacher's own RPN proposals plus the ground-truth boxes, labelled by the ROI head's matcher (IoU ≥ 0.5
    foreground, else background) and sampled by its sampler (torchvision: 512 per image, 25 % foreground) with
    a fixed RNG seed. Sums and counts in float64, all-reduced under DDP; a class never sampled is an error.
    `batches` yields `(images, targets)`; `num_classes` = K foreground classes."""
    model = teacher.model if isinstance(teacher, FrozenTeacher) else teacher
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            device = next(model.parameters()).device
            roi = model.roi_heads

            def embeddings():
                for images, targets in batches:
                    images = [im.to(device) for im in images]
                    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
                    image_list, targets = model.transform(images, targets)
                    features = model.backbone(image_list.tensors)
                    proposals, _ = model.rpn(image_list, features)
                    proposals, _, labels, _ = roi.select_training_samples(proposals, targets)
                    emb = roi.box_head(roi.box_roi_pool(features, proposals, image_list.image_sizes)).double()
                    yield emb, torch.cat(labels)

            means = mean_by_label(
                embeddings(),
                num_classes + 1,
                what="detection class means",
                item="sampled proposal",
                hint=" (0 = background)",
            )
    finally:
        model.train(was_training)
    return means.float().cpu()


def run_detection_class_means(ctx: StageContext) -> Tensor:
    """Stage `class_means` on a detection protocol: the cached (K+1, D) artifact beside the teacher, or one
    pass over the training split (`ctx.datamodule.train_pass_loader()`: every image once, no augmentation)."""
    transform = {"input": ctx.protocol["input"], "sample_seed": CLASS_MEANS_SAMPLE_SEED, "proposals": "teacher+gt"}
    return cached_class_means(
        ctx,
        class_means_identity(ctx, transform, task="detection"),
        lambda: detection_class_means(ctx.teacher, ctx.datamodule.train_pass_loader(), ctx.datamodule.num_classes),
    )


DETECTION_CLASS_MEANS = Stage("class_means", run_detection_class_means)


@register(
    "kd++",
    defaults={"temperature": 1.0, "kd_weight": 1.0, "nd_weight": 1.5, "projector_init": "imagenet"},
    stages=(DETECTION_CLASS_MEANS,),
    task="detection",
)
class DetectionKDND(DetectionKD):
    """KD++ on detection: detector losses + w_kd · ROI KD(T) + λ_nd · ROI ND against the teacher's (K+1)
    box-head class means (R101 → R18 official weights: w_kd 1.0, λ_nd 1.5, T = 1)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        means = self.artifacts.get("class_means")
        if means is None:
            raise MethodError(f"method {self.method_name!r}: ND needs the class_means stage's artifact")
        means = torch.as_tensor(means, dtype=torch.float32)
        if means.shape[0] != self.num_classes + 1:
            raise MethodError(
                f"method {self.method_name!r}: {means.shape[0]} class means for {self.num_classes} classes; "
                "detection needs K + 1 (background first)"
            )
        self.register_buffer("nd_class_means", means.clone(), persistent=False)
        d_s, d_t = box_head_width(self.student), int(means.shape[1])
        self.nd_projector = EmbProjector(d_s, d_t, self.hp.projector_init) if d_s != d_t else None

    def losses(self, batch) -> dict[str, Tensor]:
        roi = self.student_pass(batch)
        emb_t, logits_t = self.teacher_pass(batch, roi)
        s = roi.embeddings if self.nd_projector is None else self.nd_projector(roi.embeddings)
        return {
            **roi.losses,
            "kd": self.hp.kd_weight * roi_kd_loss(roi.class_logits, logits_t, self.hp.temperature),
            "nd": self.hp.nd_weight * roi_nd_loss(s, emb_t.detach(), self.nd_class_means, roi.labels),
        }


__all__ = [
    "AP_METRICS",
    "DetectionDistillModule",
    "DetectionKD",
    "DetectionKDND",
    "DetectionVanilla",
    "RoiPass",
    "detection_class_means",
    "roi_kd_loss",
    "roi_nd_loss",
    "run_detection_class_means",
    "student_roi_pass",
    "teacher_roi_outputs",
]
