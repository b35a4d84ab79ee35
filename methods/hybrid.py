"""Hybrid Distill — Shi et al., "Hybrid Distillation: Connecting Masked Autoencoders with Contrastive
Learners", ICLR 2024 (arXiv 2306.15876).

No official or third-party implementation exists (`lygsbw/hybriddistill` holds only a README), so the
objective below is the **distillbench definition** of ../shared/methods/hybrid.md §2, built from what the
paper, its abstract and its public reviews confirm: a student ViT trained from scratch imitates the
*token relations* (attention maps) of a MIM teacher T_m at intermediate layers and distils the
*final-layer features* of a supervised/contrastive teacher T_c, on a progressively masked input from
which T_c's least attended ("redundant") tokens are removed:

    L = α · L_feat + β · L_rel,   α = β = 1 (paper)

Every free choice is a hyper-parameter with the spec's default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MethodError
from .g2sd import normalized_smooth_l1


def relation_loss(attn_logits_teacher: Tensor, attn_logits_student: Tensor) -> Tensor:
    """Relation term (distillbench definition, hybrid.md §2.6), for one block:

        L_rel = (1/(B·H·N)) Σ_{b,h,i} Σ_j  softmax(A^m)_{bhij} · (log softmax(A^m)_{bhij} − log softmax(A^s)_{bhij})

    i.e. KL(teacher attention ‖ student attention) summed over keys j, mean over queries, heads and batch.
    Inputs are pre-softmax logits (B, H, N, N); computed in float32 (also under autocast).
    """
    if attn_logits_teacher.shape != attn_logits_student.shape:
        raise MethodError(
            f"teacher attention {tuple(attn_logits_teacher.shape)} and student attention "
            f"{tuple(attn_logits_student.shape)} differ in shape (equal head counts and tokens are required)"
        )
    with torch.autocast(attn_logits_student.device.type, enabled=False):
        log_p_t = F.log_softmax(attn_logits_teacher.detach().float(), dim=-1)
        log_p_s = F.log_softmax(attn_logits_student.float(), dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=-1)
    return kl.mean()


def feature_loss(student_proj: Tensor, teacher_feat: Tensor) -> Tensor:
    """Feature term (distillbench definition, hybrid.md §2.7; the Feature-Distillation recipe of
    Wei et al. 2022, `SwinTransformer/Feature-Distillation`):

        L_feat = mean_{b,n,c} smoothL1_β=2( W·S_{b,n,c},  LN(T_c)_{b,n,c} )

    LN is LayerNorm without affine parameters (eps 1e-6) over channels — the same definition as
    `g2sd.generic_loss`.
    """
    return normalized_smooth_l1(student_proj, teacher_feat)


def _split_qk(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise MethodError(
            f"qkv output must be (B, N, 3·C) with C divisible by {num_heads} heads, got {tuple(qkv.shape)}"
        )
    b, n, three_c = qkv.shape
    qkv = qkv.reshape(b, n, 3, num_heads, three_c // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


def attention_logits(qkv: Tensor, num_heads: int, scale: float) -> Tensor:
    """Pre-softmax attention A = scale · Q Kᵀ per head, (B, H, N, N), from the output of a block's
    `attn.qkv` Linear (B, N, 3C) — read by a forward hook, so fused attention stays on. float32."""
    q, k = _split_qk(qkv.float(), num_heads)
    return (q * scale) @ k.transpose(-2, -1)


def cls_attention(qkv: Tensor, num_heads: int, scale: float) -> Tensor:
    """Redundancy scores (hybrid.md §2.2): the CLS query's attention, softmax over all 1 + L keys, averaged
    over heads, at the L patch keys — (B, L)."""
    q, k = _split_qk(qkv.float(), num_heads)
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, 1:]


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """n = L − ⌊L·r⌋ (a 1e-9 tolerance keeps e.g. 100·0.29 from flooring to 28)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise MethodError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    return num_patches - math.floor(num_patches * mask_ratio + 1e-9)


def keep_indices(scores: Tensor, mask_ratio: float) -> Tensor:
    """Keep set K_e (hybrid.md §2.3): the n = L − ⌊L·r⌋ patches with the highest scores, ties to the lower
    index, returned sorted by index — LongTensor (B, n)."""
    n = num_kept(scores.shape[-1], mask_ratio)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :n].sort(dim=-1).values


def random_keep_indices(batch: int, num_patches: int, mask_ratio: float, generator=None, device=None) -> Tensor:
    """Ablation `masking="random"`: a uniform random subset of the same size, sorted by index."""
    n = num_kept(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    return noise.argsort(dim=-1)[:, :n].sort(dim=-1).values


def check_schedule(ratios: Sequence[float], milestones: Sequence[float]) -> None:
    if len(ratios) != len(milestones) + 1:
        raise MethodError(
            f"mask_ratios needs one more entry than mask_milestones, got {list(ratios)} / {list(milestones)}"
        )
    if any(not 0.0 < m < 1.0 for m in milestones) or list(milestones) != sorted(milestones):
        raise MethodError(f"mask_milestones must be increasing fractions in (0, 1), got {list(milestones)}")
    for r in ratios:
        num_kept(1, r)  # validates the range


def mask_ratio_at(epoch: int, max_epochs: int, ratios: Sequence[float], milestones: Sequence[float]) -> float:
    """Progressive schedule (hybrid.md §2.4): r_e = ratios[#{m ∈ milestones : m ≤ e / E}] for 0-based
    epoch e of E — by default 0.0, 0.25, 0.5 over the three thirds."""
    check_schedule(ratios, milestones)
    progress = epoch / max(int(max_epochs), 1)
    return float(ratios[sum(1 for m in milestones if m <= progress + 1e-12)])


def submatrix(logits: Tensor, keep: Tensor) -> Tensor:
    """Rows and columns {CLS} ∪ K_e of full-image attention logits (B, H, 1 + L, 1 + L) → (B, H, 1 + n, 1 + n);
    `keep` (B, n) indexes patches (0-based, CLS excluded)."""
    b, h = logits.shape[:2]
    idx = torch.cat([keep.new_zeros(b, 1), keep + 1], dim=1)  # token indices, CLS first
    n = idx.shape[1]
    rows = logits.gather(2, idx.view(b, 1, n, 1).expand(b, h, n, logits.shape[-1]))
    return rows.gather(3, idx.view(b, 1, 1, n).expand(b, h, n, n))


def attention_distance(attn: Tensor, grid: int | tuple[int, int], renormalize: bool = True) -> Tensor:
    """Average attention distance per head, in patch units (distillbench definition of the paper's
    diversity metric; Dosovitskiy et al. 2021, Fig. 7):

        d_h = mean_{b, i} Σ_j a_{bhij} · ‖pos(i) − pos(j)‖₂

    over patch queries i and patch keys j; `attn` (B, H, N, N) holds probabilities, N = L or 1 + L (a
    leading CLS row/column is dropped and, with `renormalize`, each row re-normalised over the patches).
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    num = gh * gw
    if attn.shape[-1] == num + 1:
        attn = attn[..., 1:, 1:]
        if renormalize:
            attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    elif attn.shape[-1] != num:
        raise MethodError(f"attention over {attn.shape[-1]} tokens does not fit a {gh}×{gw} grid (+ CLS)")
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1).to(attn.device, torch.float32)
    dist = torch.cdist(pos, pos)  # (L, L)
    return (attn.float() * dist).sum(dim=-1).mean(dim=(0, 2))
