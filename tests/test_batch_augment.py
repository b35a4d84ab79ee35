"""On-device pad-crop-flip: equal to the loader-side `augment.padcrop`, and the `augment_on_device` run path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distillbench.benchmark.runner import RunRequest, run
from distillbench.datasets import DatasetError, create_datamodule
from distillbench.datasets.augment import padcrop, padcrop_params
from distillbench.datasets.base import ArrayDataset
from distillbench.datasets.batch_augment import black_fill, pad_crop_flip, pad_crop_flip_at

MEAN, STD = (0.2, 0.4, 0.6), (0.3, 0.25, 0.2)


def _reference(image: torch.Tensor, top: int, left: int, flip: bool, pad: int, fill) -> torch.Tensor:
    """One image at a time: constant-pad each channel with its fill, slice, mirror."""
    channels = [F.pad(image[c], (pad, pad, pad, pad), value=float(fill[c])) for c in range(image.shape[0])]
    crop = torch.stack(channels)[:, top : top + image.shape[1], left : left + image.shape[2]]
    return crop.flip(-1) if flip else crop


@pytest.mark.parametrize("pad", [0, 1, 4])
def test_offsets_from_a_seeded_generator_match_a_per_image_reference(pad):
    g = torch.Generator().manual_seed(pad)
    images = torch.randn(6, 3, 7, 9, generator=g)
    top = torch.randint(0, 2 * pad + 1, (6,), generator=g)
    left = torch.randint(0, 2 * pad + 1, (6,), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    fill = black_fill(MEAN, STD)
    out = pad_crop_flip_at(images, top, left, flips, pad, fill)
    expected = torch.stack(
        [_reference(images[b], int(top[b]), int(left[b]), bool(flips[b]), pad, fill) for b in range(6)]
    )
    assert torch.equal(out, expected)


def test_equals_the_loader_padcrop_on_the_same_draws():
    """Zero-padded uint8 crop then normalise == normalise then crop with the normalised black fill."""
    pad, seed = 3, 11
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    index, epoch = np.arange(100, 116), np.full(16, 2)
    ds = ArrayDataset(images, torch.zeros(16), mean=MEAN, std=STD)
    loader_side = ds.normalize(padcrop(images, index, epoch, seed, pad, True))
    top, left, flips = padcrop_params(index, epoch, seed, pad, True)
    assert flips.any() and not flips.all() and len(set(top.tolist())) > 1  # the draws are not degenerate
    on_device = pad_crop_flip_at(
        ds.normalize(images),
        torch.from_numpy(top),
        torch.from_numpy(left),
        torch.from_numpy(flips),
        pad,
        black_fill(MEAN, STD),
    )
    assert torch.equal(on_device, loader_side)


def test_random_version_preserves_shape_dtype_device_and_never_flips_without_flip():
    images = torch.arange(2 * 1 * 4 * 5, dtype=torch.float64).view(2, 1, 4, 5).repeat(32, 1, 1, 1)
    out = pad_crop_flip(images, 0, True, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype and out.device == images.device
    assert any(not torch.equal(out[b], images[b]) for b in range(len(images)))  # some were flipped
    for seed in range(5):
        same = pad_crop_flip(images, 0, False, torch.Generator().manual_seed(seed))
        assert torch.equal(same, images)
    cropped = pad_crop_flip(images, 2, False, torch.Generator().manual_seed(1), fill=-7.0)
    assert cropped.shape == images.shape and cropped.dtype == torch.float64
    # without flips every crop is a shifted window: the image's values keep increasing along each row
    rows = [row[row != -7.0] for row in cropped.reshape(-1, 5)]
    assert sum(len(inside) == 0 for inside in rows) > 0  # some rows lie in the padding
    for inside in rows:
        assert len(inside) == 0 or (len(inside) >= 3 and bool((inside.diff() == 1).all()))


def test_bad_inputs_are_rejected():
    with pytest.raises(DatasetError, match="B, C, H, W"):
        pad_crop_flip(torch.zeros(3, 4, 4), 1, True)
    with pytest.raises(DatasetError, match="offsets"):
        pad_crop_flip_at(torch.zeros(2, 1, 4, 4), torch.tensor([0, 3]), torch.tensor([0, 0]), None, 1)
    with pytest.raises(DatasetError, match="one offset"):
        pad_crop_flip_at(torch.zeros(2, 1, 4, 4), torch.tensor([0]), torch.tensor([0, 0]), None, 1)
    with pytest.raises(DatasetError, match="plain padcrop"):
        create_datamodule("digits", augment={"kind": "padcrop", "pad": 1, "re_prob": 0.25}, augment_on_device=True)
    with pytest.raises(DatasetError, match="plain padcrop"):
        create_datamodule("digits", augment={"kind": "none"}, augment_on_device=True)


def _train_batches(dm, n=3):
    dm.setup()
    loader = dm.train_dataloader()
    return [dm.on_after_batch_transfer(batch, 0) for batch, _ in zip(loader, range(n), strict=False)]


def test_datamodule_on_device_batches_equal_the_loader_side_batches():
    spec = {"kind": "padcrop", "pad": 2, "flip": True}
    cpu = _train_batches(create_datamodule("digits", batch_size=32, seed=3, augment=spec))
    dev = _train_batches(create_datamodule("digits", batch_size=32, seed=3, augment=spec, augment_on_device=True))
    for a, b in zip(cpu, dev, strict=True):
        assert set(a) == set(b)  # the crop parameters are consumed by the hook
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    raw = create_datamodule("digits", batch_size=32, seed=3, augment=spec, augment_on_device=True)
    raw.setup()
    first = next(iter(raw.train_dataloader()))
    assert not torch.equal(first["image"], cpu[0]["image"])  # the loader itself shipped un-augmented images
    assert "crop" not in next(iter(raw.val_dataloader()[0]))  # evaluation batches are not augmented


def test_tiny_digits_fit_with_the_switch_records_it(tiny_protocol_path, tmp_path):
    common = {
        "method": "vanilla",
        "protocol": str(tiny_protocol_path),
        "epochs": 1,
        "progress": False,
        "wandb": False,
        "measure_overhead": False,
    }
    on = run(RunRequest(results=str(tmp_path / "on"), augment_on_device=True, **common), say=lambda m: None)
    off = run(RunRequest(results=str(tmp_path / "off"), **common), say=lambda m: None)
    assert on["status"] == "finished" and on["augment_on_device"] is True and "augment_on_device" not in off
    assert on["history"] == off["history"]  # the same draws: the same run
