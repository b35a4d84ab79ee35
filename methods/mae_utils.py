"""Masked-image-modelling machinery shared by DMAE, G2SD and Hybrid Distill (spec: shared/methods/dmae.md §1).

Pure tensor functions, no models: patchify/unpatchify (MAE's channel-last patch layout), random masking
from a noise tensor (MAE's argsort shuffle), the fixed 2-D sin-cos positional embedding, the aligned block
of a depth, MAE's masked pixel loss, and checks of MIM teachers. The MAE-ViT models that use them live in
the zoo (`distillbench.benchmark.zoo.mae_vit`) and expose `forward_masked`, `forward_encoder`,
`forward_decoder`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import MethodError


def patchify(imgs: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) → (B, L, p²·C) with L = (H/p)(W/p): patches in row-major order, and inside a patch the
    p×p pixels row-major with the channels fastest (MAE's `patchify`, `nchpwq → nhwpqc`)."""
    if imgs.ndim != 4:
        raise MethodError(f"patchify expects (B, C, H, W) images, got shape {tuple(imgs.shape)}")
    b, c, h, w = imgs.shape
    if h % patch or w % patch:
        raise MethodError(f"patchify: image size {h}×{w} is not divisible by the patch size {patch}")
    gh, gw = h // patch, w // patch
    x = imgs.reshape(b, c, gh, patch, gw, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(x: Tensor, patch: int, channels: int) -> Tensor:
    """Inverse of `patchify` for a square grid: (B, L, p²·C) → (B, C, √L·p, √L·p)."""
    b, length, dim = x.shape
    side = math.isqrt(length)
    if side * side != length or dim != patch * patch * channels:
        raise MethodError(
            f"unpatchify: {length} patches of {dim} values are not a square grid of {patch}×{patch}×{channels} patches"
        )
    x = x.reshape(b, side, side, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, side * patch, side * patch)


def num_kept(length: int, mask_ratio: float) -> int:
    """⌊L·(1 − r)⌋, the number of visible patches (MAE's `len_keep`)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise MethodError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    return int(length * (1 - mask_ratio))


def random_masking(noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking, driven by an explicit noise tensor (B, L) ~ U(0, 1).

    ids_shuffle = argsort(noise) (ascending: small noise is kept), ids_restore = argsort(ids_shuffle),
    ids_keep = the first ⌊L(1 − r)⌋ of ids_shuffle, mask (B, L) = 1 on removed and 0 on kept patches, in the
    original patch order. Returns (ids_keep (B, n) int64, ids_restore (B, L) int64, mask (B, L) float).
    """
    if noise.ndim != 2:
        raise MethodError(f"random_masking expects noise of shape (B, L), got {tuple(noise.shape)}")
    b, length = noise.shape
    keep = num_kept(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(b, length, device=noise.device, dtype=torch.float32)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x (B, L, D) at the positions `ids` (B, n) → (B, n, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def unshuffle(visible: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Append mask tokens to the visible tokens (B, n, D) and put all L tokens back in the original order
    with ids_restore (MAE's decoder input, without the CLS token)."""
    b, n, d = visible.shape
    fill = mask_token.to(visible.dtype).expand(b, ids_restore.shape[1] - n, d)
    return gather_tokens(torch.cat([visible, fill], dim=1), ids_restore)


def aligned_block(depth: int) -> int:
    """The 0-based block at three quarters of a depth: ⌈0.75·depth⌉ − 1 (DMAE: 8 of 12, 17 of 24)."""
    if depth < 1:
        raise MethodError(f"aligned_block needs a depth ≥ 1, got {depth}")
    return math.ceil(0.75 * depth) - 1


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """1-D sin-cos embedding (N,) → (N, dim): [sin(p·ω_k), cos(p·ω_k)], ω_k = 10000^(−k/(dim/2)), k < dim/2."""
    if dim % 2:
        raise MethodError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """MAE's fixed 2-D sin-cos positional embedding, (1 + grid², dim) with a zero CLS row (or (grid², dim)).

    Token t = i·grid + j (row i, column j): the first dim/2 channels embed the column j, the last dim/2 the
    row i (MAE builds its grid with `meshgrid(w, h)`, so its "h" half holds the column)."""
    if dim % 4:
        raise MethodError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def normalize_pixels(target: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's norm-pix target: each patch (v − mean) / sqrt(var + eps) over its P values, unbiased variance."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_pixel_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False) -> Tensor:
    """MAE's reconstruction loss (He et al., CVPR 2022, §3; DMAE Eq. 1):

        ℓ_b,l = (1/P) Σ_j (pred_b,l,j − t_b,l,j)²,   L_pix = Σ_b,l ℓ_b,l · m_b,l / Σ_b,l m_b,l

    over the removed patches (m = 1). `pred`, `target` (B, L, P) with the target already patchified; with
    `norm_pix` each target patch is first normalised by `normalize_pixels`. Computed in float32.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise MethodError(
            f"masked_pixel_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask "
            f"{tuple(mask.shape)} must be (B, L, P), (B, L, P) and (B, L)"
        )
    target = target.float()
    if norm_pix:
        target = normalize_pixels(target)
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class MissingDecoderError(MethodError):
    """An MIM teacher imported without decoder weights, for a method that reads its decoder."""


def require_decoder(teacher_info: Mapping[str, Any], method: str) -> None:
    """Refuse a teacher whose checkpoint had no decoder weights (sidecar `has_decoder: false`)."""
    if teacher_info.get("has_decoder") is False:
        raise MissingDecoderError(
            f"method {method!r} needs the MAE teacher's decoder, but {teacher_info.get('checkpoint', 'the teacher')} "
            "was imported from an encoder-only checkpoint; import a full MAE checkpoint that includes the "
            "decoder_* weights (e.g. MAE's visualisation release) with `teachers import --format mae`"
        )
