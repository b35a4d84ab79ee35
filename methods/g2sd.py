"""G2SD — Huang et al., "Generic-to-Specific Distillation of Masked Autoencoders", CVPR 2023.

Two stages (../shared/methods/g2sd.md), checked against the official code `pengzhiliang/G2SD` @ 6146adf:

* **generic** (task-agnostic): the student MAE's last decoder block, through an MLP head, regresses the
  hidden state of an intermediate block of a frozen MAE teacher's *decoder*, over all tokens (CLS +
  visible + masked), on one random mask shared by both — `generic_loss`;
* **specific** (task-specific): the GD encoder is fine-tuned with a DeiT distillation token whose head
  learns the fine-tuned teacher's hard labels — `specific_loss` (or NKD on the CLS head, `nkd_loss`).

The registered method `g2sd` runs the stages `subset` (the small protocols' fixed training subset),
`specific_teacher` (hands on the second teacher, an extra teacher of the run named by the hyper-parameter
`specific_teacher`: the MAE teacher fine-tuned with labels, teacher kind `ft`, `<arch>.ft` beside the pair's
`<arch>.mae`), `generic` (`G2SDGeneric`, saves the student) and then trains
the specific stage (`G2SD`, a subclass of the shared MAE fine-tuner). The paper's arms are hyper-parameters:
`specific=none` is GD + plain fine-tuning, `generic=false` is SD only (student from scratch or
`init_checkpoint`), `specific=nkd` the official `--enable_nkd` option.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

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
from .mae_utils import random_masking, require_decoder
from .registry import Stage, StageContext, register

__all__ = [
    "G2SD",
    "DistTokenViT",
    "G2SDGeneric",
    "generic_loss",
    "nkd_loss",
    "specific_loss",
    "teacher_decoder_hidden",
]

#: smooth-L1 threshold and LayerNorm eps of the generic stage (official `engine_distill.py`, `models_mae.py`)
SMOOTH_L1_BETA = 2.0
TARGET_LN_EPS = 1e-6


def normalized_smooth_l1(student: Tensor, teacher: Tensor, beta: float = SMOOTH_L1_BETA, eps: float = TARGET_LN_EPS):
    """Smooth-L1 (threshold β) between `student` and the non-affine LayerNorm of `teacher` over the last axis,
    mean over all elements; float32. Per element, with d = s − LN(t):

        ℓ(d) = 0.5·d²/β  if |d| < β,  else  |d| − 0.5·β

    The recipe shared by G2SD's generic stage and Feature Distillation (Wei et al. 2022), which Hybrid
    Distill's feature term follows.
    """
    if student.shape != teacher.shape:
        raise MethodError(f"prediction {tuple(student.shape)} and target {tuple(teacher.shape)} differ in shape")
    target = F.layer_norm(teacher.detach().float(), teacher.shape[-1:], eps=eps)
    return F.smooth_l1_loss(student.float(), target, beta=beta)


def generic_loss(student_pred: Tensor, teacher_hidden: Tensor) -> Tensor:
    """G2SD generic distillation (paper Eq. 2; official `engine_distill.py` with `supervise_all`):

        L_GD = mean_{b,n,c} smoothL1_β=2( H(D_S(x, M))_{b,n,c},  LN(D_T^{(l)}(x, M))_{b,n,c} )

    `student_pred` (B, N, D): the student's last decoder block (no decoder norm) through the MLP head H;
    `teacher_hidden` (B, N, D): output of teacher decoder block l (1-based, no decoder norm), N = 1 + L
    (CLS, visible and mask tokens); LN is LayerNorm without affine parameters, eps 1e-6.
    """
    return normalized_smooth_l1(student_pred, teacher_hidden)


def soft_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """−(1/B) Σ_b Σ_k q[b,k]·log_softmax(z)[b,k] (timm's `SoftTargetCrossEntropy`), float32."""
    return -(soft_targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def specific_loss(cls_logits: Tensor, dist_logits: Tensor, soft_targets: Tensor, teacher_logits: Tensor) -> Tensor:
    """G2SD specific distillation for classification = DeiT hard distillation (Touvron et al. 2021, Eq. 3;
    official `engine_finetune_dis.py`):

        L_SD = ½ · [ −(1/B) Σ_b Σ_k q[b,k]·log softmax(z_cls)[b,k]  +  CE(z_dist, argmax_k z_T) ]

    q: the mixed, label-smoothed targets (B, K) (an int label vector is taken as one-hot); no temperature.
    """
    if soft_targets.dim() == 1:
        soft_targets = F.one_hot(soft_targets.long(), cls_logits.shape[-1])
    hard_teacher = teacher_logits.detach().argmax(dim=-1)
    return 0.5 * (soft_cross_entropy(cls_logits, soft_targets) + F.cross_entropy(dist_logits.float(), hard_teacher))


def nkd_loss(
    logits_student: Tensor, logits_teacher: Tensor, target: Tensor, temperature: float = 1.0, alpha: float = 1.0
) -> Tensor:
    """NKD (Yang et al., "Rethinking Knowledge Distillation via Cross-Entropy", 2023; G2SD `--enable_nkd`):

        L = −(1/B) Σ_b p_T,g · log p_S,g  −  α·T²·(1/B) Σ_b Σ_{k≠g} p̂_T,k · log p̂_S,k

    g = argmax of the target row (int labels are used as they are), p = softmax(z), and p̂ the non-target
    distribution: softmax(z/T) over the classes k ≠ g (the target entry masked by index, which equals the
    official renormalisation by 1 − its near-zero target entry after subtracting 1000 from it).
    """
    s, t = logits_student.float(), logits_teacher.detach().float()
    g = (target.argmax(dim=-1) if target.dim() > 1 else target).long().view(-1, 1)
    p_s_g = F.softmax(s, dim=-1).gather(1, g)
    p_t_g = F.softmax(t, dim=-1).gather(1, g)
    target_loss = -(p_t_g * torch.log(p_s_g)).mean()
    on_target = torch.zeros_like(s, dtype=torch.bool).scatter_(1, g, True)
    temp = float(temperature)
    log_q_s = F.log_softmax((s / temp).masked_fill(on_target, float("-inf")), dim=-1)
    q_t = F.softmax((t / temp).masked_fill(on_target, float("-inf")), dim=-1)
    non_target = (q_t * log_q_s.masked_fill(on_target, 0.0)).sum(dim=-1).mean()
    return target_loss - alpha * temp * temp * non_target


class DistTokenViT(nn.Module):
    """A timm-style ViT with DeiT's distillation token (G2SD specific stage; official `models_vit.py`).

    The token, one (1, 1, D) parameter (trunc-normal std 0.02), is appended at the **end** of the sequence
    after the positional embedding was added (it has none); `head_dist` reads it after the final norm.
    Training returns (cls_logits, dist_logits); eval returns their mean. The wrapped ViT must pool its CLS
    token (`global_pool="token"`, the official `global_pool=False`).
    """

    def __init__(self, vit: nn.Module, num_classes: int | None = None):
        super().__init__()
        if getattr(vit, "global_pool", "token") != "token":
            raise MethodError(
                f"the distillation token needs a CLS-token head (global_pool='token'), got {vit.global_pool!r}"
            )
        self.vit = vit
        dim = vit.embed_dim
        self.num_classes = num_classes if num_classes is not None else vit.num_classes
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        self.head_dist = nn.Linear(dim, self.num_classes)
        nn.init.trunc_normal_(self.head_dist.weight, std=2e-5)  # MAE's fine-tune head init (dmae.md §1)
        nn.init.zeros_(self.head_dist.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(x))
        x = torch.cat([x, self.dist_token.expand(x.shape[0], -1, -1)], dim=1)
        x = vit.norm_pre(vit.patch_drop(x))
        x = vit.blocks(x)
        return vit.norm(x)

    def forward_heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.forward_features(x)
        cls_logits = self.vit.forward_head(feats[:, :-1])
        dist_logits = self.head_dist(self.vit.head_drop(feats[:, -1]))
        return cls_logits, dist_logits

    def forward(self, x: Tensor):
        cls_logits, dist_logits = self.forward_heads(x)
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    # -- layer-wise lr decay (the shared fine-tuner's optimiser sees the wrapper) ---------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The wrapped ViT's BEiT grouping (stem = layer 0, block i = layer i + 1, final norm after the last
        block) under the `vit.` prefix; `dist_token` and `head_dist` match no group and so sit in the top
        group with the heads (lr scale 1, g2sd.md §2)."""
        return {
            "stem": r"^vit\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
            "blocks": [(r"^vit\.blocks\.(\d+)", None), (r"^vit\.norm", (99999,))],
        }

    def no_weight_decay(self) -> set[str]:
        """The ViT's no-decay names, prefixed; the distillation token is **not** among them: it decays, as in
        the official timm-0.3.2 environment (timm 1.0 would exempt a `dist_token`; g2sd.md §2)."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay() if name != "dist_token"}


# -- the method ---------------------------------------------------------------------------------------------

SPECIFICS = ("deit_hard", "nkd", "none")

DEFAULTS: dict[str, Any] = {
    # arms (g2sd.md §7): generic=False is SD only; specific="none" is GD + plain fine-tuning
    "generic": True,
    "specific": "deit_hard",  # deit_hard (DeiT hard distillation) | nkd (official --enable_nkd) | none
    "specific_teacher": "",  # the fine-tuned teacher, an extra teacher of the run, e.g. `<arch>.ft` (teacher kind ft)
    # generic stage (official GD.sh / main_distill.py): one mask for both, r 0.75, teacher decoder block l
    "mask_ratio": 0.75,
    "teacher_decoder_layer": None,  # 1-based; None = teacher decoder depth / 2 (4 of 8)
    "generic_epochs": 300,
    "generic_lr": 2.4e-3,
    "generic_warmup_epochs": 10,
    "generic_min_lr": 2.5e-6,
    "generic_weight_decay": 0.05,
    # specific stage: the shared MAE fine-tuner with a CLS-token head and drop path 0 (official SD.sh)
    **FINETUNE_DEFAULTS,
    "global_pool": "token",
    "drop_path": 0.0,
}


def teacher_decoder_hidden(model: nn.Module, x: Tensor, ids_keep: Tensor, ids_restore: Tensor, layer: int) -> Tensor:
    """The MAE teacher's decoder block `layer` (1-based) output on all 1 + L tokens, before `decoder_norm`:
    encoder on CLS + the visible patches `ids_keep`, mask tokens inserted, only `layer` decoder blocks run."""
    latent, _ = model.forward_masked(x, ids_keep)
    _, feats = model.forward_decoder(latent, ids_restore, [layer - 1], depth=layer)
    return feats[0]


class G2SDGeneric(DistillModule):
    """G2SD's generic stage: L_GD = `generic_loss(H(student decoder, last block), teacher decoder block l)`."""

    def __init__(self, student: nn.Module, teacher: FrozenTeacher | None, **kwargs):
        hp = {**DEFAULTS, **dict(kwargs.pop("hparams", None) or {})}
        super().__init__(student, teacher, hparams=hp, **kwargs)
        check_mae_model(student, "g2sd")
        tmodel = teacher.model
        check_mae_model(tmodel, "g2sd")
        require_decoder(teacher.info, "g2sd")
        if not 0.0 <= float(hp["mask_ratio"]) < 1.0:
            raise MethodError(f"g2sd: mask_ratio must be in [0, 1), got {hp['mask_ratio']}")
        if tmodel.patch_size != student.patch_size or tmodel.grid_size != student.grid_size:
            raise MethodError("g2sd: teacher and student must share the patch grid (one mask for both)")
        depth = len(tmodel.decoder_blocks)
        layer = hp["teacher_decoder_layer"]
        self.teacher_layer = max(1, depth // 2) if layer is None else int(layer)
        if not 1 <= self.teacher_layer <= depth:
            raise MethodError(f"g2sd: teacher_decoder_layer {layer} is outside 1..{depth} (1-based decoder blocks)")
        self.student_depth = len(student.decoder_blocks)
        d_s, d_t = student.mask_token.shape[-1], tmodel.mask_token.shape[-1]
        # Linear(d_s → d_t) → GELU → Linear(d_t → d_t), MAE's initialiser (xavier-uniform, zero bias)
        self.head = Mlp(d_s, d_t, d_t, act_layer=nn.GELU)
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        student.requires_grad_(True)
        unused = (
            *student.classifier_parameters(),
            student.pos_embed,
            student.decoder_pos_embed,
            *student.decoder_norm.parameters(),
            *student.decoder_pred.parameters(),
        )
        for p in unused:  # fixed embeddings; the pixel head is not part of G2SD's generic loss
            p.requires_grad_(False)

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        noise = torch.rand(x.shape[0], self.student.patch_embed.num_patches, device=x.device)
        ids_keep, ids_restore, _ = random_masking(noise, float(self.hp.mask_ratio))
        latent, _ = self.student.forward_masked(x, ids_keep)
        _, feats = self.student.forward_decoder(latent, ids_restore, [self.student_depth - 1])
        layer = self.teacher_layer
        target = self.teacher.run(lambda m, v: teacher_decoder_hidden(m, v, ids_keep, ids_restore, layer), x)
        return {"generic": generic_loss(self.head(feats[0]), target)}

    def configure_optimizers(self):
        hp = self.hp
        groups = param_groups_weight_decay(self, weight_decay=float(hp.generic_weight_decay))
        optimizer = torch.optim.AdamW(groups, lr=float(hp.generic_lr), betas=(0.9, 0.95))
        return MAEPretrain._with_scheduler(self, optimizer)


def run_specific_teacher(ctx: StageContext) -> dict[str, Any] | None:
    """Hand the specific stage its teacher: the extra teacher `specific_teacher` that the runner loaded (and
    trained first when missing), e.g. `<arch>.ft`, the pair's MAE teacher fine-tuned with labels."""
    if ctx.hparams["specific"] == "none":
        return None
    teacher = ctx.teachers.get("specific_teacher")
    if teacher is None:
        base = str(ctx.teacher_info.get("arch", "<arch>.mae")).rpartition(".")[0] or "<arch>"
        raise MethodError(
            "g2sd: the specific stage needs its teacher: set the hyper-parameter specific_teacher "
            f"(e.g. SET=specific_teacher={base}.ft, the pair's MAE teacher fine-tuned with labels)"
        )
    return {"teacher": teacher}


def run_generic(ctx: StageContext) -> dict[str, Any] | None:
    """The generic stage: train the student with `G2SDGeneric`, save its weights, record the GD loss curve."""
    hp = dict(ctx.hparams)
    if not hp["generic"]:
        return None
    epochs = int(hp["generic_epochs"])
    module = G2SDGeneric(
        ctx.student,
        ctx.teacher,
        num_classes=ctx.datamodule.num_classes,
        hparams=hp,
        schedule=pretraining_schedule(hp, "generic"),
        epochs=epochs,
    )
    encoder, history = fit_encoder_stage(ctx, module, "generic", epochs)
    record: dict[str, Any] = {
        "epochs": epochs,
        "teacher_decoder_layer": module.teacher_layer,
        "teacher_decoder_depth": len(ctx.teacher.model.decoder_blocks),
        "student_decoder_depth": module.student_depth,
        "head_params": sum(p.numel() for p in module.head.parameters()),
    }
    if history:
        record["loss_curve"] = [row.get("train/generic") for row in history]
    return {"encoder": str(encoder), "record": record}


@register(
    "g2sd",
    defaults=DEFAULTS,
    stages=(
        Stage("subset", run_subset),
        Stage("specific_teacher", run_specific_teacher),
        Stage("generic", run_generic),
    ),
    teacher_hparams=("specific_teacher",),
)
class G2SD(MAEFinetune):
    """G2SD: generic distillation from an MAE teacher's decoder, then specific distillation (dist token)."""

    needs_teacher = True
    init_stage = "generic"

    def __init__(self, student: nn.Module, *args, **kwargs):
        super().__init__(student, *args, **kwargs)
        hp = self.hp
        if hp.specific not in SPECIFICS:
            raise MethodError(f"g2sd: unknown specific {hp.specific!r}; valid: {', '.join(SPECIFICS)}")
        if not hp.generic and hp.specific == "none":
            raise MethodError(
                "g2sd: generic=false with specific=none distils nothing; that is the fine-tuner alone (METHOD=mae_ft)"
            )
        if hp.specific == "none":
            return  # GD + plain fine-tuning: the shared fine-tuner's loss
        if hp.probe:
            raise MethodError("g2sd: the specific stage fine-tunes the whole student; probe=true needs specific=none")
        art = self.artifacts.get("specific_teacher")
        if not art or "teacher" not in art:
            raise MethodError("g2sd: the specific stage needs the `specific_teacher` stage's teacher")
        object.__setattr__(self, "teacher", art["teacher"])  # outside the module tree, like every teacher
        self.student = DistTokenViT(student, self.num_classes)

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.hp.specific == "none":
            return super().losses(batch)
        x, y = batch["image"], batch["label"]
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise MethodError("mixup/cutmix needs an even batch size")
            x, soft = self.mixup(x, y)  # mixed and label-smoothed
        else:
            s = float(self.label_smoothing)
            soft = F.one_hot(y, self.num_classes).float() * (1.0 - s) + s / self.num_classes
        teacher_logits = self.teacher.logits(x)  # the same (mixed) batch
        cls_logits, dist_logits = self.student(x)
        if self.hp.specific == "nkd":  # official: NKD on the CLS head; 0·dist keeps the dist head in the graph
            return {"specific": nkd_loss(cls_logits + 0.0 * dist_logits, teacher_logits, soft)}
        loss = specific_loss(cls_logits, dist_logits, soft, teacher_logits)
        with torch.no_grad():
            self.log_diagnostics(
                {
                    "cls_ce": soft_cross_entropy(cls_logits, soft),
                    "dist_ce": F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=-1)),
                }
            )
        return {"specific": loss}
