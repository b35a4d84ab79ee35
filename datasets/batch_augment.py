"""Pad-crop-flip on a batch already on its training device (CUDA or CPU), vectorised over the batch.

The same transform as `augment.padcrop` (RandomCrop(size, padding=pad, zero fill) + horizontal flip
with p = 0.5), moved after the host-to-device copy: the loader ships un-augmented normalised images
and `ArrayDataModule.on_after_batch_transfer` crops them on the device. Because the images arrive
normalised, the padding value is the normalised value of a black pixel, (0 - mean) / std per
channel (`black_fill`), so the result equals normalising the zero-padded uint8 crop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import DatasetError


def black_fill(mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel normalised value of a zero pixel, computed as `ArrayDataset.normalize` does."""
    mean_t = torch.tensor(mean, dtype=torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32)
    return (torch.zeros_like(mean_t) - mean_t) / std_t


def _check(images: Tensor, pad: int) -> None:
    if images.ndim != 4:
        raise DatasetError(f"pad_crop_flip expects a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if pad < 0:
        raise DatasetError(f"pad must be >= 0, got {pad}")


def pad_crop_flip_at(
    images: Tensor, top: Tensor, left: Tensor, flips: Tensor | None, pad: int, fill: Tensor | float = 0.0
) -> Tensor:
    """Crop image b at (top[b], left[b]) of its `pad`-padded copy, then mirror it where flips[b].

    `top`, `left` are integers in [0, 2·pad]; `flips` is a bool per image (None: no flips). `fill` is
    the padding value: a scalar or one value per channel. Shape, dtype and device are preserved.
    """
    _check(images, pad)
    b, c, h, w = images.shape
    device = images.device
    if len(top) != b or len(left) != b or (flips is not None and len(flips) != b):
        raise DatasetError(f"need one offset (and flip) per image: batch {b}, got {len(top)}, {len(left)}")
    if pad > 0:
        on_host = top.device.type == "cpu" and left.device.type == "cpu"  # no device sync on the hot path
        if on_host and bool(((top < 0) | (top > 2 * pad) | (left < 0) | (left > 2 * pad)).any()):
            raise DatasetError(f"crop offsets must lie in [0, {2 * pad}]")
        top, left = top.to(device=device, dtype=torch.long), left.to(device=device, dtype=torch.long)
        padded = images.new_empty((b, c, h + 2 * pad, w + 2 * pad))
        padded[:] = torch.as_tensor(fill, dtype=images.dtype, device=device).reshape(-1, 1, 1)
        padded[:, :, pad : pad + h, pad : pad + w] = images
        rows = (top[:, None] + torch.arange(h, device=device))[:, :, None]  # (B, H, 1)
        cols = (left[:, None] + torch.arange(w, device=device))[:, None, :]  # (B, 1, W)
        batch = torch.arange(b, device=device)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
    if flips is not None:
        mask = flips.to(device=device, dtype=torch.bool)[:, None, None, None]
        images = torch.where(mask, images.flip(-1), images)
    return images


def pad_crop_flip(
    images: Tensor, pad: int, flip: bool, generator: torch.Generator | None = None, fill: Tensor | float = 0.0
) -> Tensor:
    """RandomCrop(H×W, padding=pad) + (if `flip`) horizontal flip with p = 0.5, one draw per image.

    Offsets and flips come from `generator` (which must live on the batch's device, or be None for
    the default generator). For the benchmark's reproducible, worker-count independent draws, the
    data module uses `pad_crop_flip_at` with the counter-based parameters of `augment.padcrop_params`.
    """
    _check(images, pad)
    b, device = images.shape[0], images.device
    top = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    left = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    flips = torch.rand(b, generator=generator, device=device) < 0.5 if flip else None
    return pad_crop_flip_at(images, top, left, flips, pad, fill)
