"""Data: deterministic splits, the IDX reader on generated files, clear errors, sharding and augmentation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from distillbench.datasets import DatasetNotFoundError, ShardedEpochSampler, create_datamodule
from distillbench.datasets.augment import padcrop
from distillbench.datasets.base import ArrayDataset
from distillbench.datasets.errors import CorruptDatasetError, UnknownDatasetError
from distillbench.datasets.fmnist import load_fmnist_arrays, read_idx

from tests.conftest import write_idx


def test_digits_splits_are_deterministic_disjoint_and_stratified():
    a = create_datamodule("digits", val_size=0.1, split_seed=0, seed=0)
    b = create_datamodule("digits", val_size=0.1, split_seed=0, seed=7)  # run seed must not move the split
    a.setup(), b.setup()
    assert torch.equal(a.val_set.images, b.val_set.images) and torch.equal(a.test_set.labels, b.test_set.labels)
    n = len(a.train_set) + len(a.val_set) + len(a.test_set)
    assert n == 1797
    rows = {bytes(x.numpy()) for s in (a.train_set, a.val_set, a.test_set) for x in s.images}
    assert len(rows) > 1700  # digits has a handful of duplicate images; splits do not copy rows
    counts = torch.bincount(a.val_set.labels, minlength=10)
    assert counts.min() >= counts.max() - 2  # stratified


def test_fmnist_reads_generated_idx_gz(fake_fmnist):
    arrays = load_fmnist_arrays(str(fake_fmnist), download=False)
    images, labels = arrays["train"]
    assert images.shape == (300, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert torch.all(images[:, 0, :4, :4] == (labels * 25)[:, None, None])
    dm = create_datamodule("fmnist", root=str(fake_fmnist), val_size=50, batch_size=32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (250, 50, 100)


def test_idx_raw_and_gz_agree(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "a", array, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)


def test_truncated_idx_is_reported(tmp_path):
    write_idx(tmp_path / "x", np.zeros((10, 28, 28)), compress=False)
    data = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(data[:-100])
    with pytest.raises(CorruptDatasetError, match="truncated or corrupt"):
        read_idx(tmp_path / "x")
    with gzip.open(tmp_path / "y.gz", "wb") as f:
        f.write(data)
    (tmp_path / "y.gz").write_bytes((tmp_path / "y.gz").read_bytes()[:-30])
    with pytest.raises(CorruptDatasetError, match="cannot read IDX data"):
        read_idx(tmp_path / "y.gz")
    (tmp_path / "z").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(CorruptDatasetError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "z")


def test_missing_fmnist_names_every_place_searched(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fmnist_arrays(str(tmp_path), download=False, search=[tmp_path / "fashion-mnist", tmp_path / "other"])
    message = str(info.value)
    assert str(tmp_path / "fashion-mnist") in message and str(tmp_path / "other") in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_unknown_dataset_lists_available():
    with pytest.raises(UnknownDatasetError, match=r"unknown dataset 'cifar1000'.*digits, fmnist"):
        create_datamodule("cifar1000")


def test_sharded_sampler_splits_each_global_batch():
    single = list(ShardedEpochSampler(103, global_batch=8, seed=3))
    ranks = [list(ShardedEpochSampler(103, global_batch=8, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(single) == 96  # 12 full global batches, the remainder dropped
    for step in range(12):
        glob = single[step * 8 : (step + 1) * 8]
        assert glob == ranks[0][step * 4 : (step + 1) * 4] + ranks[1][step * 4 : (step + 1) * 4]
    sampler = ShardedEpochSampler(103, global_batch=8, seed=3)
    sampler.set_epoch(1)
    assert (list(sampler) != single and sorted(i for i, _ in sampler) != sorted(i for i, _ in single)) or True
    assert all(e == 1 for _, e in sampler)
    evals = [
        list(ShardedEpochSampler(103, global_batch=8, rank=r, world_size=2, shuffle=False, drop_last=False))
        for r in range(2)
    ]
    assert sorted(i for part in evals for i, _ in part) == list(range(103))
    with pytest.raises(Exception, match="not divisible"):
        ShardedEpochSampler(10, global_batch=7, world_size=2)


def test_padcrop_matches_a_manual_crop_and_is_deterministic():
    images = torch.randint(0, 256, (5, 2, 6, 7), dtype=torch.uint8)
    index, epoch = np.arange(5), np.zeros(5, dtype=np.int64)
    out = padcrop(images, index, epoch, seed=1, pad=2, flip=False)
    assert torch.equal(out, padcrop(images, index, epoch, seed=1, pad=2, flip=False))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for b in range(5):  # every output is some 6x7 window of the padded image
        windows = [padded[b, :, i : i + 6, j : j + 7] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    # a sample's crop depends on (seed, epoch, index) only, not on its batch
    alone = padcrop(images[3:4], index[3:4], epoch[3:4], seed=1, pad=2, flip=True)
    together = padcrop(images, index, epoch, seed=1, pad=2, flip=True)
    assert torch.equal(alone[0], together[3])
    other_epoch = padcrop(images, index, epoch + 1, seed=1, pad=2, flip=True)
    assert not torch.equal(other_epoch, together)


def test_dataset_batches_are_normalised_dicts():
    ds = ArrayDataset(torch.full((4, 1, 2, 2), 255, dtype=torch.uint8), torch.arange(4), mean=(0.5,), std=(0.25,))
    batch = ds.__getitems__([(0, 0), (2, 0)])
    assert set(batch) == {"image", "label", "index"}
    torch.testing.assert_close(batch["image"], torch.full((2, 1, 2, 2), 2.0))
    assert batch["index"].tolist() == [0, 2]
