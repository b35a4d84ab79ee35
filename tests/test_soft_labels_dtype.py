"""fp16 storage of the quantised probabilities (ferkd.md §1, §7 tests 2, 4 and 9): indices exact below
2048 classes, refused above; probabilities within 1e-3 of the live teacher; cached targets without
stored logits within the quantisation error; the protocol's `label_dtype` reaches the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distillbench.benchmark.protocol import ProtocolError, load_protocol
from distillbench.benchmark.zoo import create_model
from distillbench.datasets.base import ArrayDataset
from distillbench.datasets.soft_labels import (
    CachedTeacherDataset,
    SoftLabelStore,
    SoftLabelStoreError,
    TeacherMeta,
    generate_store,
    quantize,
    recover,
    replay_crop,
    teacher_forward,
)
from torch import nn

from .conftest import TINY_PROTOCOL, write_protocol

AUG = {"kind": "rrc", "scale": (0.25, 1.0), "ratio": (0.75, 4 / 3), "flip": True}
META = TeacherMeta("resnet8", "f" * 64, 12, (0.4,), (0.3,))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=7, in_chans=1).eval()
    images = torch.randint(0, 256, (6, 1, 10, 10), dtype=torch.uint8)
    return teacher, images, torch.arange(6) % 7


def test_fp16_keeps_every_index_of_2048_classes_exact():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(4 * torch.randn(32, 2048, generator=g), dim=1)
    q = quantize(p, 5)
    q[:, 0, 0] = torch.arange(2016, 2048, dtype=torch.float32)  # the largest indices in row 0
    half = torch.from_numpy(q.numpy().astype(np.float16))
    assert torch.equal(half[:, 0].float(), q[:, 0])
    assert torch.equal(recover(half, 2048).argmax(1), recover(q, 2048).argmax(1))
    torch.testing.assert_close(recover(half, 2048).sum(1), torch.ones(32), atol=1e-3, rtol=0)
    assert torch.tensor(2049.0).half().item() != 2049.0  # why the limit is 2048


def test_fp16_store_is_refused_beyond_2048_classes(tmp_path):
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(144, 2049))
    images = torch.randint(0, 256, (2, 1, 12, 12), dtype=torch.uint8)
    meta = TeacherMeta("linear", "a" * 64, 12, (0.5,), (0.5,))
    args = {"meta": meta, "augment": AUG, "num_crops": 2, "k": 5}
    with pytest.raises(SoftLabelStoreError, match="only up to 2048 classes"):
        generate_store(teacher, images, torch.zeros(2, dtype=torch.long), tmp_path / "h", label_dtype="float16", **args)
    manifest = generate_store(teacher, images, torch.zeros(2, dtype=torch.long), tmp_path / "f", **args)
    assert manifest["label_dtype"] == "float32" and manifest["num_classes"] == 2049
    with pytest.raises(SoftLabelStoreError, match="one of float32, float16"):
        generate_store(teacher, images, torch.zeros(2, dtype=torch.long), tmp_path / "b", label_dtype="bf16", **args)


def test_fp16_store_halves_the_labels_and_cached_targets_stay_within_the_quantisation_error(tiny, tmp_path):
    teacher, images, labels = tiny
    args = {"meta": META, "augment": AUG, "num_crops": 4, "k": 3, "store_logits": False}
    generate_store(teacher, images, labels, tmp_path / "32", **args)
    manifest = generate_store(teacher, images, labels, tmp_path / "16", label_dtype="float16", **args)
    assert manifest["label_dtype"] == "float16"
    full, half = (np.load(tmp_path / d / "shard-00000" / "labels.npy") for d in ("32", "16"))
    assert half.dtype == np.float16 and half.nbytes * 2 == full.nbytes
    assert np.load(tmp_path / "16" / "shard-00000" / "gt_prob.npy").dtype == np.float32
    np.testing.assert_array_equal(half[:, :, 0], full[:, :, 0])  # the same class indices
    np.testing.assert_allclose(half[:, :, 1].astype(np.float32), full[:, :, 1], atol=1e-3)

    store = SoftLabelStore.open(tmp_path / "16", expected_key=manifest["key"])
    assert not store.has_logits
    data = ArrayDataset(images, labels, mean=META.mean, std=META.std)
    batch = CachedTeacherDataset(data, store).__getitems__([(i, 0, 0) for i in range(6)])
    assert "teacher_logits" not in batch
    for b in range(6):
        i, j = int(batch["index"][b]), int(batch["crop"][b])
        coords, flips, _, gt_prob = store.get(i)
        crop = replay_crop(images[i], coords[j], flips[j], META.size, "bicubic")
        p_live = F.softmax(teacher_forward(teacher, crop[None], META, False)[0][0], dim=0)
        top = p_live.topk(3)
        cached = batch["soft_target"][b]
        assert torch.equal(cached.topk(3).indices, top.indices)
        torch.testing.assert_close(cached[top.indices], top.values, atol=1e-3, rtol=0)
        rest = torch.ones(7, dtype=torch.bool)
        rest[top.indices] = False
        # marginal smoothing spreads the leftover mass evenly: the error on a non-top-k class is at
        # most the k-th probability (both values lie in [0, p_k])
        assert (cached[rest] - p_live[rest]).abs().max() <= top.values[-1] + 1e-3
        torch.testing.assert_close(cached.sum(), torch.tensor(1.0), atol=1e-3, rtol=0)
        assert abs(float(gt_prob[j]) - p_live[labels[i]].item()) < 1e-5


def test_protocol_label_dtype_reaches_the_store(teacher_store, tmp_path, capsys):
    from distillbench.benchmark.cli import main

    base = {"num_crops": 2, "k": 3, "scale": [0.25, 1.0], "ratio": [0.75, 1.3333], "flip": False}
    half = {**TINY_PROTOCOL, "soft_labels": {**base, "label_dtype": "float16"}}
    path = write_protocol(tmp_path / "tinydigits.yaml", half)
    f32 = load_protocol(write_protocol(tmp_path / "f32.yaml", {**TINY_PROTOCOL, "soft_labels": base}))
    assert load_protocol(path).with_store_augment().hash() != f32.with_store_augment().hash()
    assert load_protocol(path).hash() == f32.hash()  # runs that do not use the store keep their hash
    args = ["softlabels", "--protocol", str(path), "--teachers", str(teacher_store), "--no-progress"]
    assert main([*args, "--limit", "12", "--verify", "4", "--out", str(tmp_path / "s")]) == 0
    assert '"topk_indices_equal": 1.0' in capsys.readouterr().out
    store = SoftLabelStore.open(tmp_path / "s")
    assert store.manifest["label_dtype"] == "float16" and store.gather(np.arange(3))["labels"].dtype == np.float16
    bad = write_protocol(tmp_path / "bad.yaml", {**TINY_PROTOCOL, "soft_labels": {**base, "label_dtype": "int8"}})
    with pytest.raises(ProtocolError, match="label_dtype must be float32 or float16"):
        load_protocol(bad)
