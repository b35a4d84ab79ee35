"""Batched, deterministic augmentation for in-memory image arrays.

Each kind maps a uint8 batch (B, C, H, W) plus per-sample keys (seed, epoch, index) to an augmented
uint8 batch. Random parameters come from `rng.uniform`, so they depend only on (seed, epoch, index).
Vectorised over the batch: ~4× cheaper on CPU than per-sample torchvision transforms at 28×28, and
independent of the number of data-loading workers.

- `padcrop`: RandomCrop(size, padding) + flip — the CIFAR recipe; output has the input's shape.
- `rrc`: RandomResizedCrop(size, scale, ratio) + flip (torchvision's sampling rule, `rrc_params`) —
  the ImageNet recipe and OFA's 224-px CIFAR protocol; output is size × size.
- `resize_crop`: the matching evaluation transform, Resize(size / crop_pct) of the shorter side then
  CenterCrop(size) (ImageNet's 256 → 224 at crop_pct 0.875). Deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DatasetError
from .rng import uniform

KINDS = ("none", "padcrop", "rrc", "resize_crop")
DEFAULT_CROP_PCT = 0.875  # timm's; ImageNet's resize 256 → centre crop 224
RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its fallback


def padcrop_params(
    index: np.ndarray, epoch: np.ndarray, seed: int, pad: int, flip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, flip) of `padcrop` per sample: offsets in [0, 2·pad] from streams 0 and 1, flip stream 2."""
    n = len(np.asarray(index))
    top = (
        np.floor(uniform(seed, epoch, index, 0) * (2 * pad + 1)).astype(np.int64) if pad > 0 else np.zeros(n, np.int64)
    )
    left = (
        np.floor(uniform(seed, epoch, index, 1) * (2 * pad + 1)).astype(np.int64) if pad > 0 else np.zeros(n, np.int64)
    )
    flips = flip_mask(index, epoch, seed) if flip else np.zeros(n, dtype=bool)
    return top, left, flips


def padcrop(images: Tensor, index: np.ndarray, epoch: np.ndarray, seed: int, pad: int, flip: bool) -> Tensor:
    """RandomCrop(size, padding=pad, zero fill) then, if `flip`, horizontal flip with p = 0.5."""
    b, _, h, w = images.shape
    if pad > 0:
        top = torch.from_numpy(np.floor(uniform(seed, epoch, index, 0) * (2 * pad + 1)).astype(np.int64))
        left = torch.from_numpy(np.floor(uniform(seed, epoch, index, 1) * (2 * pad + 1)).astype(np.int64))
        padded = F.pad(images, (pad, pad, pad, pad))
        rows = (top[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
        cols = (left[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
        batch = torch.arange(b)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
    if flip:
        mask = torch.from_numpy(flip_mask(index, epoch, seed))
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    return images


def rrc_params(
    heights: np.ndarray,
    widths: np.ndarray,
    index: np.ndarray,
    epoch: np.ndarray,
    seed: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RandomResizedCrop boxes (top, left, height, width), one per sample, torchvision's rule.

    Up to 10 attempts: area ~ U(scale)·H·W, log aspect ~ U(log ratio); the first box that fits is
    placed uniformly. Otherwise the fallback: the whole image, cropped centrally to the nearest
    allowed aspect. Attempt a draws from counter streams 10 + 4a … 13 + 4a.
    """
    h_img, w_img = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    area = (h_img * w_img).astype(np.float64)
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    top, left = np.zeros_like(h_img), np.zeros_like(h_img)
    out_h, out_w = np.zeros_like(h_img), np.zeros_like(h_img)
    done = np.zeros(len(h_img), dtype=bool)
    for attempt in range(RRC_ATTEMPTS):
        stream = 10 + 4 * attempt
        target = area * (scale[0] + (scale[1] - scale[0]) * uniform(seed, epoch, index, stream))
        aspect = np.exp(log_lo + (log_hi - log_lo) * uniform(seed, epoch, index, stream + 1))
        w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
        h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        ok = ~done & (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
        i = np.floor(uniform(seed, epoch, index, stream + 2) * (h_img - h + 1)).astype(np.int64)
        j = np.floor(uniform(seed, epoch, index, stream + 3) * (w_img - w + 1)).astype(np.int64)
        top, left = np.where(ok, i, top), np.where(ok, j, left)
        out_h, out_w = np.where(ok, h, out_h), np.where(ok, w, out_w)
        done |= ok
    if not done.all():
        in_ratio = w_img / h_img
        fw = np.where(in_ratio < ratio[0], w_img, np.where(in_ratio > ratio[1], np.rint(h_img * ratio[1]), w_img))
        fh = np.where(in_ratio < ratio[0], np.rint(w_img / ratio[0]), h_img)
        fw, fh = fw.astype(np.int64), fh.astype(np.int64)
        top = np.where(done, top, (h_img - fh) // 2)
        left = np.where(done, left, (w_img - fw) // 2)
        out_h, out_w = np.where(done, out_h, fh), np.where(done, out_w, fw)
    return top, left, out_h, out_w


def flip_mask(index: np.ndarray, epoch: np.ndarray, seed: int) -> np.ndarray:
    """Horizontal flip with p = 0.5 (stream 2, shared by every kind)."""
    return uniform(seed, epoch, index, 2) < 0.5


def _resize(image: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize of one uint8 (C, H, W) image (antialiased when shrinking, as PIL and torchvision)."""
    shrink = image.shape[-2] > height or image.shape[-1] > width
    out = F.interpolate(
        image[None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=shrink
    )
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def random_resized_crop(
    images: Tensor, index: np.ndarray, epoch: np.ndarray, seed: int, size: int, scale, ratio, flip: bool
) -> Tensor:
    """RandomResizedCrop(size, scale, ratio) then, if `flip`, horizontal flip with p = 0.5."""
    b, c, h, w = images.shape
    top, left, ch, cw = rrc_params(np.full(b, h), np.full(b, w), index, epoch, seed, tuple(scale), tuple(ratio))
    flips = flip_mask(index, epoch, seed) if flip else np.zeros(b, dtype=bool)
    out = torch.empty((b, c, size, size), dtype=torch.uint8)
    for k in range(b):
        crop = images[k, :, top[k] : top[k] + ch[k], left[k] : left[k] + cw[k]]
        out[k] = _resize(crop.flip(-1) if flips[k] else crop, size, size)  # flip and resize commute
    return out


def resize_shorter(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `short`, the other keeps the aspect (floored)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def center_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop(size)."""
    return round((height - size) / 2.0), round((width - size) / 2.0)


def resize_center_crop(images: Tensor, size: int, crop_pct: float = DEFAULT_CROP_PCT) -> Tensor:
    """Resize the shorter side to floor(size / crop_pct), then CenterCrop(size)."""
    _, _, h, w = images.shape
    rh, rw = resize_shorter(h, w, int(size / crop_pct))
    top, left = center_box(rh, rw, size)
    resized = F.interpolate(images.float(), size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    return resized[:, :, top : top + size, left : left + size].round_().clamp_(0, 255).to(torch.uint8)


def eval_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """The evaluation transform that goes with a training augmentation (resize + centre crop after rrc)."""
    spec = dict(spec or {})
    if spec.get("kind") == "rrc":
        return {"kind": "resize_crop", "size": spec["size"], "crop_pct": spec.get("crop_pct", DEFAULT_CROP_PCT)}
    return {"kind": "none"}


def _size(spec: Mapping[str, Any], kind: str) -> int:
    if "size" not in spec:
        raise DatasetError(f"augmentation {kind!r} needs an output 'size' (the protocol's input.size)")
    return int(spec["size"])


def apply(images: Tensor, index: np.ndarray, epoch: np.ndarray, seed: int, spec: Mapping[str, Any] | None) -> Tensor:
    spec = dict(spec or {"kind": "none"})
    kind = spec.pop("kind", "none")
    if kind == "none":
        return images
    if kind == "padcrop":
        return padcrop(images, index, epoch, seed, pad=int(spec.get("pad", 4)), flip=bool(spec.get("flip", True)))
    if kind == "rrc":
        return random_resized_crop(
            images,
            index,
            epoch,
            seed,
            size=_size(spec, kind),
            scale=spec.get("scale", (0.08, 1.0)),
            ratio=spec.get("ratio", (3 / 4, 4 / 3)),
            flip=bool(spec.get("flip", True)),
        )
    if kind == "resize_crop":
        return resize_center_crop(images, _size(spec, kind), float(spec.get("crop_pct", DEFAULT_CROP_PCT)))
    raise DatasetError(f"unknown augmentation kind {kind!r}; valid: {', '.join(KINDS)}")
