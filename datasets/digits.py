"""scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes): needs no download.

The dataset has no official test split; a fixed stratified 30 % slice (seed 0) is the test split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import ArrayDataModule, stratified_split

TEST_FRACTION = 0.3


def load_digits_arrays() -> tuple[Tensor, Tensor]:
    """All 1,797 images as uint8 (N, 1, 8, 8) scaled from sklearn's 0–16 range to 0–255, and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return torch.from_numpy(images), torch.from_numpy(bunch.target.astype(np.int64))


class DigitsDataModule(ArrayDataModule):
    name = "digits"
    num_classes = 10
    default_mean = (0.3054,)
    default_std = (0.3759,)

    def load_arrays(self):
        images, labels = load_digits_arrays()
        train, test = stratified_split(labels.numpy(), TEST_FRACTION, seed=0)
        return (images[train], labels[train]), (images[test], labels[test])
