"""KD³'s web-proxy pool: the documented shift, the generator, the PNG-folder format and the datamodule."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from distillbench.benchmark.protocol import load_protocol
from distillbench.datasets import CorruptDatasetError, DatasetNotFoundError, create_datamodule
from distillbench.datasets.webproxy import (
    DEFAULT_SHIFT,
    covariate_shift,
    gaussian_blur,
    generate_pool,
    read_image_folder,
    read_membership,
    write_pool,
)
from PIL import Image
from scipy import ndimage


def test_shift_without_noise_blur_or_inversion_is_the_affine_map():
    images = np.arange(0, 256, 5, dtype=np.uint8).reshape(1, 1, 1, -1).repeat(3, axis=0)
    shift = {**DEFAULT_SHIFT, "noise_std": 0.0, "blur_p": 0.0, "invert_p": 0.0}
    out = covariate_shift(images, np.random.default_rng(0), shift)
    shifted = np.clip(0.7 * (images / 255.0) + 0.2, 0, 1)
    np.testing.assert_array_equal(out, np.rint(shifted * 255).astype(np.uint8))
    inverted = covariate_shift(images, np.random.default_rng(0), {**shift, "invert_p": 1.0})
    np.testing.assert_array_equal(inverted, np.rint((1 - shifted) * 255).astype(np.uint8))


def test_gaussian_blur_matches_scipy():
    x = np.random.default_rng(1).random((2, 1, 9, 7))
    # scipy's "mirror" is numpy's "reflect"; truncate chosen so its radius is ⌈3σ⌉ = 3 like ours
    ref = ndimage.gaussian_filter(x, sigma=(0, 0, 0.8, 0.8), mode="mirror", truncate=3.75)
    np.testing.assert_allclose(gaussian_blur(x, 0.8), ref, atol=1e-12)


def test_generated_pool_composition_and_determinism():
    rng = np.random.default_rng(0)
    held = rng.integers(0, 256, size=(60, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(60) % 10
    pool = generate_pool(held, labels, seed=3, distractor_fraction=0.4)
    assert pool["images"].shape == (100, 1, 8, 8) and pool["images"].dtype == np.uint8
    assert pool["in_distribution"].sum() == 60 and pool["in_distribution"].mean() == pytest.approx(0.6)
    assert sorted(pool["source_class"][pool["in_distribution"]].tolist()) == sorted(labels.tolist())
    assert (pool["source_class"][~pool["in_distribution"]] == -1).all()
    kinds, counts = np.unique(pool["kind"][~pool["in_distribution"]], return_counts=True)
    assert kinds.tolist() == ["blobs", "checkerboard", "noise", "strokes"] and counts.tolist() == [10, 10, 10, 10]
    assert pool["in_distribution"][:60].mean() < 1.0  # shuffled: membership is not the file order
    again = generate_pool(held, labels, seed=3, distractor_fraction=0.4)
    np.testing.assert_array_equal(pool["images"], again["images"])
    other = generate_pool(held, labels, seed=4, distractor_fraction=0.4)
    assert not np.array_equal(pool["images"], other["images"])


def test_png_folder_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    pool = generate_pool(rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8), np.arange(12) % 10, seed=0)
    write_pool(tmp_path / "pool", pool, {"generator": "test"})
    images, names = read_image_folder(tmp_path / "pool", channels=1)
    assert names[0] == "000000.png" and len(names) == 20
    np.testing.assert_array_equal(images.numpy(), pool["images"])
    membership = read_membership(tmp_path / "pool", names)
    np.testing.assert_array_equal(membership["in_distribution"].numpy(), pool["in_distribution"])
    assert json.loads((tmp_path / "pool" / "manifest.json").read_text())["count"] == 20

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"no \.png"):
        read_image_folder(tmp_path / "empty", channels=1)
    (tmp_path / "pool" / "000003.png").write_bytes(b"not a png")
    with pytest.raises(CorruptDatasetError, match=r"000003\.png: not a readable image"):
        read_image_folder(tmp_path / "pool", channels=1)
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "pool" / "000003.png")
    with pytest.raises(CorruptDatasetError, match="differs"):
        read_image_folder(tmp_path / "pool", channels=1)


def _datamodule(fake_fmnist, tmp_path, **kw):
    options = {"base": "fmnist", "heldout_size": 100, "distractor_fraction": 0.4, "pool_dir": str(tmp_path / "pool")}
    return create_datamodule(
        "webproxy", batch_size=16, val_size=20, root=str(fake_fmnist), mean=(0.5,), std=(0.25,), **{**options, **kw}
    )


def _attach(dm, module):
    dm.trainer = SimpleNamespace(lightning_module=module, global_rank=0, world_size=1)
    return dm


def test_datamodule_splits_pool_and_training_contract(fake_fmnist, tmp_path):
    dm = _datamodule(fake_fmnist, tmp_path)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set), len(dm.pool_set)) == (180, 20, 100, 167)
    assert dm.pool_membership["in_distribution"].sum() == 100
    assert (dm.pool_set.labels == -1).all()
    # the teacher and labelled arms get D_o-train, which holds none of H
    batch = next(iter(_attach(dm, SimpleNamespace()).train_dataloader()))
    assert (batch["label"] >= 0).all() and batch["image"].shape == (16, 1, 28, 28)
    # a pool method gets the unlabelled pool; its selection hook decides which images
    pool_method = SimpleNamespace(train_data="pool")
    batches = list(_attach(dm, pool_method).train_dataloader())
    assert len(batches) == 167 // 16 and all((b["label"] == -1).all() for b in batches)
    chosen = torch.arange(0, 167, 3)
    pool_method.select_pool_indices = lambda datamodule: chosen
    seen = torch.cat([b["index"] for b in _attach(dm, pool_method).train_dataloader()])
    assert set(seen.tolist()) <= set(chosen.tolist()) and len(seen) == (len(chosen) // 16) * 16


def test_pool_is_reused_and_other_settings_are_refused(fake_fmnist, tmp_path):
    first = _datamodule(fake_fmnist, tmp_path)
    first.setup()
    again = _datamodule(fake_fmnist, tmp_path)
    again.setup()
    assert torch.equal(first.pool_set.images, again.pool_set.images)
    other = _datamodule(fake_fmnist, tmp_path, distractor_fraction=0.2)
    with pytest.raises(CorruptDatasetError, match="other settings"):
        other.setup()


def test_webproxy_protocols_load_and_older_hashes_are_kept():
    for name, base in (("webproxy", "fmnist"), ("webproxy-digits", "digits")):
        protocol = load_protocol(name)
        assert protocol.dataset.name == "webproxy" and protocol.dataset.options["base"] == base
        assert protocol.recipe()["dataset"]["options"]["distractor_fraction"] == 0.4
    digits = load_protocol("digits")
    assert "options" not in digits.recipe()["dataset"]  # empty options leave the hash as it was
    assert digits.hash(digits.pair()) == "994cf9dc959371f9"
