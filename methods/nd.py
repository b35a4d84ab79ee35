"""Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction"
(arXiv 2305.17007; ECCV 2024) — the ND loss, KD++ and DKD++ (spec: shared/methods/nd.md; official
code WangYZ1608/Knowledge-Distillation-via-ND @ fc6f3f90, `CIFAR/utils.py::DirectNormLoss`).

The ND term pulls the student's penultimate embedding towards the direction of its class's teacher
class mean and, while the student's norm is below the teacher's, pushes the norm up. It is always
added to a logit KD loss: `kd++` and `dkd++` here, or any method registered with
`extensions=("nd",)` through `nd: {weight, warmup_epochs, warmup_nd, projector_init}`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from .base import DistillModule, FrozenTeacher
from .dkd import dkd_terms
from .errors import MethodError
from .kd import kd_loss
from .registry import Stage, StageContext, register, register_extension

#: augmentation seed of the class-mean pass: the means are a property of the teacher, not of a run seed
CLASS_MEANS_AUG_SEED = 0
PROJECTOR_INITS = ("cifar", "imagenet")


class ClassMeansMismatchError(MethodError):
    """A stored class-mean artifact was made from another teacher, data or transform."""


# -- the loss ------------------------------------------------------------------------------------
def nd_per_sample(student_emb: Tensor, teacher_emb: Tensor, class_means: Tensor, target: Tensor) -> Tensor:
    """Per-sample ND loss (nd.md §1; official `DirectNormLoss`), in float32:

        e_y = c_y / ‖c_y‖₂
        ℓ_b = 1 − ⟨s_b, e_y⟩ / max(‖s_b‖₂, ‖t_b‖₂)

    If ‖s‖ ≥ ‖t‖, ℓ = 1 − cos(s, c_y) (direction only); otherwise ℓ = 1 − (‖s‖/‖t‖)·cos(s, c_y),
    which also pushes ‖s‖ up towards ‖t‖. ℓ ∈ [0, 2]. The denominator is clamped below at 1e-12.
    `student_emb`, `teacher_emb`: (B, D); `class_means`: (K, D); `target`: (B,) int64.
    """
    if student_emb.ndim != 2 or student_emb.shape != teacher_emb.shape:
        raise MethodError(
            f"ND: student and teacher embeddings must both be (B, D), got {tuple(student_emb.shape)} and "
            f"{tuple(teacher_emb.shape)} (project the student to the teacher's width first)"
        )
    if class_means.ndim != 2 or class_means.shape[1] != student_emb.shape[1]:
        raise MethodError(f"ND: class means must be (K, {student_emb.shape[1]}), got {tuple(class_means.shape)}")
    s, t = student_emb.float(), teacher_emb.float()
    centres = class_means.float()[target]
    e_y = centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-12)
    denom = torch.maximum(s.norm(dim=1), t.norm(dim=1)).clamp_min(1e-12)
    return 1.0 - (s * e_y).sum(dim=1) / denom


def nd_loss(student_emb: Tensor, teacher_emb: Tensor, class_means: Tensor, target: Tensor) -> Tensor:
    """ND loss = (1/B) Σ_b ℓ_b (see `nd_per_sample`); the weight λ_nd is applied by the caller."""
    return nd_per_sample(student_emb, teacher_emb, class_means, target).mean()


def linear_warmup(epoch_index: int, warmup_epochs: int) -> float:
    """min(1, e / W) with a 0-based epoch index e (official ND scripts: 0 in the first epoch); 1 if W ≤ 0."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, epoch_index / warmup_epochs)


# -- class means ---------------------------------------------------------------------------------
def teacher_embedding(model: nn.Module, x: Tensor) -> Tensor:
    """The penultimate embedding, timm's convention: `forward_head(forward_features(x), pre_logits=True)`."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _batches(dataloader: Iterable) -> Iterable[tuple[Tensor, Tensor]]:
    for batch in dataloader:
        if isinstance(batch, Mapping):
            yield batch["image"], batch["label"]
        else:
            images, labels = batch[0], batch[1]
            yield images, labels


def mean_by_label(
    batches: Iterable[tuple[Tensor, Tensor]], rows: int, *, what: str, item: str, hint: str = ""
) -> Tensor:
    """(rows, D) float64 mean of the embeddings per label over `(embeddings, labels)` batches: sums and
    counts in float64, all-reduced when a process group is up; a label outside [0, rows), no batch at all or
    a row without any embedding is an error naming `what` (and the missing `item`s)."""
    sums: Tensor | None = None
    counts = torch.zeros(rows, dtype=torch.float64)
    for emb, labels in batches:
        if sums is None:
            sums = torch.zeros(rows, emb.shape[1], dtype=torch.float64, device=emb.device)
            counts = counts.to(emb.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= rows):
            raise MethodError(f"{what}: labels outside [0, {rows}) in the training data")
        sums.index_add_(0, labels, emb)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    if sums is None:
        raise MethodError(f"{what}: the dataloader yielded no batch")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise MethodError(f"{what}: no {item} of class(es) {empty[:10]}{hint}")
    return sums / counts[:, None]


def class_means(
    teacher: nn.Module | FrozenTeacher,
    dataloader: Iterable,
    num_classes: int | None = None,
    round_decimals: int | None = None,
) -> Tensor:
    """c_k = mean of the teacher's embeddings of the images labelled k, (K, D) float32 (nd.md §3).

    One pass; the teacher runs in eval mode under no_grad (an `nn.Module` gets its previous mode
    back). Sums and counts accumulate in float64 and are all-reduced when a process group is up (a
    loader that is not sharded counts every image world-size times: the means do not change).
    `round_decimals=4` reproduces the official script's rounding of every embedding and of the means.
    Batches are `{"image", "label"}` dicts or `(images, labels)` pairs.
    """
    frozen = isinstance(teacher, FrozenTeacher)
    model = teacher.model if frozen else teacher
    was_training = model.training
    num_classes = num_classes or getattr(model, "num_classes", None)
    if not num_classes:
        raise MethodError("class_means: pass num_classes (the teacher has no `num_classes` attribute)")
    model.eval()
    try:
        with torch.no_grad():
            param = next(iter(model.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")

            def embeddings():
                for images, labels in _batches(dataloader):
                    images, labels = images.to(device), labels.to(device).long()
                    emb = teacher.run(teacher_embedding, images) if frozen else teacher_embedding(model, images)
                    emb = emb.double()
                    yield (emb if round_decimals is None else torch.round(emb, decimals=round_decimals)), labels

            means = mean_by_label(
                embeddings(), num_classes, what="class_means", item="training image", hint="; every class needs one"
            )
    finally:
        model.train(was_training)
    if round_decimals is not None:
        means = torch.round(means, decimals=round_decimals)
    return means.float().cpu()


def _identity(batch: Any) -> Any:
    return batch


def train_pass_loader(datamodule) -> DataLoader:
    """Every training image once, in order, with the protocol's training augmentation (drawn with a
    fixed seed, so the means do not depend on the run seed), no mixup."""
    datamodule.setup()
    dataset = copy.copy(datamodule.train_set)  # shallow: shares the images
    dataset.seed = CLASS_MEANS_AUG_SEED
    sampler = BatchSampler(SequentialSampler(range(len(dataset))), datamodule.eval_batch_size, drop_last=False)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_identity, num_workers=datamodule.num_workers)


def class_means_identity(ctx: StageContext, transform: Mapping[str, Any], **extra: str) -> dict[str, str]:
    """What class means depend on — the teacher, the training split and how its images were `transform`ed
    (plus `extra` keys); a cached artifact is reused only if all of it matches."""
    info = ctx.teacher_info
    data = {"dataset": ctx.protocol["dataset"], "fingerprint": ctx.datamodule.fingerprint()}
    return {
        "teacher_arch": str(info.get("arch")),
        "teacher_sha256": str(info.get("checkpoint_sha256")),
        "data": json.dumps(data, sort_keys=True, default=list),
        "split": "train",
        "transform": json.dumps(dict(transform), sort_keys=True, default=list),
        **extra,
    }


def class_means_metadata(ctx: StageContext) -> dict[str, str]:
    """The classification pass's identity: the training augmentation with its fixed seed."""
    transform = {
        "augment": ctx.datamodule.augment_spec,
        "input": ctx.protocol["input"],
        "aug_seed": CLASS_MEANS_AUG_SEED,
    }
    return class_means_identity(ctx, transform)


def class_means_path(cache_dir: Path, meta: Mapping[str, str]) -> Path:
    key = hashlib.sha256(json.dumps(dict(meta), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{meta['teacher_arch']}.class_means-{key}.safetensors"


def save_class_means(path: Path, means: Tensor, meta: Mapping[str, str]) -> None:
    """Atomically (temporary file, rename) write the (K, D) means with their metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"class_means": means.contiguous()}, str(tmp), metadata=dict(meta))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_class_means(path: Path, expect: Mapping[str, str]) -> Tensor:
    """Load stored means, refusing them unless every metadata field equals `expect`'s."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            means = f.get_tensor("class_means")
    except Exception as exc:
        raise ClassMeansMismatchError(f"{path}: unreadable class-mean artifact ({type(exc).__name__}: {exc})") from None
    for key, value in expect.items():
        if meta.get(key) != value:
            raise ClassMeansMismatchError(
                f"{path}: class means were computed with {key} = {meta.get(key)!r}, but this run has {value!r} "
                f"(another teacher, data or transform); delete the file and rerun to recompute them"
            )
    return means


def cached_class_means(ctx: StageContext, meta: Mapping[str, str], compute: Callable[[], Tensor]) -> Tensor:
    """The class means artifact cached beside the teacher under `meta`, or `compute()` it and cache it (rank 0
    writes; every rank computes the same all-reduced means)."""
    if ctx.teacher is None:
        raise MethodError(f"method {ctx.method!r}: the class_means stage needs a teacher")
    path = class_means_path(ctx.cache_dir, meta)
    if path.is_file():
        return load_class_means(path, meta)
    means = compute()
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        save_class_means(path, means, meta)
    return means


def run_class_means_stage(ctx: StageContext) -> Tensor:
    """Stage `class_means`: reuse the artifact cached beside the teacher, or compute and cache it."""
    return cached_class_means(
        ctx,
        class_means_metadata(ctx),
        lambda: class_means(ctx.teacher, train_pass_loader(ctx.datamodule), num_classes=ctx.datamodule.num_classes),
    )


CLASS_MEANS = Stage("class_means", run_class_means_stage)


# -- the student projector -------------------------------------------------------------------------
class EmbProjector(nn.Sequential):
    """Official `EmbTrans`: BatchNorm1d(D_S) → Dropout(0.5) → Linear(D_S → D_T), used only by the ND term.

    Init (nd.md §2): BN weight 1, bias 0; Linear bias 0 with PyTorch's default weight ("cifar"), or
    Linear weight and bias N(0, 0.01) ("imagenet").
    """

    def __init__(self, d_student: int, d_teacher: int, init: str = "cifar"):
        if init not in PROJECTOR_INITS:
            raise MethodError(f"projector init must be one of {', '.join(PROJECTOR_INITS)}, got {init!r}")
        super().__init__(nn.BatchNorm1d(d_student), nn.Dropout(0.5), nn.Linear(d_student, d_teacher))
        bn, _, linear = self
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        if init == "cifar":
            nn.init.zeros_(linear.bias)
        else:
            nn.init.normal_(linear.weight, 0.0, 0.01)
            nn.init.normal_(linear.bias, 0.0, 0.01)


def embedding_width(model: nn.Module) -> int:
    head = model.get_classifier()
    return head.in_features if isinstance(head, nn.Linear) else int(model.num_features)


# -- the term, attachable to any logit method --------------------------------------------------------
@dataclass(frozen=True)
class NDSettings:
    weight: float = 1.0
    warmup_epochs: int = 0
    warmup_nd: bool = False
    projector_init: str = "cifar"


class _ClassifierInput:
    """Captures the input of `model.get_classifier()` during the first forward: the penultimate
    embedding the logits were computed from (no second forward, no change to the wrapped method)."""

    def __init__(self, model: nn.Module):
        self.head, self.value, self.handle = model.get_classifier(), None, None

    def _hook(self, module, inputs, output) -> None:
        if self.value is None:
            self.value = inputs[0]

    def __enter__(self) -> _ClassifierInput:
        self.handle = self.head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


class NDMixin:
    """Adds `λ_nd · f(e) · nd_loss(P(s), t, C, y)` to a method's `losses` (nd.md §4), where P is the
    projector (only when the widths differ) and f(e) = min(1, e/W) if `warmup_nd`, else 1.

    Needs the `class_means` stage's artifact. Student and teacher embeddings are the inputs of their
    classifiers in the wrapped method's own forwards.
    """

    mixed_labels = False  # ND's class means are indexed by the label

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = self.nd_settings()
        means = self.artifacts.get("class_means")
        if means is None:
            raise MethodError(f"method {self.method_name!r}: the ND term needs the class_means stage's artifact")
        self.register_buffer("nd_class_means", torch.as_tensor(means, dtype=torch.float32).clone(), persistent=False)
        d_s, d_t = embedding_width(self.student), int(means.shape[1])
        self.nd_projector = EmbProjector(d_s, d_t, settings.projector_init) if d_s != d_t else None

    def nd_settings(self) -> NDSettings:
        return NDSettings(**self.hp.nd)

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        with _ClassifierInput(self.student) as s_in, _ClassifierInput(self.teacher.model) as t_in:
            terms = super().losses(batch)
        if s_in.value is None:
            raise MethodError(f"method {self.method_name!r}: ND needs the student's forward through its classifier")
        # stored teacher logits (TEACHER_CACHE) skip the teacher forward: its embedding is then computed here
        t = t_in.value if t_in.value is not None else self.teacher.run(teacher_embedding, batch["image"])
        s = s_in.value if self.nd_projector is None else self.nd_projector(s_in.value)
        t, y = t.detach(), batch["label"]
        settings = self.nd_settings()
        per_sample = nd_per_sample(s, t, self.nd_class_means, y)
        factor = linear_warmup(self.current_epoch, settings.warmup_epochs) if settings.warmup_nd else 1.0
        with torch.no_grad():
            s32, t32 = s.float(), t.float()
            cos = nn.functional.cosine_similarity(s32, self.nd_class_means[y], dim=1)
            ratio = s32.norm(dim=1) / t32.norm(dim=1).clamp_min(1e-12)
        self.log_diagnostics({"nd": per_sample.mean().detach(), "nd_cos": cos.mean(), "nd_norm_ratio": ratio.mean()})
        terms["nd"] = factor * settings.weight * per_sample.mean()
        return terms


register_extension(
    "nd",
    defaults={"weight": 1.0, "warmup_epochs": 0, "warmup_nd": False, "projector_init": "cifar"},
    stages=(CLASS_MEANS,),
    mixin=NDMixin,
)


# -- KD++ and DKD++ ------------------------------------------------------------------------------------
class _FlatNDSettings:
    def nd_settings(self) -> NDSettings:
        hp = self.hp
        return NDSettings(hp.nd_weight, hp.warmup_epochs, hp.warmup_nd, hp.projector_init)


class KDWarmup(DistillModule):
    """L = CE + w_kd · min(1, e/W) · KD(T), e 0-based (the logit part of KD++)."""

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        logits_s = self.student(x)
        logits_t = self.teacher_logits(batch)
        factor = linear_warmup(self.current_epoch, self.hp.warmup_epochs)
        return {
            "ce": self.classification_loss(logits_s, y),
            "kd": factor * self.hp.kd_weight * kd_loss(logits_s, logits_t, self.hp.temperature),
        }


class DKDWarmup(DistillModule):
    """L = CE + min(1, e/W) · (α · TCKD + β · NCKD), e 0-based (the logit part of DKD++)."""

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        logits_s = self.student(x)
        logits_t = self.teacher_logits(batch)
        tckd, nckd = dkd_terms(logits_s, logits_t, y, self.hp.temperature)
        factor = linear_warmup(self.current_epoch, self.hp.warmup_epochs)
        return {
            "ce": self.classification_loss(logits_s, y),
            "dkd": factor * (self.hp.alpha * tckd + self.hp.beta * nckd).mean(),
        }


_ND_FLAT = {"nd_weight": 1.0, "warmup_epochs": 20, "warmup_nd": False, "projector_init": "cifar"}


@register("kd++", defaults={"temperature": 4.0, "kd_weight": 1.0, **_ND_FLAT}, stages=(CLASS_MEANS,))
class KDND(_FlatNDSettings, NDMixin, KDWarmup):
    """KD++: L = CE + w_kd · min(1, e/W) · KD(T) + λ_nd · nd_loss (nd.md §4)."""


@register("dkd++", defaults={"alpha": 1.0, "beta": 8.0, "temperature": 4.0, **_ND_FLAT}, stages=(CLASS_MEANS,))
class DKDND(_FlatNDSettings, NDMixin, DKDWarmup):
    """DKD++: L = CE + min(1, e/W) · DKD(α, β, T) + [min(1, e/W) if warmup_nd] · λ_nd · nd_loss (nd.md §4)."""
