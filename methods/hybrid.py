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

The registered method `hybrid` has two stages, following DMAE's structure: `distill` (`HybridDistillStage`:
the student on progressively masked inputs, the relation term against T_m — the pair's teacher, e.g.
`mae_vit_tiny_p2_8.mae` — and the feature term against T_c, the extra teacher named by the hyper-parameter
`tc`, e.g. `mae_vit_tiny_p2_8.vit` or `deit_base_patch16_224`), then the shared MAE fine-tuner. The distill
stage's run-record entry holds the per-layer average attention distance and attention NMI of the distilled
student and of both teachers (`stages.distill.attention_distance`, `stages.distill.attention_nmi`).

Hyper-parameters (distillbench definition, hybrid.md §2 defaults): `tc` (T_c's arch), `alpha` / `beta`
(feature / relation weights; 0 drops a term and its teacher pass: the feature-only and relation-only arms),
`masking` (`redundant` | `random`), `redundancy_source` (`tc` | `tm`), `mask_ratios` / `mask_milestones`
(the progressive schedule; `[0.25]` / `[]` is the constant-ratio arm), `layers` (student blocks of the
relation term; None: all but the last), `teacher_relation` (`submatrix` | `masked_input`), `feature_tokens`
(`patches` | `all`), `learn_pos_embed`, `attention_images` (images of the diagnostics), and the distill
recipe `distill_*` (AdamW, warm-up + cosine, gradient-norm clip).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from .base import DistillModule, FrozenTeacher
from .errors import MethodError
from .g2sd import normalized_smooth_l1
from .mae import (
    FINETUNE_DEFAULTS,
    MAEFinetune,
    MAEPretrain,
    check_mae_model,
    fit_encoder_stage,
    pretraining_schedule,
    run_subset,
)
from .registry import Stage, StageContext, register

__all__ = [
    "Hybrid",
    "HybridDistillStage",
    "attention_distance",
    "attention_logits",
    "attention_nmi",
    "attention_profile",
    "cls_attention",
    "feature_loss",
    "keep_indices",
    "mask_ratio_at",
    "paired_block",
    "relation_loss",
    "submatrix",
]


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


def patch_attention(attn: Tensor, grid: int | tuple[int, int], renormalize: bool) -> tuple[Tensor, tuple[int, int]]:
    """`attn` (B, H, N, N) restricted to the patches of a grid, N = L or 1 + L: a leading CLS row/column is
    dropped and, with `renormalize`, each row re-normalised over the patches; also returns (gh, gw)."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    num = gh * gw
    if attn.shape[-1] == num + 1:
        attn = attn[..., 1:, 1:]
        if renormalize:
            attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    elif attn.shape[-1] != num:
        raise MethodError(f"attention over {attn.shape[-1]} tokens does not fit a {gh}×{gw} grid (+ CLS)")
    return attn, (gh, gw)


def attention_distance(attn: Tensor, grid: int | tuple[int, int], renormalize: bool = True) -> Tensor:
    """Average attention distance per head, in patch units (distillbench definition of the paper's
    diversity metric; Dosovitskiy et al. 2021, Fig. 7):

        d_h = mean_{b, i} Σ_j a_{bhij} · ‖pos(i) − pos(j)‖₂

    over patch queries i and patch keys j; `attn` (B, H, N, N) holds probabilities, N = L or 1 + L (a
    leading CLS row/column is dropped and, with `renormalize`, each row re-normalised over the patches).
    """
    attn, (gh, gw) = patch_attention(attn, grid, renormalize)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1).to(attn.device, torch.float32)
    dist = torch.cdist(pos, pos)  # (L, L)
    return (attn.float() * dist).sum(dim=-1).mean(dim=(0, 2))


def attention_nmi(attn: Tensor, grid: int | tuple[int, int], renormalize: bool = True) -> Tensor:
    """Normalised mutual information between query and key position per head (distillbench definition of the
    paper's attention-collapse metric, after Park et al. 2023): with queries uniform, p(q) = 1/L, the joint
    p(q, k) = a_{qk}/L and the key marginal p(k) = Σ_q p(q, k),

        NMI_h = mean_b  I(Q; K) / √(H(Q)·H(K)),   I(Q; K) = Σ_{q,k} p(q, k) · ln(p(q, k) / (p(q)·p(k)))

    over the patches (a CLS row/column is dropped as in `attention_distance`). 1 when every query attends to
    itself alone, 0 when all queries share one attention map (collapse); computed in float64.
    """
    attn, (gh, gw) = patch_attention(attn, grid, renormalize)
    num = gh * gw
    joint = attn.double() / num  # (B, H, L, L)
    keys = joint.sum(dim=-2)  # (B, H, L)
    h_joint = -torch.special.xlogy(joint, joint).sum(dim=(-2, -1))
    h_keys = -torch.special.xlogy(keys, keys).sum(dim=-1)
    h_queries = math.log(num)
    mutual = h_queries + h_keys - h_joint  # I(Q; K) = H(Q) + H(K) − H(Q, K)
    nmi = mutual / (h_queries * h_keys).sqrt().clamp_min(1e-300)
    return nmi.mean(dim=0).float()


def paired_block(index: int, student_depth: int, teacher_depth: int) -> int:
    """The teacher block paired with student block `index` (hybrid.md §2.6): round((i + 1)·d_T/d_S) − 1, halves
    rounded up (exact integer arithmetic); equal depths pair block i with block i."""
    if not 0 <= index < student_depth:
        raise MethodError(f"student block {index} is outside 0..{student_depth - 1}")
    return (2 * (index + 1) * teacher_depth + student_depth) // (2 * student_depth) - 1


# -- the distillation stage ----------------------------------------------------------------------------------
MASKINGS = ("redundant", "random")
SOURCES = ("tc", "tm")
TEACHER_RELATIONS = ("submatrix", "masked_input")
FEATURE_TOKENS = ("patches", "all")

DEFAULTS: dict[str, Any] = {
    "tc": "",  # T_c: a teacher arch of the protocol (e.g. mae_vit_tiny_p2_8.vit, deit_base_patch16_224)
    "alpha": 1.0,  # feature term (T_c); 0: the relation-only arm
    "beta": 1.0,  # relation term (T_m); 0: the feature-only (FD-like) arm
    "masking": "redundant",  # | random (ablation: a uniform random keep set of the same size)
    "redundancy_source": "tc",  # whose last-block CLS attention scores the patches: tc | tm
    "mask_ratios": [0.0, 0.25, 0.5],
    "mask_milestones": [1 / 3, 2 / 3],
    "layers": None,  # student blocks of the relation term; None: all but the last
    "teacher_relation": "submatrix",  # | masked_input (T_m runs on the kept tokens only)
    "feature_tokens": "patches",  # | all (CLS included)
    "learn_pos_embed": True,  # the student's positional embedding trains (initialised with MAE's sin-cos)
    "attention_images": 256,  # validation images of the attention-distance diagnostics
    # distill recipe (hybrid.md §3, FD's: AdamW (0.9, 0.999), warm-up then cosine, gradient-norm clip)
    "distill_epochs": 300,
    "distill_lr": 6.0e-4,
    "distill_warmup_epochs": 10,
    "distill_min_lr": 5.0e-6,
    "distill_weight_decay": 0.05,
    "distill_grad_clip": 3.0,  # 0: no clipping
    **FINETUNE_DEFAULTS,
}


def _attention(model: nn.Module, index: int, who: str) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not 0 <= index < len(blocks):
        raise MethodError(f"hybrid: the {who} has no block {index} (a ViT with `blocks` is required)")
    attn = getattr(blocks[index], "attn", None)
    if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise MethodError(f"hybrid: the {who}'s block {index} has no fused `attn.qkv` (a timm ViT block is required)")
    for name in ("q_norm", "k_norm"):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            raise MethodError(f"hybrid: the {who} normalises q/k ({name}); its qkv output is not its attention")
    return attn


@contextlib.contextmanager
def capture_qkv(model: nn.Module, blocks: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Forward hooks on `blocks[i].attn.qkv` for i in `blocks`: yields {i: qkv output (B, N, 3C)} of the next
    forward; the model itself (fused attention included) is unchanged."""
    seen: dict[int, Tensor] = {}
    handles = [
        model.blocks[i].attn.qkv.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, out))
        for i in sorted(set(blocks))
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def final_tokens(model: nn.Module, x: Tensor) -> Tensor:
    """Final-normed output tokens (B, P + L, D) on the whole image: an MAE-ViT's `forward_masked` (after
    `norm`, whatever its head pools), else timm's `forward_features`."""
    if hasattr(model, "forward_masked"):
        return model.forward_masked(x, None)[0]
    return model.forward_features(x)


def _run_to(model: nn.Module, x: Tensor, block: int) -> None:
    """Run the encoder on the whole image, at least up to `block` (an MAE-ViT stops there)."""
    if hasattr(model, "forward_masked"):
        model.forward_masked(x, None, [block], stop_early=True)
    else:
        model.forward_features(x)


def block_qkv(model: nn.Module, x: Tensor, blocks: Sequence[int], keep: Tensor | None = None) -> dict[int, Tensor]:
    """{i: qkv output of block i} for a whole-image pass, or (MAE-ViT, `keep`) for CLS + the kept patches."""
    with capture_qkv(model, blocks) as seen:
        if keep is not None:
            model.forward_masked(x, keep, [max(blocks)], stop_early=True)
        else:
            _run_to(model, x, max(blocks))
    return dict(seen)


def tokens_and_qkv(model: nn.Module, x: Tensor, blocks: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
    with capture_qkv(model, blocks) as seen:
        tokens = final_tokens(model, x)
    return tokens, dict(seen)


@torch.no_grad()
def attention_profile(model: nn.Module, x: Tensor) -> dict[str, list[float]]:
    """Per block of `model` on images `x`, mean over heads: the average attention distance (patch units) and
    the attention NMI — the paper's diversity and collapse diagnostics."""
    grid = tuple(model.patch_embed.grid_size)
    blocks = range(len(model.blocks))
    _, seen = tokens_and_qkv(model, x, blocks)
    out: dict[str, list[float]] = {"distance": [], "nmi": []}
    for i in blocks:
        attn = _attention(model, i, "model")
        probs = attention_logits(seen[i], attn.num_heads, attn.scale).softmax(dim=-1)
        out["distance"].append(round(float(attention_distance(probs, grid).mean()), 4))
        out["nmi"].append(round(float(attention_nmi(probs, grid).mean()), 4))
    return out


def attention_distances(model: nn.Module, x: Tensor) -> list[float]:
    """Average attention distance (patch units) of every block of `model` on images `x`, mean over heads."""
    return attention_profile(model, x)["distance"]


class HybridDistillStage(DistillModule):
    """Hybrid Distill's distillation stage: L = α·L_feat(T_c) + β·L_rel(T_m) on a progressively masked input.

    `teacher` is T_m (the pair's teacher), `tc` is T_c (the extra teacher); each is required only when a term
    or the redundancy scores need it. The student is an MAE-ViT from the zoo (it is then fine-tuned by the
    shared MAE fine-tuner); the projector Linear(D_s → D_c) is the only adapter.
    """

    needs_teacher = False  # T_m and T_c are checked below, each only where a term needs it

    def __init__(self, student: nn.Module, teacher: FrozenTeacher | None, *, tc: FrozenTeacher | None = None, **kw):
        hp = {**DEFAULTS, **dict(kw.pop("hparams", None) or {})}
        super().__init__(student, teacher, hparams=hp, **kw)
        object.__setattr__(self, "tc", tc)  # frozen, outside the module tree like `teacher`
        check_mae_model(student, "hybrid")
        for key, valid in (
            ("masking", MASKINGS),
            ("redundancy_source", SOURCES),
            ("teacher_relation", TEACHER_RELATIONS),
            ("feature_tokens", FEATURE_TOKENS),
        ):
            if hp[key] not in valid:
                raise MethodError(f"hybrid: unknown {key} {hp[key]!r}; valid: {', '.join(valid)}")
        self.ratios = [float(r) for r in hp["mask_ratios"]]
        self.milestones = [float(m) for m in hp["mask_milestones"]]
        check_schedule(self.ratios, self.milestones)
        alpha, beta = float(hp["alpha"]), float(hp["beta"])
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise MethodError(f"hybrid: alpha and beta must be ≥ 0 and not both 0, got {alpha}, {beta}")
        depth = len(student.blocks)
        layers = list(range(depth - 1)) if hp["layers"] is None else [int(i) for i in hp["layers"]]
        bad = [i for i in layers if not 0 <= i < depth]
        if bad or len(set(layers)) != len(layers):
            raise MethodError(f"hybrid: layers must be distinct student blocks in 0..{depth - 1}, got {hp['layers']}")
        self.layers = layers
        self.use_feat, self.use_rel = alpha > 0, beta > 0 and bool(layers)
        masking = hp["masking"] == "redundant" and any(r > 0 for r in self.ratios)
        self.scores_from = hp["redundancy_source"] if masking else None
        self.num_patches = student.patch_embed.num_patches
        self.heads = _attention(student, 0, "student").num_heads
        self.teacher_blocks: list[int] = []
        if self.use_rel or self.scores_from == "tm":
            if teacher is None:
                raise MethodError("hybrid: the relation term (or tm redundancy scores) needs T_m, the pair's teacher")
            self._check_teacher(teacher.model, "T_m")
            tdepth = len(teacher.model.blocks)
            if self.use_rel:
                self.teacher_blocks = [paired_block(i, depth, tdepth) for i in layers]
                t_heads = _attention(teacher.model, 0, "T_m").num_heads
                if t_heads != self.heads:
                    raise MethodError(f"hybrid: T_m has {t_heads} heads, the student {self.heads}: they must be equal")
                if hp["teacher_relation"] == "masked_input" and not hasattr(teacher.model, "forward_masked"):
                    raise MethodError("hybrid: teacher_relation=masked_input needs an MAE-ViT T_m (forward_masked)")
        self.proj: nn.Module | None = None
        if self.use_feat or self.scores_from == "tc":
            if tc is None:
                raise MethodError(
                    "hybrid: the feature term (or tc redundancy scores) needs T_c: set the hyper-parameter `tc` to a "
                    "teacher arch of the protocol (e.g. SET=tc=mae_vit_tiny_p2_8.vit)"
                )
            self._check_teacher(tc.model, "T_c")
            if self.use_feat:
                self.proj = nn.Linear(student.embed_dim, tc.model.embed_dim)
                nn.init.trunc_normal_(self.proj.weight, std=0.02)
                nn.init.zeros_(self.proj.bias)
        # train the encoder parts the terms reach; decoder, mask token and classifier stay frozen
        last = depth - 1 if self.use_feat else max(layers)
        student.requires_grad_(False)
        for module in (student.patch_embed, *student.blocks[: last + 1]):
            module.requires_grad_(True)
        student.cls_token.requires_grad_(True)
        student.pos_embed.requires_grad_(bool(hp["learn_pos_embed"]))
        if self.use_feat:
            student.norm.requires_grad_(True)
        self.last_block = last

    def _check_teacher(self, model: nn.Module, who: str) -> None:
        if getattr(model, "num_prefix_tokens", 1) != 1:
            raise MethodError(f"hybrid: {who} has {model.num_prefix_tokens} prefix tokens; one CLS token is required")
        patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        if patches != self.num_patches:
            raise MethodError(f"hybrid: {who} sees {patches} patches, the student {self.num_patches}: grids must match")
        _attention(model, len(model.blocks) - 1, who)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if self.tc is not None:
            self.tc._apply(fn)
        return module

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.tc is not None:
            self.tc.model.eval()

    def mask_ratio(self) -> float:
        return mask_ratio_at(self.current_epoch, self.epochs, self.ratios, self.milestones)

    def keep_set(self, x: Tensor, ratio: float, qkv: Tensor | None, attn: nn.Module | None) -> Tensor:
        """K_e (B, n) for this batch: all patches at r = 0, else redundancy (or random) masking."""
        b, length = x.shape[0], self.num_patches
        if ratio == 0:
            return torch.arange(length, device=x.device).expand(b, length)
        if self.scores_from is None:
            return random_keep_indices(b, length, ratio, device=x.device)
        return keep_indices(cls_attention(qkv, attn.num_heads, attn.scale), ratio)

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x, hp = batch["image"], self.hp
        ratio = self.mask_ratio()
        scores = self.scores_from if ratio > 0 else None
        tc_tokens, score_qkv, score_attn, tm_qkv = None, None, None, {}
        if self.use_feat or scores == "tc":
            last = len(self.tc.model.blocks) - 1
            tc_tokens, seen = self.tc.run(lambda m, v: tokens_and_qkv(m, v, [last] if scores == "tc" else []), x)
            score_qkv, score_attn = seen.get(last), self.tc.model.blocks[last].attn
        submatrix_relation = self.use_rel and hp.teacher_relation == "submatrix"
        tm_blocks = list(self.teacher_blocks) if submatrix_relation else []
        if scores == "tm":
            tm_blocks.append(len(self.teacher.model.blocks) - 1)
        if tm_blocks:
            tm_qkv = self.teacher.run(lambda m, v: block_qkv(m, v, tm_blocks), x)
        if scores == "tm":
            last = len(self.teacher.model.blocks) - 1
            score_qkv, score_attn = tm_qkv[last], self.teacher.model.blocks[last].attn
        keep = self.keep_set(x, ratio, score_qkv, score_attn)

        student_blocks = self.layers if self.use_rel else []
        with capture_qkv(self.student, student_blocks) as s_qkv:
            if self.use_feat:
                tokens, _ = self.student.forward_masked(x, keep)
            else:  # relation only: nothing after the last relation block can change the loss
                self.student.forward_masked(x, keep, [self.last_block], stop_early=True)
        terms: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor | float] = {"mask_ratio": ratio}
        if self.use_feat:
            idx = keep + 1  # token positions of the kept patches (CLS is 0)
            if hp.feature_tokens == "all":
                idx = torch.cat([idx.new_zeros(idx.shape[0], 1), idx], dim=1)
                student_tokens = tokens
            else:
                student_tokens = tokens[:, 1:]
            target = tc_tokens.gather(1, idx[..., None].expand(-1, -1, tc_tokens.shape[-1]))
            feat = feature_loss(self.proj(student_tokens), target)
            terms["feat"] = float(hp.alpha) * feat
            diagnostics["feat_unweighted"] = feat.detach()
        if self.use_rel:
            if hp.teacher_relation == "masked_input":
                tm_qkv = self.teacher.run(lambda m, v: block_qkv(m, v, self.teacher_blocks, keep), x)
            per_layer = []
            for i, j in zip(self.layers, self.teacher_blocks, strict=True):
                s_attn, t_attn = self.student.blocks[i].attn, self.teacher.model.blocks[j].attn
                a_s = attention_logits(s_qkv[i], s_attn.num_heads, s_attn.scale)
                a_t = attention_logits(tm_qkv[j], t_attn.num_heads, t_attn.scale)
                if submatrix_relation:
                    a_t = submatrix(a_t, keep)
                per_layer.append(relation_loss(a_t, a_s))
                diagnostics[f"rel_b{i}"] = per_layer[-1].detach()
            terms["rel"] = float(hp.beta) * torch.stack(per_layer).mean()
        if self._trainer is not None:
            self.log_diagnostics(diagnostics)
        return terms

    def configure_optimizers(self):
        hp = self.hp
        groups = param_groups_weight_decay(self, weight_decay=float(hp.distill_weight_decay))
        optimizer = torch.optim.AdamW(groups, lr=float(hp.distill_lr), betas=(0.9, 0.999))
        return MAEPretrain._with_scheduler(self, optimizer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = float(self.hp.distill_grad_clip or 0.0)
        if clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    @torch.no_grad()
    def attention_report(self, images: Tensor) -> dict[str, dict[str, Any]]:
        """Per-block attention distance and attention NMI (mean over heads) of the student and of the teachers
        it has, on whole `images`: {"distance": {"images", "student", "tm", "tc"}, "nmi": {...}}."""
        was_training = self.student.training
        self.student.eval()
        device = next(self.student.parameters()).device
        profiles = {"student": attention_profile(self.student, images.to(device))}
        self.student.train(was_training)
        for name, frozen in (("tm", self.teacher), ("tc", self.tc)):
            if frozen is not None:
                tdevice = next(frozen.model.parameters()).device
                profiles[name] = frozen.run(lambda m, v: attention_profile(m, v), images.to(tdevice))
        return {
            metric: {"images": int(images.shape[0]), **{name: p[metric] for name, p in profiles.items()}}
            for metric in ("distance", "nmi")
        }


def validation_images(datamodule, limit: int) -> Tensor:
    """The first `limit` images of the validation split (no augmentation)."""
    loader = datamodule.val_dataloader()
    loader = loader[0] if isinstance(loader, list | tuple) else loader
    chunks, count = [], 0
    for batch in loader:
        chunks.append(batch["image"])
        count += chunks[-1].shape[0]
        if count >= limit:
            break
    return torch.cat(chunks)[:limit]


def run_distill(ctx: StageContext) -> dict[str, Any]:
    """The distill stage: train the student with `HybridDistillStage`, save its weights, report its schedule
    and the attention distances of the distilled student and both teachers."""
    hp = dict(ctx.hparams)
    epochs = int(hp["distill_epochs"])
    module = HybridDistillStage(
        ctx.student,
        ctx.teacher,
        tc=(ctx.teachers or {}).get("tc"),
        num_classes=ctx.datamodule.num_classes,
        hparams=hp,
        schedule=pretraining_schedule(hp, "distill"),
        epochs=epochs,
    )
    encoder, history = fit_encoder_stage(ctx, module, "distill", epochs)
    record: dict[str, Any] = {
        "epochs": epochs,
        "layers": module.layers if module.use_rel else [],
        "teacher_blocks": module.teacher_blocks,
        "mask_ratio_per_epoch": [mask_ratio_at(e, epochs, module.ratios, module.milestones) for e in range(epochs)],
        "masking": hp["masking"] if module.scores_from is not None or hp["masking"] == "random" else "none",
    }
    if history:
        record["final_train"] = {k: v for k, v in history[-1].items() if k.startswith("train/")}
    n = int(hp["attention_images"])
    if n > 0:
        report = module.attention_report(validation_images(ctx.datamodule, n))
        record["attention_distance"], record["attention_nmi"] = report["distance"], report["nmi"]
    return {"encoder": str(encoder), "record": record}


@register(
    "hybrid",
    defaults=DEFAULTS,
    stages=(Stage("subset", run_subset), Stage("distill", run_distill)),
    teacher_hparams=("tc",),
)
class Hybrid(MAEFinetune):
    """Hybrid Distill: T_m attention relations + T_c features on redundancy-masked inputs, then MAE fine-tuning."""

    needs_teacher = True
