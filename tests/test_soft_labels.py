"""The FKD soft-label store: quantise/recover, crop parameters, generation, replay and the teacher cache
(ferkd.md §7, tests 1, 2, 4, 5, 6, 9)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distillbench.benchmark.zoo import create_model
from distillbench.datasets import augment
from distillbench.datasets.base import ArrayDataset
from distillbench.datasets.crops import boxes_to_coords, coords_to_boxes, crop_resize
from distillbench.datasets.soft_labels import (
    CachedTeacherDataset,
    SoftLabelStore,
    SoftLabelStoreError,
    StoreBatchSampler,
    TeacherMeta,
    crop_params,
    epoch_plan,
    fkd_passes,
    generate_store,
    quantize,
    recover,
    replay_crop,
    teacher_forward,
)

AUG = {"kind": "rrc", "scale": (0.25, 1.0), "ratio": (0.75, 4 / 3), "flip": True}
META = TeacherMeta("resnet8", "f" * 64, 12, (0.4,), (0.3,))


# -- quantise / recover --------------------------------------------------------------------------
def test_quantize_and_recover_reference_values():
    q = quantize(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]), 2)
    assert torch.equal(q, torch.tensor([[[0.0, 1.0], [0.5, 0.2]]]))
    torch.testing.assert_close(recover(q, 5), torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1]]))
    torch.testing.assert_close(recover(q, 5, "marginal_renorm"), torch.tensor([[0.7142857, 0.2857143, 0.0, 0.0, 0.0]]))
    assert torch.equal(recover(q, 5, "hard"), torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="unknown recover mode"):
        recover(q, 5, "marginal_renorm_k5")


def test_recover_properties():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(64, 20, generator=g), dim=1)
    for k in (1, 3, 20):
        for mode in ("marginal_smoothing", "marginal_renorm", "hard"):
            torch.testing.assert_close(recover(quantize(p, k), 20, mode).sum(1), torch.ones(64), atol=1e-6, rtol=0)
        smoothed = recover(quantize(p, k), 20)
        top = p.topk(k, dim=1)
        assert torch.equal(smoothed.gather(1, top.indices), top.values)  # the top-k kept exactly
    assert torch.equal(recover(quantize(p, 20), 20), p)  # k = K: lossless
    idx = torch.arange(2048, dtype=torch.float32)
    assert torch.equal(idx.half().float(), idx)  # fp16 keeps every index < 2048 exact


# -- crop parameters -----------------------------------------------------------------------------
def test_integer_boxes_survive_the_normalised_coords():
    for size in (8, 28, 224, 475):
        n = 500
        top, left, h, w = augment.rrc_params(np.full(n, size), np.full(n, size), np.arange(n), np.zeros(n), 0)
        boxes = np.stack([top, left, h, w], axis=1)
        assert (boxes[:, 2:] >= 1).all() and (boxes[:, :2] + boxes[:, 2:] <= size).all()
        assert np.array_equal(coords_to_boxes(boxes_to_coords(boxes, size, size), size, size), boxes)


def test_crop_resize_identity_and_flip():
    img = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    full = crop_resize(img, np.array([[0, 0, 8, 8]] * 2), np.array([False, True]), 8, "bicubic")
    assert torch.equal(full[0], img[0].float() / 255) and torch.equal(full[1], img[1].float().flip(-1) / 255)


def test_stored_crop_j_is_the_live_rrc_crop_at_epoch_j(tiny):
    """Same box and flag → same pixels: replaying stored crop j (store seed s) at the student size gives the
    live `rrc` augmentation of that image at epoch j under seed s."""
    _, images, _ = tiny
    boxes, flips = crop_params(5, 3, 16, 10, 10, AUG)
    live = augment.apply(images[[3] * 16], np.full(16, 3), np.arange(16), 5, {**AUG, "size": 10, "scale": AUG["scale"]})
    replay = crop_resize(images[[3] * 16], boxes, flips, 10, "bilinear")
    assert flips.any() and (~flips).any()
    torch.testing.assert_close(replay * 255, live.float(), atol=1.0, rtol=0)  # flip order: ≤ 1 grey level
    assert (replay * 255 - live.float()).abs().gt(0.5).float().mean() < 0.02


# -- the store -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=7, in_chans=1).eval()
    images = torch.randint(0, 256, (10, 1, 10, 10), dtype=torch.uint8)
    labels = torch.arange(10) % 7
    return teacher, images, labels


def _generate(tiny, path, **kw):
    teacher, images, labels = tiny
    args = {"meta": META, "augment": AUG, "num_crops": 6, "k": 3, "shard_size": 4, "chunk": 7, **kw}
    return generate_store(teacher, images, labels, path, **args)


def _live(teacher, image, coords, flip, temperature=1.0):
    crop = replay_crop(image, coords, flip, META.size, "bicubic")
    logits, _ = teacher_forward(teacher, crop[None], META, False)
    return logits[0], F.softmax(logits[0] / temperature, dim=0)


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("float16", 1e-3)])
def test_store_round_trip_matches_the_live_teacher(tiny, tmp_path, dtype, tol):
    teacher, images, labels = tiny
    manifest = _generate(tiny, tmp_path / "s", label_dtype=dtype)
    store = SoftLabelStore.open(tmp_path / "s", expected_key=manifest["key"])
    assert store.num_images == 10 and store.num_crops == 6 and store.num_classes == 7
    for i in (0, 5, 9):
        coords, flips, q, gt_prob, logits = store.get(i)
        for j in range(6):
            z, p = _live(teacher, images[i], coords[j], flips[j])
            top = p.topk(3)
            assert np.array_equal(q[j, 0].astype(np.int64), top.indices.numpy())
            np.testing.assert_allclose(q[j, 1].astype(np.float32), top.values.numpy(), atol=tol)
            np.testing.assert_allclose(gt_prob[j], p[labels[i]].item(), atol=1e-5)
            np.testing.assert_allclose(logits[j], z.numpy(), atol=1e-5)


def test_store_is_reproducible_resumable_and_keyed(tiny, tmp_path):
    _generate(tiny, tmp_path / "a")
    manifest = _generate(tiny, tmp_path / "b")
    for f in sorted((tmp_path / "a").glob("shard-*/*.npy")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    # an interrupted generation: one shard gone, manifest not complete → resume regenerates only it
    shutil.rmtree(tmp_path / "b" / "shard-00001")
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(SoftLabelStoreError, match="did not finish"):
        SoftLabelStore.open(tmp_path / "b")
    resumed = _generate(tiny, tmp_path / "b")
    assert resumed["generation"]["images_generated"] == 4
    for f in sorted((tmp_path / "a").glob("shard-*/*.npy")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    # a reordered dataset, another teacher or another augmentation is refused, naming the field
    teacher, images, labels = tiny
    perm = torch.arange(9, -1, -1)
    other = _generate((teacher, images[perm], labels[perm]), tmp_path / "c")
    with pytest.raises(SoftLabelStoreError, match="data_sha256"):
        SoftLabelStore.open(tmp_path / "b", expected_key=other["key"])
    with pytest.raises(SoftLabelStoreError, match="teacher_sha256"):
        SoftLabelStore.open(tmp_path / "b", expected_key={**manifest["key"], "teacher_sha256": "0" * 64})
    with pytest.raises(SoftLabelStoreError, match="augment"):
        SoftLabelStore.open(tmp_path / "b", expected_key={**manifest["key"], "augment": {**AUG, "scale": [0.08, 1]}})
    with pytest.raises(SoftLabelStoreError, match="another key"):
        _generate(tiny, tmp_path / "b", num_crops=5)
    with pytest.raises(SoftLabelStoreError, match="no soft-label store"):
        SoftLabelStore.open(tmp_path / "nothing")


# -- replay --------------------------------------------------------------------------------------
def test_fkd_epoch_accounting():
    assert fkd_passes(12, 4) == [(0, 4), (4, 4), (8, 1), (9, 1), (10, 1), (11, 1)]
    assert fkd_passes(10, 2) == [(0, 2), (2, 2), (4, 2), (6, 2), (8, 1), (9, 1)]
    assert fkd_passes(3, 1) == [(0, 1), (1, 1), (2, 1)]
    plan = epoch_plan(12, 4)
    assert len(plan) == 12 and plan[:5] == [(0, 4, 0), (0, 4, 1), (0, 4, 2), (0, 4, 3), (4, 4, 0)]


def test_batches_are_crop_major_and_passes_cover_every_image_n_times():
    sampler = StoreBatchSampler(40, global_batch=8, epochs=6, num_crops=2, seed=1)
    assert len(sampler) == 5  # the single-crop number of steps in every epoch
    seen = []
    for epoch in (0, 1):  # one 2-crop pass = two Lightning epochs
        sampler.set_epoch(epoch)
        for keys in sampler:
            assert len(keys) == 8
            first, second = keys[:4], keys[4:]
            assert [k[0] for k in first] == [k[0] for k in second]  # same images, crop-major
            assert {k[2] for k in first} == {0} and {k[2] for k in second} == {1}
            seen += [k[0] for k in first]
    assert sorted(seen) == list(range(40))
    sampler.set_epoch(4)  # the last epochs: one crop per image, b images per step
    keys = next(iter(sampler))
    assert len({k[0] for k in keys}) == 8 and {k[1:] for k in keys} == {(4, 0)}
    kw = {"global_batch": 8, "epochs": 6, "num_crops": 2, "seed": 1}
    shards = [StoreBatchSampler(40, rank=r, world_size=2, **kw) for r in (0, 1)]
    merged = [k for s in shards for k in next(iter(s))]
    assert sorted(merged) == sorted(next(iter(StoreBatchSampler(40, **kw))))


def test_cached_targets_equal_the_live_teacher_for_the_replayed_crop(tiny, tmp_path):
    teacher, images, labels = tiny
    manifest = _generate(tiny, tmp_path / "s", k=7)
    store = SoftLabelStore.open(tmp_path / "s", expected_key=manifest["key"])
    data = ArrayDataset(images, labels, mean=META.mean, std=META.std)
    cached = CachedTeacherDataset(data, store, seed=0)
    keys = [(i, 0, s) for s in range(2) for i in range(10)]
    batch = cached.__getitems__(keys)
    assert len(set(zip(batch["index"].tolist(), batch["crop"].tolist(), strict=True))) == 20  # distinct crops
    for b in range(20):
        i, j = int(batch["index"][b]), int(batch["crop"][b])
        coords, flips, *_ = store.get(i)
        for t in (1.0, 4.0):
            _, p_live = _live(teacher, images[i], coords[j], flips[j], t)
            torch.testing.assert_close(F.softmax(batch["teacher_logits"][b] / t, 0), p_live, atol=1e-5, rtol=0)
        p_live = _live(teacher, images[i], coords[j], flips[j])[1]
        torch.testing.assert_close(batch["soft_target"][b], p_live, atol=1e-5, rtol=0)
        # the student's crop is the same box and flip, cut at its own size with bilinear interpolation
        student_crop = replay_crop(images[i], coords[j], flips[j], 10, "bilinear")
        torch.testing.assert_close(batch["image"][b], (student_crop - data.mean[0]) / data.std[0])
    pool = np.zeros((10, 6), dtype=bool)
    pool[:, 2] = True
    cached.restrict(pool)
    assert set(cached.__getitems__(keys[:10])["crop"].tolist()) == {2}
    with pytest.raises(SoftLabelStoreError, match="fewer than 2 crops"):
        cached.restrict(pool, min_crops=2)


def test_verify_store_reports_agreement(tiny, tmp_path):
    from distillbench.datasets.soft_labels import verify_store

    teacher, images, labels = tiny
    manifest = _generate(tiny, tmp_path / "s")
    check = verify_store(SoftLabelStore.open(tmp_path / "s", manifest["key"]), teacher, images, labels, META, n=4)
    assert check["crops"] == 24 and check["topk_indices_equal"] == 1.0
    assert check["max_abs_prob_err"] < 1e-5 and check["max_abs_logit_err"] < 1e-5
