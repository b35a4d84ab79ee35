"""timm's RandAugment and RandomErasing, made a pure function of (seed, epoch, sample index).

The ViT/MLP-student recipe of OFA-KD (official configs/*/vit_mlp.yaml, timm's train pipeline) adds
RandAugment (`aa: rand-m9-mstd0.5-inc1`) after RandomResizedCrop + flip and RandomErasing (`reprob 0.25`,
mode `pixel`) after normalisation. timm's transforms draw from Python's `random`, NumPy's and torch's
global generators; here each sample runs them inside `seeded(...)`, which seeds those generators from the
counter-based stream of `rng.uniform` and restores their previous state afterwards. The augmentation of a
sample is then identical on 1 or N devices, with any worker count and after a resume, and the caller's
global random state is left untouched.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch import Tensor

from .errors import DatasetError
from .rng import uniform

RAND_AUGMENT_STREAM = 60
ERASING_STREAM = 61


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's (CPU) global generators; restore their states on exit."""
    py, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def sample_seeds(seed: int, epoch: np.ndarray, index: np.ndarray, stream: int) -> list[int]:
    return [int(u * 2**62) for u in uniform(seed, epoch, index, stream)]


def rand_augment(
    images: Sequence[Image.Image], index: np.ndarray, epoch: np.ndarray, seed: int, config: str, mean: Sequence[float]
) -> list[Image.Image]:
    """timm's `rand_augment_transform(config)` on each RGB PIL image, with timm's train-pipeline hparams
    (translate_const = 45 % of the image side, fill = the dataset mean in 0-255)."""
    if any(im.mode != "RGB" for im in images):
        raise DatasetError(f"RandAugment ({config}) needs RGB images, got modes {sorted({im.mode for im in images})}")
    side = min(images[0].size) if images else 0
    hparams = {"translate_const": int(side * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean)}
    try:
        transform = rand_augment_transform(config, hparams)
    except (AssertionError, ValueError, KeyError) as exc:
        raise DatasetError(f"invalid RandAugment config {config!r}: {exc}") from None
    out = []
    for im, s in zip(images, sample_seeds(seed, epoch, index, RAND_AUGMENT_STREAM), strict=True):
        with seeded(s):
            out.append(transform(im))
    return out


def rand_augment_uint8(
    images: Tensor, index: np.ndarray, epoch: np.ndarray, seed: int, config: str, mean: Sequence[float]
) -> Tensor:
    """`rand_augment` on a uint8 (B, 3, H, W) batch."""
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    out = rand_augment(pil, index, epoch, seed, config, mean)
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in out])).permute(0, 3, 1, 2).contiguous()


def random_erase(x: Tensor, index: np.ndarray, epoch: np.ndarray, seed: int, probability: float) -> Tensor:
    """timm's RandomErasing(probability, mode='pixel') on each normalised (C, H, W) image of `x`, in place:
    with probability p one box (area 2-33 %, aspect 0.3-3.3) is replaced by N(0, 1) noise."""
    erase = RandomErasing(probability=probability, mode="pixel", device="cpu")
    for k, s in enumerate(sample_seeds(seed, epoch, index, ERASING_STREAM)):
        with seeded(s):
            erase(x[k])
    return x
