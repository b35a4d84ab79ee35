"""The exhaustive pad-crop store (ferkd.md §4, cifar100): every view of RandomCrop(pad) + flip, stored once;
replaying a view gives exactly the live augmentation's pixels for that offset and flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distillbench.benchmark.protocol import ProtocolError, load_protocol
from distillbench.benchmark.runner import RunRequest, run
from distillbench.benchmark.zoo import create_model
from distillbench.datasets import augment
from distillbench.datasets.base import ArrayDataset
from distillbench.datasets.rng import uniform
from distillbench.datasets.soft_labels import (
    CachedTeacherDataset,
    SoftLabelStore,
    SoftLabelStoreError,
    TeacherMeta,
    generate_store,
    make_key,
    padcrop_views,
    replay_crop,
    teacher_forward,
    verify_store,
)

from .conftest import TINY_PROTOCOL, write_protocol

PAD = {"kind": "padcrop", "pad": 2, "flip": True}
META = TeacherMeta("resnet8", "e" * 64, 8, (0.4,), (0.3,))


def live_view(seed: int, epoch: np.ndarray, index: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, flip) the live `padcrop` draws: offsets from streams 0 and 1, flip from stream 2."""
    top = np.floor(uniform(seed, epoch, index, 0) * (2 * pad + 1)).astype(int)
    left = np.floor(uniform(seed, epoch, index, 1) * (2 * pad + 1)).astype(int)
    return top, left, augment.flip_mask(index, epoch, seed)


def test_all_162_views_of_pad_4_with_flips():
    boxes, flips = padcrop_views(4, True, 32, 32)
    assert boxes.shape == (162, 4) and flips.shape == (162,)
    assert len({(t, l, f) for (t, l, _, _), f in zip(boxes.tolist(), flips.tolist(), strict=True)}) == 162
    assert set(boxes[:, 0]) == set(range(9)) == set(boxes[:, 1]) and (boxes[:, 2:] == 32).all()
    assert padcrop_views(4, False, 32, 32)[0].shape == (81, 4)


def test_every_replayed_view_is_the_live_pad_crop_of_that_offset_and_flip():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(1, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
    boxes, flips = padcrop_views(4, True, 32, 32)
    coords = boxes / np.array([40, 40, 40, 40], dtype=np.float64)
    padded = F.pad(image, (4, 4, 4, 4))
    for v in range(162):  # an independent reference: slice the zero-padded image, flip
        top, left = boxes[v, :2]
        ref = padded[:, top : top + 32, left : left + 32]
        ref = ref.flip(-1) if flips[v] else ref
        assert torch.equal(replay_crop(image, coords[v], flips[v], 32, pad=4), ref.float() / 255)
    # the live augmentation: 2,000 epochs of one image hit every view; each equals the replayed view
    epochs, index = np.arange(2000), np.full(2000, 7)
    live = augment.padcrop(image[None].expand(2000, -1, -1, -1), index, epochs, 3, pad=4, flip=True)
    top, left, flip = live_view(3, epochs, index, 4)
    view = {(t, l, f): v for v, ((t, l, _, _), f) in enumerate(zip(boxes.tolist(), flips.tolist(), strict=True))}
    hit = [view[(t, l, f)] for t, l, f in zip(top.tolist(), left.tolist(), flip.tolist(), strict=True)]
    assert sorted(set(hit)) == list(range(162))
    for e, v in enumerate(hit):
        assert torch.equal(replay_crop(image, coords[v], flips[v], 32, pad=4), live[e].float() / 255)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=7, in_chans=1).eval()
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    return teacher, images, torch.arange(6) % 7


def test_padcrop_store_holds_the_teacher_on_every_live_view(tiny, tmp_path):
    teacher, images, labels = tiny
    manifest = generate_store(teacher, images, labels, tmp_path / "s", meta=META, augment=PAD, num_crops=50, k=3)
    assert manifest["key"]["augment"] == {"kind": "padcrop", "pad": 2, "flip": True, "views": "exhaustive"}
    store = SoftLabelStore.open(tmp_path / "s", expected_key=manifest["key"])
    boxes, flips = padcrop_views(2, True, 8, 8)
    data = ArrayDataset(images, labels, mean=META.mean, std=META.std)
    cached = CachedTeacherDataset(data, store, seed=1)
    epochs = np.arange(40)
    for i in range(6):
        coords, stored_flips, q, gt_prob, logits = store.get(i)
        assert np.array_equal(np.rint(coords * 12).astype(int), boxes) and np.array_equal(stored_flips, flips)
        # the live augmentation of image i at 40 epochs: the stored teacher output of that view is the
        # teacher on those pixels, and the cached dataset replays exactly those pixels
        live = augment.padcrop(images[[i] * 40], np.full(40, i), epochs, 5, pad=2, flip=True)
        top, left, flip = live_view(5, epochs, np.full(40, i), 2)
        views = [int(np.nonzero((boxes[:, 0] == t) & (boxes[:, 1] == lf) & (flips == f))[0][0]) for t, lf, f in
                 zip(top, left, flip, strict=True)]  # fmt: skip
        z, _ = teacher_forward(teacher, live.float() / 255, META, False)
        np.testing.assert_allclose(logits[views], z.numpy(), atol=1e-5)
        p = F.softmax(z, dim=1)
        np.testing.assert_allclose(gt_prob[views], p[:, labels[i]].numpy(), atol=1e-5)
        assert np.array_equal(q[views, 0].astype(int), p.topk(3).indices.numpy())
    batch = cached.__getitems__([(i, 0, s) for s in range(2) for i in range(6)])
    assert all(batch["crop"][:6] != batch["crop"][6:])  # n = 2 distinct views per image
    for b in range(12):
        i, v = int(batch["index"][b]), int(batch["crop"][b])
        ref = F.pad(images[i], (2, 2, 2, 2))[:, boxes[v, 0] : boxes[v, 0] + 8, boxes[v, 1] : boxes[v, 1] + 8]
        ref = (ref.flip(-1) if flips[v] else ref).float() / 255
        torch.testing.assert_close(batch["image"][b], (ref - 0.4) / 0.3)
    check = verify_store(store, teacher, images, labels, META, n=3)
    assert check["topk_indices_equal"] == 1.0 and check["max_abs_logit_err"] < 1e-5
    with pytest.raises(SoftLabelStoreError, match="all 50 views"):
        make_key(META, PAD, num_crops=32, k=3, temperature=1.0, data_sha256="0")


def test_cifar100_protocol_stores_every_view_and_other_hashes_stay():
    p = load_protocol("cifar100")
    assert p.soft_labels["kind"] == "padcrop" and p.soft_labels["num_crops"] == 162 and p.soft_labels["k"] == 5
    store = p.with_store_augment()
    assert store.train_augment == {"kind": "padcrop", "pad": 4, "flip": True} == {**p.augment}
    assert p.hash(p.pair()) == "d0f6753d60ed68d7"  # runs without the store keep their hash
    assert store.hash(store.pair()) != p.hash(p.pair())
    with pytest.raises(ProtocolError, match="stores all 162 pad-crop views"):
        p.with_store_augment(32)
    pinned = {"digits": ("994cf9dc959371f9", "11518ae9d3714a83"), "fmnist": ("7ff46466ea903bac", "87e59bf9730b282c")}
    for name, (plain, stored) in pinned.items():
        q = load_protocol(name)
        assert (q.hash(q.pair()), q.with_store_augment().hash(q.pair())) == (plain, stored)


def test_protocol_rejects_a_padcrop_store_that_is_not_exhaustive(tmp_path):
    bad = {**TINY_PROTOCOL, "soft_labels": {"kind": "padcrop", "pad": 1, "flip": False, "num_crops": 8, "k": 3}}
    with pytest.raises(ProtocolError, match="num_crops must be 9"):
        load_protocol(write_protocol(tmp_path / "bad.yaml", bad))
    bad["soft_labels"] = {"kind": "padcrop", "flip": False, "num_crops": 9, "k": 3}
    with pytest.raises(ProtocolError, match="soft_labels needs pad"):
        load_protocol(write_protocol(tmp_path / "bad.yaml", bad))


def test_fkd_trains_from_a_padcrop_store(teacher_store, tmp_path):
    soft = {"kind": "padcrop", "pad": 1, "flip": False, "num_crops": 9, "k": 3, "store_logits": True}
    protocol = write_protocol(tmp_path / "tinydigits.yaml", {**TINY_PROTOCOL, "soft_labels": soft})
    request = RunRequest(
        method="fkd",
        protocol=str(protocol),
        teachers=str(teacher_store),
        results=str(tmp_path / "results"),
        progress=False,
        wandb=False,
        measure_overhead=False,
    )
    record = run(request, say=lambda m: None)
    assert record["status"] == "finished" and record["teacher_source"] == "store"
    assert record["soft_labels"]["num_crops"] == 9 and record["soft_labels"]["crops_per_image"] == 2
    assert record["soft_labels"]["augment"]["kind"] == "padcrop" and record["metrics"]["top1"] > 20
