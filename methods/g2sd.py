"""G2SD — Huang et al., "Generic-to-Specific Distillation of Masked Autoencoders", CVPR 2023.

Two stages (../shared/methods/g2sd.md), checked against the official code `pengzhiliang/G2SD` @ 6146adf:

* **generic** (task-agnostic): the student MAE's last decoder block, through an MLP head, regresses the
  hidden state of an intermediate block of a frozen MAE teacher's *decoder*, over all tokens (CLS +
  visible + masked), on one random mask shared by both — `generic_loss`;
* **specific** (task-specific): the GD encoder is fine-tuned with a DeiT distillation token whose head
  learns the fine-tuned teacher's hard labels — `specific_loss` (or NKD on the CLS head, `nkd_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import MethodError

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
