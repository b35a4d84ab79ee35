"""Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
Distillation", NeurIPS 2023 — the official code's definition (Hao840/OFAKD `distillers/ofa.py`;
spec: ../shared/methods/ofa.md).

The student's chosen stages each feed a training-only branch head that maps the stage's features to
logits; every head and the student's own logits are pulled towards the teacher's logits with the
OFA loss. Heads are submodules of the method module (adapters), never part of the exported student.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .base import DistillModule
from .errors import MethodError
from .registry import register

# -- the loss ----------------------------------------------------------------------------------------


def target_mask(labels: Tensor, num_classes: int) -> Tensor:
    """One-hot mask m of the target class: one_hot(y), or one_hot(argmax(label)) for 2-D (mixed) labels."""
    if labels.dim() == 2:
        labels = labels.argmax(dim=1)
    elif labels.dim() != 1:
        raise MethodError(f"labels must be (B,) class indices or (B, K) soft labels, got shape {tuple(labels.shape)}")
    return F.one_hot(labels.long(), num_classes).float()


def ofa_loss(
    logits_student: Tensor, logits_teacher: Tensor, target_mask: Tensor, eps: float, temperature: float = 1.0
) -> Tensor:
    """OFA loss (official code; paper Eq. 4 with the code's non-target exponent):

        p_S = softmax(z_S / T),  p_T = softmax(z_T / T),  w = (p_T + m)^ε − m
        L_OFA = −(1/B) Σ_b Σ_c w[b,c] · log p_S[b,c]

    On the target class w = (1 + p_T,y)^ε − 1, elsewhere w = p_T,c^ε. No T² factor and no
    renormalisation of w; ε = 1 is soft-target cross-entropy with p_T. log p_S comes from log_softmax
    (the official `log(softmax)` overflows to inf for extreme logits; equal otherwise). float32.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(logits_student.float() / t, dim=1)
    p_t = F.softmax(logits_teacher.float() / t, dim=1)
    mask = target_mask.to(p_t.dtype)
    weight = (p_t + mask).pow(eps) - mask
    return -(weight * log_p_s).sum(dim=1).mean()


# -- branch heads ------------------------------------------------------------------------------------


class SepConv(nn.Sequential):
    """Stride-2 separable block: dw3×3/2 → pw1×1 → BN → ReLU → dw3×3 → pw1×1 (c_in → c_out) → BN → ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


class PatchMerging(nn.Module):
    """Swin-style 2×2 merge of a (B, g·g, E) token grid: concatenate the neighbours in the order
    (even row, even col), (odd, even), (even, odd), (odd, odd) → LayerNorm(4E) → Linear(4E → out) → act."""

    def __init__(self, grid: int, dim: int, out_dim: int, act: bool):
        super().__init__()
        if grid % 2:
            raise MethodError(f"patch merging needs an even token grid, got {grid}×{grid}")
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        g = self.grid
        if n != g * g:
            raise MethodError(f"patch merging expected {g * g} tokens ({g}×{g}), got {n}")
        x = x.view(b, g, g, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x.view(b, -1, 4 * c))))


class ConvHead(nn.Module):
    """CNN branch: n SepConvs (c → 2c …, last → D) or, for n = 0, a 1×1 conv C → D with bias; pool → Linear."""

    def __init__(self, channels: int, downsamples: int, dim: int, num_classes: int):
        super().__init__()
        if downsamples > 0:
            blocks, c = [], channels
            for i in range(downsamples):
                out = dim if i == downsamples - 1 else 2 * c
                blocks.append(SepConv(c, out))
                c *= 2
        else:
            blocks = [nn.Conv2d(channels, dim, 1)]
        self.body = nn.Sequential(*blocks)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


class TokenHead(nn.Module):
    """ViT/MLP branch on (B, P + g·g, E) tokens: split the P prefix tokens off, merge patches towards
    the target grid, re-attach the prefix in front, timm Blocks (dim D_S, 4 heads), pool (first prefix
    token, else the mean over tokens), Linear(D_S → K)."""

    def __init__(
        self, embed_dim: int, grid: int, num_blocks: int, dim: int, num_classes: int, prefix: int, target_grid: int
    ):
        super().__init__()
        self.prefix = prefix
        merges = max(math.floor(math.log2(grid / target_grid)), 0) if grid > 0 else 0
        if merges == 0 and embed_dim != dim:
            raise MethodError(
                f"a token stage of width {embed_dim} with no patch merge cannot feed blocks of width {dim}"
            )
        layers = []
        for i in range(merges):
            act = i == 0 or i != merges - 1
            layers.append(PatchMerging(grid // 2**i, embed_dim if i == 0 else dim, dim, act))
        self.merge = nn.Sequential(*layers)
        self.blocks = nn.Sequential(*[Block(dim=dim, num_heads=4) for _ in range(num_blocks)])
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        p = self.prefix
        x = torch.cat([x[:, :p], self.merge(x[:, p:])], dim=1) if p > 0 else self.merge(x)
        x = self.blocks(x)
        return self.fc(x[:, 0] if p > 0 else x.mean(dim=1))


@dataclass(frozen=True)
class StageInfo:
    """One tapped stage: channels (E for tokens), the CNN down-sampling count log2(r_last / r_s) and,
    for token stages, the patch grid g."""

    channels: int
    downsamples: int = 0
    grid: int = 0


def init_head(module: nn.Module) -> None:
    """Official init: conv kaiming-normal (fan_out, relu); BN (1, 0); Linear trunc-normal 0.02, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_branch_head(
    stage_info: StageInfo,
    stage_index: int,
    num_stages: int,
    student_dim: int,
    teacher_dim: int,
    num_classes: int,
    token_model: bool,
    num_prefix_tokens: int = 0,
    target_grid: int = 7,
) -> nn.Module:
    """The branch head of stage `stage_index` (1-based of `num_stages`), initialised (ofa.md §3).

    CNN: D = max(D_S, D_T) wide; token: D_S wide with max(S − s, 1) transformer blocks.
    """
    if token_model:
        head = TokenHead(
            stage_info.channels,
            stage_info.grid,
            max(num_stages - stage_index, 1),
            student_dim,
            num_classes,
            num_prefix_tokens,
            target_grid,
        )
    else:
        head = ConvHead(stage_info.channels, stage_info.downsamples, max(student_dim, teacher_dim), num_classes)
    init_head(head)
    return head


# -- stage taps --------------------------------------------------------------------------------------

_STEM_MODULES = {"stem", "act1", "bn1", "conv_stem"}


@dataclass(frozen=True)
class StageTaps:
    """Where a student's stages are read through `forward_intermediates`.

    `indices` are forward_intermediates indices; with `use_final` the final features (e.g. MobileNetV2's
    conv_head + bn2) are the last stage. Token stages come back as (B, P + L, E) tokens.
    """

    indices: tuple[int, ...]
    use_final: bool
    token: bool
    num_prefix_tokens: int
    kind: str

    def run(self, student: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(final features for `forward_head`, one feature per stage) in one forward pass."""
        idx = list(self.indices)
        if self.kind == "vit":
            final, inter = student.forward_intermediates(x, indices=idx, output_fmt="NLC", return_prefix_tokens=True)
            feats = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in inter]
        elif self.kind == "swin":
            final, inter = student.forward_intermediates(x, indices=idx, output_fmt="NCHW")
            feats = [f.flatten(2).transpose(1, 2) for f in inter]
        elif self.kind == "mlp":
            final, inter = student.forward_intermediates(x, indices=idx, output_fmt="NLC")
            feats = list(inter)
        else:
            final, inter = student.forward_intermediates(x, indices=idx)
            feats = list(inter) + ([final] if self.use_final else [])
        return final, feats


def _is_isotropic(student: nn.Module) -> bool:
    info = getattr(student, "feature_info", None) or []
    return len(info) > 1 and len({f["reduction"] for f in info}) == 1 and hasattr(student, "blocks")


def isotropic_taps(depth: int) -> list[int]:
    """1-based blocks round(d·{1/6, 1/3, 5/6, 1}), deduplicated (= 2, 4, 10, 12 for d = 12)."""
    return sorted({max(1, math.floor(depth * f + 0.5)) for f in (1 / 6, 1 / 3, 5 / 6, 1.0)})


def plan_taps(student: nn.Module) -> StageTaps:
    """The stage taps of ofa.md §3's table, per student family."""
    info = getattr(student, "feature_info", None)
    if not info or not hasattr(student, "forward_intermediates"):
        raise MethodError(
            f"{type(student).__name__} lacks timm's feature contract (feature_info, forward_intermediates)"
        )
    name = type(student).__name__
    if _is_isotropic(student):
        blocks = tuple(b - 1 for b in isotropic_taps(len(info)))
        prefix = int(getattr(student, "num_prefix_tokens", 0) or 0)
        kind = "vit" if prefix > 0 else "mlp"  # timm's num_prefix_tokens (the official `num_tokens` is unset)
        return StageTaps(blocks, False, True, prefix, kind)
    if name.startswith("SwinTransformer"):
        return StageTaps(tuple(range(len(info))), False, True, 0, "swin")
    if name in ("EfficientNet", "MobileNetV3"):  # official: blocks 2, 5, 12 and conv_head + bn2
        return StageTaps(tuple(range(1, len(info) - 1)), True, False, 0, "cnn")
    start = 1 if info[0]["module"].split(".")[0] in _STEM_MODULES else 0
    return StageTaps(tuple(range(start, len(info))), False, False, 0, "cnn")


def _probe_size(student: nn.Module) -> tuple[int, int, int]:
    for attr in ("patch_embed", "stem"):
        embed = getattr(student, attr, None)
        size = getattr(embed, "img_size", None)
        if size is not None:
            chans = embed.proj.in_channels
            h, w = (size, size) if isinstance(size, int) else size
            return chans, h, w
    raise MethodError(f"cannot tell the input size of token model {type(student).__name__} (no patch_embed.img_size)")


def stage_infos(student: nn.Module, taps: StageTaps) -> list[StageInfo]:
    """Per-stage channels and CNN down-sampling counts from feature_info; token grids from one probe pass."""
    info = student.feature_info
    if not taps.token:
        chans = [info[i]["num_chs"] for i in taps.indices]
        reds = [info[i]["reduction"] for i in taps.indices]
        if taps.use_final:
            chans.append(student.num_features)
            reds.append(info[-1]["reduction"])
        return [StageInfo(c, round(math.log2(reds[-1] / r))) for c, r in zip(chans, reds, strict=True)]
    was_training = student.training
    student.eval()
    with torch.no_grad():
        _, feats = taps.run(student, torch.zeros(1, *_probe_size(student)))
    student.train(was_training)
    out = []
    for f in feats:
        patches = f.shape[1] - taps.num_prefix_tokens
        out.append(StageInfo(int(f.shape[2]), 0, math.isqrt(patches)))
    return out


def _broadcast(value, n: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise MethodError(f"ofa: {name} needs 1 or {n} values (one per stage plus the logits), got {len(values)}")
    return [float(v) for v in values]


@register(
    "ofa",
    defaults={
        "stages": None,  # 1-based student stages; None = all
        "eps": 1.0,  # one value, or one per chosen stage plus the last for the logits
        "temperature": 1.0,
        "gt_weight": 1.0,
        "kd_weight": 1.0,
        "ofa_weight": 1.0,
        "vit_target_grid": 7,
    },
)
class OFA(DistillModule):
    """OFA-KD: L = w_gt · CE + w_kd · OFA(z_S, z_T; ε_L) + w_ofa · Σ_s OFA(head_s(f_s), z_T; ε_s)."""

    mixed_labels = True  # soft targets: CE on them, the OFA target mask from their argmax (ofa.md §1)

    def __init__(self, student: nn.Module, teacher=None, **kwargs):
        super().__init__(student, teacher, **kwargs)
        taps = plan_taps(student)
        infos = stage_infos(student, taps)
        chosen = list(range(1, len(infos) + 1)) if self.hp.stages is None else [int(s) for s in self.hp.stages]
        bad = [s for s in chosen if not 1 <= s <= len(infos)]
        if bad or not chosen:
            raise MethodError(f"ofa: stages must be in 1..{len(infos)} for {type(student).__name__}, got {chosen}")
        self.taps, self.stage_ids = taps, chosen
        self.eps = _broadcast(self.hp.eps, len(chosen) + 1, "eps")
        teacher_dim = int(self.teacher.model.num_features)
        self.heads = nn.ModuleDict(
            {
                str(s): build_branch_head(
                    infos[s - 1],
                    s,
                    len(infos),
                    int(student.num_features),
                    teacher_dim,
                    self.num_classes,
                    taps.token,
                    taps.num_prefix_tokens,
                    int(self.hp.vit_target_grid),
                )
                for s in chosen
            }
        )

    def adapter_inputs(self, x: Tensor) -> list[tuple[nn.Module, Tensor]]:
        """The branch heads and the stage features they read."""
        _, feats = self.taps.run(self.student, x)
        return [(self.heads[str(s)], feats[s - 1]) for s in self.stage_ids]

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        final, feats = self.taps.run(self.student, x)
        logits_s = self.student.forward_head(final)
        logits_t = self.teacher_logits(batch)
        mask = target_mask(y, logits_s.shape[1])
        t = self.hp.temperature
        branch = {}
        for s, eps in zip(self.stage_ids, self.eps, strict=False):
            branch[f"ofa_s{s}"] = ofa_loss(self.heads[str(s)](feats[s - 1]), logits_t, mask, eps, t)
        self.log_diagnostics({k: v.detach() for k, v in branch.items()})
        return {
            "gt": self.hp.gt_weight * self.classification_loss(logits_s, y),
            "kd": self.hp.kd_weight * ofa_loss(logits_s, logits_t, mask, self.eps[-1], t),
            "ofa": self.hp.ofa_weight * torch.stack(list(branch.values())).sum(),
        }
