"""Bai et al., "Masked Autoencoders Enable Efficient Knowledge Distillers", CVPR 2023 — DMAE
(spec: shared/methods/dmae.md; official code UCSC-VLAA/DMAE @ a0f4959, `models_mae_distill.py`).

Two stages: `distill` trains an MAE student on masked images with MAE's pixel loss plus a feature term
that aligns a projection of the student's intermediate block (on CLS + visible tokens) with the frozen
MAE teacher's block at the same relative depth, seen through the same mask; then the shared MAE
fine-tuner (`methods.mae.MAEFinetune`) fine-tunes the distilled encoder with labels. The teacher runs
only up to its aligned block (its later blocks cannot change the target); the FLOPs this saves are in
the run record under `stages.distill`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .base import DistillModule, FrozenTeacher
from .errors import MethodError
from .mae import (
    FINETUNE_DEFAULTS,
    MAEFinetune,
    MAEPretrain,
    check_mae_model,
    fit_encoder_stage,
    pretraining_schedule,
    run_subset,
)
from .mae_utils import aligned_block, masked_pixel_loss, patchify, random_masking
from .registry import Stage, StageContext, register

__all__ = ["DMAE", "DMAEDistill", "dmae_feature_loss", "masked_pixel_loss"]

PROJECTIONS = ("fc-1layer", "mlp-1layer")
DISTANCES = ("l1", "l2")


def dmae_feature_loss(student_feat_projected: Tensor, teacher_feat: Tensor, distance: str = "l1") -> Tensor:
    """DMAE's feature distillation term (paper Eq. 2; official `forward_loss` with `distill_loss='l1'`):

        L_feat = mean_{b,n,c} | ŝ_b,n,c − t̂_b,n,c |,   ŝ = s / max(‖s‖₂, ε),  t̂ = t / max(‖t‖₂, ε)

    with the L2 normalisation along the channel axis (ε = 1e-12, `F.normalize`) of the projected student
    tokens s and the teacher tokens t, both (B, N, D); `distance="l2"` takes the mean squared difference.
    The teacher side is detached and both are computed in float32.
    """
    if student_feat_projected.shape != teacher_feat.shape:
        raise MethodError(
            f"dmae_feature_loss: projected student {tuple(student_feat_projected.shape)} and teacher "
            f"{tuple(teacher_feat.shape)} features must have the same shape"
        )
    s = F.normalize(student_feat_projected.float(), dim=-1, eps=1e-12)
    t = F.normalize(teacher_feat.detach().float(), dim=-1, eps=1e-12)
    if distance == "l1":
        return (s - t).abs().mean()
    if distance == "l2":
        return (s - t).pow(2).mean()
    raise MethodError(f"dmae: unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")


DEFAULTS: dict[str, Any] = {
    "mask_ratio": 0.75,
    "student_blocks": None,  # None: aligned_block(student depth)
    "teacher_blocks": None,  # None: aligned_block(teacher depth)
    "projection": "fc-1layer",
    "distance": "l1",
    "norm_pix": False,
    "pixel_weight": 1.0,
    "feat_weight": 1.0,  # 0: plain MAE training of the student (the MAE-only arm; no teacher forward)
    # distill-stage recipe (official pretrain.sh: AdamW (0.9, 0.95), wd 0.05, warm-up then cosine to min_lr)
    "distill_epochs": 100,
    "distill_lr": 2.4e-3,
    "distill_warmup_epochs": 20,
    "distill_min_lr": 0.0,
    "distill_weight_decay": 0.05,
    **FINETUNE_DEFAULTS,
}


def _as_list(value: int | Sequence[int] | None, default: int) -> list[int]:
    if value is None:
        return [default]
    return [int(v) for v in ([value] if isinstance(value, int) else value)]


class DMAEDistill(DistillModule):
    """DMAE's distillation stage: L = w_pix·L_pix + w_feat·Σ_k L_feat,k on one shared mask per batch."""

    def __init__(self, student: nn.Module, teacher: FrozenTeacher | None, **kwargs):
        hp = {**DEFAULTS, **dict(kwargs.pop("hparams", None) or {})}
        self.needs_teacher = float(hp["feat_weight"]) > 0
        super().__init__(student, teacher, hparams=hp, **kwargs)
        check_mae_model(student, "dmae")
        if hp["projection"] not in PROJECTIONS:
            raise MethodError(f"dmae: unknown projection {hp['projection']!r}; valid: {', '.join(PROJECTIONS)}")
        if hp["distance"] not in DISTANCES:
            raise MethodError(f"dmae: unknown distance {hp['distance']!r}; valid: {', '.join(DISTANCES)}")
        if not 0.0 <= float(hp["mask_ratio"]) < 1.0:
            raise MethodError(f"dmae: mask_ratio must be in [0, 1), got {hp['mask_ratio']}")
        self.student_blocks = _as_list(hp["student_blocks"], aligned_block(len(student.blocks)))
        self.heads = nn.ModuleList()
        self.teacher_blocks: list[int] = []
        if self.needs_teacher:
            tmodel = teacher.model
            check_mae_model(tmodel, "dmae")
            self.teacher_blocks = _as_list(hp["teacher_blocks"], aligned_block(len(tmodel.blocks)))
            if len(self.teacher_blocks) != len(self.student_blocks):
                raise MethodError(
                    f"dmae: {len(self.student_blocks)} student block(s) but {len(self.teacher_blocks)} teacher block(s)"
                )
            for name, blocks, model in (
                ("student", self.student_blocks, student),
                ("teacher", self.teacher_blocks, tmodel),
            ):
                bad = [b for b in blocks if not 0 <= b < len(model.blocks)]
                if bad:
                    raise MethodError(f"dmae: {name} block(s) {bad} outside 0..{len(model.blocks) - 1}")
            if tmodel.patch_size != student.patch_size or tmodel.grid_size != student.grid_size:
                raise MethodError("dmae: teacher and student must share the patch grid (one mask for both)")
            # created after the MAE initialiser: PyTorch's default Linear init, as in the official model
            d_s, d_t = student.embed_dim, tmodel.embed_dim
            for _ in self.student_blocks:
                head = nn.Linear(d_s, d_t) if hp["projection"] == "fc-1layer" else Mlp(d_s, d_t, d_t, act_layer=nn.GELU)
                self.heads.append(head)
        student.requires_grad_(True)
        for p in (*student.classifier_parameters(), student.pos_embed, student.decoder_pos_embed):
            p.requires_grad_(False)

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        hp = self.hp
        noise = torch.rand(x.shape[0], self.student.patch_embed.num_patches, device=x.device)
        ids_keep, ids_restore, mask = random_masking(noise, float(hp.mask_ratio))
        indices = self.student_blocks if self.needs_teacher else []
        latent, feats = self.student.forward_masked(x, ids_keep, indices)
        pred, _ = self.student.forward_decoder(latent, ids_restore)
        pix = masked_pixel_loss(pred, patchify(x, self.student.patch_size), mask, bool(hp.norm_pix))
        terms = {"pix": float(hp.pixel_weight) * pix}
        if not self.needs_teacher:
            return terms
        targets = self.teacher.run(lambda m, v: teacher_features(m, v, ids_keep, self.teacher_blocks), x)
        for block, head, s, t in zip(self.student_blocks, self.heads, feats, targets, strict=True):
            loss = dmae_feature_loss(head(s), t, hp.distance)
            terms[f"feat_b{block}"] = float(hp.feat_weight) * loss
        return terms

    def configure_optimizers(self):
        hp = self.hp
        groups = param_groups_weight_decay(self, weight_decay=float(hp.distill_weight_decay))
        optimizer = torch.optim.AdamW(groups, lr=float(hp.distill_lr), betas=(0.9, 0.95))
        return MAEPretrain._with_scheduler(self, optimizer)


def teacher_features(model: nn.Module, x: Tensor, ids_keep: Tensor, blocks: Sequence[int]) -> list[Tensor]:
    """The teacher's pre-final-norm outputs of `blocks` on CLS + the visible tokens, running no later block."""
    _, feats = model.forward_masked(x, ids_keep, list(blocks), stop_early=True)
    return feats


def teacher_flops(model: nn.Module, x: Tensor, ids_keep: Tensor, blocks: Sequence[int] | None) -> int:
    """FLOPs (torch's counter, attention included) of one masked teacher pass: up to `blocks`, or all (None)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if blocks is None:
            model.forward_masked(x, ids_keep, [])
        else:
            teacher_features(model, x, ids_keep, blocks)
    return int(counter.get_total_flops())


def run_distill(ctx: StageContext) -> dict[str, Any]:
    """The distill stage: train the student with `DMAEDistill`, save its weights, report the teacher savings."""
    hp = dict(ctx.hparams)
    protocol = ctx.protocol
    epochs = int(hp["distill_epochs"])
    module = DMAEDistill(
        ctx.student,
        ctx.teacher,
        num_classes=ctx.datamodule.num_classes,
        hparams=hp,
        schedule=pretraining_schedule(hp, "distill"),
        epochs=epochs,
    )
    encoder, history = fit_encoder_stage(ctx, module, "distill", epochs)
    record: dict[str, Any] = {"epochs": epochs, "student_blocks": module.student_blocks}
    if history:
        record["final_train"] = {k: v for k, v in history[-1].items() if k.startswith("train/")}
    if module.needs_teacher:
        size = protocol["input"]["size"]
        x = torch.zeros(1, protocol["input"]["channels"], size, size)
        tmodel = ctx.teacher.model
        device = next(tmodel.parameters()).device
        ids_keep = random_masking(torch.rand(1, tmodel.patch_embed.num_patches), float(hp["mask_ratio"]))[0]
        full = teacher_flops(tmodel, x.to(device), ids_keep.to(device), None)
        cut = teacher_flops(tmodel, x.to(device), ids_keep.to(device), module.teacher_blocks)
        record.update(
            teacher_blocks=module.teacher_blocks,
            teacher_flops_full=full,
            teacher_flops_truncated=cut,
            teacher_flops_saved=round(1.0 - cut / full, 4) if full else None,
        )
    return {"encoder": str(encoder), "record": record}


@register("dmae", defaults=DEFAULTS, stages=(Stage("subset", run_subset), Stage("distill", run_distill)))
class DMAE(MAEFinetune):
    """DMAE: MAE + intermediate-feature distillation from an MAE teacher (distill), then MAE fine-tuning."""

    needs_teacher = True
