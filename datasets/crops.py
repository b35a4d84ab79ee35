"""RandomResizedCrop as stored parameters: sample a box, store it normalised, cut it again exactly.

One crop is (top, left, height, width) in pixels of the source image plus a horizontal-flip flag.
The soft-label store keeps it as `coords = (top/H, left/W, height/H, width/W)` (float32) and a flag;
`coords_to_boxes` recovers the integer box by rounding `coord × size` (the official FKD code passes
the float box to PIL, which rounds it). `crop_resize` is the one function that turns boxes into
pixels, used by soft-label generation (teacher size, bicubic), replay (student size, bilinear) and the
live `rrc` augmentation, so the same box and flag always give the same pixels.

Boxes come from `augment.rrc_params` (torchvision's rule on counter-based draws), so stored crop j of
image i under store seed s is the live `rrc` box of image i at epoch j under seed s.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def boxes_to_coords(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(top/H, left/W, h/H, w/W) as float32 — the stored form."""
    scale = np.array([height, width, height, width], dtype=np.float64)
    return (np.asarray(boxes, dtype=np.float64) / scale).astype(np.float32)


def coords_to_boxes(coords: np.ndarray | Tensor, height: int, width: int) -> np.ndarray:
    """Integer pixel boxes round(coord × size) from stored coords (the inverse of `boxes_to_coords`)."""
    coords = np.asarray(coords, dtype=np.float64)
    scale = np.array([height, width, height, width], dtype=np.float64)
    boxes = np.rint(coords * scale).astype(np.int64)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], 1)
    return boxes


def crop_resize(
    images: Tensor, boxes: np.ndarray, flips: np.ndarray | Tensor, size: int, interpolation: str = "bilinear"
) -> Tensor:
    """Cut box b from images[b], resize to (size, size), flip where asked → float32 in [0, 1].

    `images` is uint8 (B, C, H, W). Resizing is `F.interpolate(align_corners=False)`, antialiased when
    shrinking, rounded and clamped to the 0–255 grid as the uint8 PIL path of the official code and the
    live `rrc` augmentation do; bilinear crops therefore equal the live augmentation's pixels.
    Crops of equal size are resized together.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    x = images.float()
    boxes = np.asarray(boxes, dtype=np.int64)
    out = x.new_empty((x.shape[0], x.shape[1], size, size))
    shapes = boxes[:, 2] * 100_003 + boxes[:, 3]
    for shape in np.unique(shapes):
        sel = np.nonzero(shapes == shape)[0]
        h, w = int(boxes[sel[0], 2]), int(boxes[sel[0], 3])
        top = torch.from_numpy(boxes[sel, 0])
        left = torch.from_numpy(boxes[sel, 1])
        rows = (top[:, None] + torch.arange(h))[:, :, None]
        cols = (left[:, None] + torch.arange(w))[:, None, :]
        idx = torch.from_numpy(sel)
        patch = x[idx[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (b, C, h, w)
        if (h, w) != (size, size):
            kwargs = {}
            if interpolation != "nearest":
                kwargs = {"align_corners": False, "antialias": h > size or w > size}
            patch = F.interpolate(patch, size=(size, size), mode=interpolation, **kwargs)
        out[idx] = patch
    np.rint(out.numpy(), out=out.numpy())  # = Tensor.round_ (half to even); torch's is ~1000× slower here
    out = out.clamp_(0.0, 255.0).div_(255.0)
    flips = torch.as_tensor(np.asarray(flips, dtype=bool))
    if flips.any():
        out[flips] = out[flips].flip(-1)
    return out
