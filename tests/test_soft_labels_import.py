"""`import_fkd_tar`: the official FKD soft-label files (szq0214/FKD `generate_soft_label.py`) → our store.

The test writes files exactly as the official generator does — one `torch.save([coords, flips, labels])`
per image at `<save_path>/train/<wnid>/<stem>.tar`, numpy arrays, labels quantised by argsort
(`label_quantization`), float16 with `--use_fp16` — as a folder, the released zip and a tar.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from distillbench.datasets.base import ArrayDataset
from distillbench.datasets.crops import boxes_to_coords, crop_resize
from distillbench.datasets.fkd_import import UNKNOWN_TEACHER, file_list_sha256, label_file_key
from distillbench.datasets.soft_labels import (
    CachedTeacherDataset,
    SoftLabelStore,
    SoftLabelStoreError,
    import_fkd_tar,
    sample_list_sha256,
)

K, N, TOP = 12, 6, 5
WNIDS = ["n01440764", "n01443537", "n01484850"]


def official_quantise(probs: np.ndarray, label_type: str) -> np.ndarray:
    """What `label_quantization` returns, written with numpy: argsort descending, top indices and values."""
    order = np.argsort(-probs, axis=1, kind="stable")
    if label_type == "hard":
        return order[:, 0].astype(np.int64)
    top = 1 if label_type == "smoothing" else TOP
    idx = order[:, :top]
    out = np.stack([idx.astype(np.float32), np.take_along_axis(probs, idx, 1)], axis=1)
    return out[:, :, 0] if label_type == "smoothing" else out


def write_official(root, images_per_class=3, label_type="marginal_smoothing_k5", fp16=False, seed=0, size=16):
    """The tree `root/train/<wnid>/<wnid>_<i>.tar`; returns {key: (coords, flips, labels, probs, boxes)}."""
    rng = np.random.default_rng(seed)
    written = {}
    for wnid in WNIDS:
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            h = rng.integers(4, size + 1, N)
            w = rng.integers(4, size + 1, N)
            boxes = np.stack([rng.integers(0, size - h + 1), rng.integers(0, size - w + 1), h, w], axis=1)
            coords = boxes_to_coords(boxes, size, size)
            flips = rng.random(N) < 0.5
            logits = 3 * rng.standard_normal((N, K)).astype(np.float32)
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            labels = official_quantise(probs.astype(np.float32), label_type)
            if fp16:
                coords, labels = np.float16(coords), np.float16(labels)
            torch.save([coords, flips, labels], root / "train" / wnid / f"{wnid}_{i}.tar")
            written[f"{wnid}/{wnid}_{i}.tar"] = (coords, flips, labels, probs, boxes)
    return written


@pytest.fixture
def official(tmp_path):
    root = tmp_path / "FKD_soft_label_500_crops_marginal_smoothing_k_5" / "imagenet"
    return root, write_official(root)


def test_folder_import_keeps_every_crop_and_label(official, tmp_path):
    root, written = official
    manifest = import_fkd_tar(root.parent.parent, tmp_path / "store", num_classes=K, shard_size=4)  # any prefix
    store = SoftLabelStore.open(tmp_path / "store", expected_key=manifest["key"])
    keys = sorted(written)  # ImageFolder order: sorted class folders, sorted files
    assert store.num_images == 9 and store.num_crops == N and store.k == TOP and store.num_classes == K
    assert manifest["key"]["teacher_sha256"] == UNKNOWN_TEACHER and not store.has_logits
    assert manifest["key"]["augment"] == {"kind": "rrc", "scale": [0.08, 0.936], "ratio": [0.75, 4 / 3], "flip": True}
    assert manifest["key"]["data_sha256"] == file_list_sha256(keys, [WNIDS.index(k.split("/")[0]) for k in keys])
    assert manifest["label_dtype"] == "float32" and len(manifest["shards"]) == 3
    for i, key in enumerate(keys):
        coords, flips, labels, probs, _ = written[key]
        got_coords, got_flips, got_labels, gt_prob = store.get(i)
        assert np.array_equal(got_coords, coords) and np.array_equal(got_flips, flips)
        assert np.array_equal(got_labels, labels)
        y = WNIDS.index(key.split("/")[0])
        for j in range(N):
            top = labels[j, 0].astype(int)
            expected = probs[j, y] if y in top else (1 - labels[j, 1].sum()) / (K - TOP)
            assert gt_prob[j] == pytest.approx(expected, abs=1e-6)
    # resuming a complete import rewrites nothing; another teacher's run refuses the store by name
    again = import_fkd_tar(root, tmp_path / "store", num_classes=K, shard_size=4)
    assert again["key"] == manifest["key"]
    with pytest.raises(SoftLabelStoreError, match="teacher_sha256"):
        SoftLabelStore.open(tmp_path / "store", expected_key={**manifest["key"], "teacher_sha256": "a" * 64})


def test_zip_and_tar_releases_import_to_identical_shards(official, tmp_path):
    root, _ = official
    import_fkd_tar(root, tmp_path / "from_folder", num_classes=K)
    release = tmp_path / "release.zip"  # the released archive: <name>/imagenet/train/<wnid>/<stem>.tar
    with zipfile.ZipFile(release, "w") as z:
        for f in sorted(root.rglob("*.tar")):
            z.write(f, f"FKD_soft_label_500_crops_marginal_smoothing_k_5/imagenet/{f.relative_to(root)}")
    with tarfile.open(tmp_path / "release.tar.gz", "w:gz") as t:
        t.add(root, arcname="imagenet")
    for archive in (release, tmp_path / "release.tar.gz"):
        out = tmp_path / archive.name.replace(".", "_")
        import_fkd_tar(archive, out, num_classes=K)
        for f in sorted((tmp_path / "from_folder").glob("shard-*/*.npy")):
            assert f.read_bytes() == (out / f.relative_to(tmp_path / "from_folder")).read_bytes()


@pytest.mark.parametrize("label_type", ["hard", "smoothing"])
def test_top1_label_types_become_k_1(tmp_path, label_type):
    written = write_official(tmp_path / "fkd", images_per_class=1, label_type=label_type)
    import_fkd_tar(tmp_path / "fkd", tmp_path / "s", num_classes=K)
    store = SoftLabelStore.open(tmp_path / "s")
    assert store.k == 1
    for i, key in enumerate(sorted(written)):
        probs = written[key][3]
        labels = store.get(i)[2]
        assert np.array_equal(labels[:, 0, 0], probs.argmax(1).astype(np.float32))
        expected = np.ones(N, np.float32) if label_type == "hard" else probs.max(1)
        np.testing.assert_allclose(labels[:, 1, 0], expected, rtol=0, atol=1e-7)


def test_fp16_files_give_a_float16_store(tmp_path):
    written = write_official(tmp_path / "fkd", images_per_class=1, fp16=True)
    manifest = import_fkd_tar(tmp_path / "fkd", tmp_path / "s", num_classes=K)
    store = SoftLabelStore.open(tmp_path / "s")
    assert manifest["label_dtype"] == "float16"
    coords, _, labels, _ = store.get(0)
    first = written[sorted(written)[0]]
    assert labels.dtype == np.float16 and np.array_equal(labels, first[2])
    assert coords.dtype == np.float32 and np.array_equal(coords, first[0].astype(np.float32))


def test_explicit_sample_order_and_a_replayable_store(official, tmp_path):
    """Rows follow the run's own sample list (here a subset, reversed); with that dataset's sample hash
    the store replays like a generated one: the stored box and flip, the recovered official label."""
    root, written = official
    keys = sorted(written)[::-2]
    samples = [k.replace(".tar", ".JPEG") for k in keys]
    labels = torch.tensor([WNIDS.index(k.split("/")[0]) for k in keys])
    images = torch.randint(
        0, 256, (len(keys), 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    data = ArrayDataset(images, labels, mean=(0.5,) * 3, std=(0.25,) * 3)
    sha = sample_list_sha256(images, labels)
    manifest = import_fkd_tar(
        root, tmp_path / "s", samples=samples, labels=labels.tolist(), num_classes=K, data_sha256=sha
    )
    assert manifest["imported"]["files_used"] == 5 and manifest["imported"]["files_skipped"] == 4
    store = SoftLabelStore.open(tmp_path / "s", expected_key=manifest["key"])
    batch = CachedTeacherDataset(data, store, seed=3).__getitems__([(i, 0, 0) for i in range(len(keys))])
    for b, key in enumerate(keys):
        j = int(batch["crop"][b])
        _, flips, quantised, _, boxes = written[key]
        expected = np.full(K, (1 - quantised[j, 1].sum()) / (K - TOP), dtype=np.float32)
        expected[quantised[j, 0].astype(int)] = quantised[j, 1]
        np.testing.assert_allclose(batch["soft_target"][b].numpy(), expected, atol=1e-7)
        pixels = crop_resize(images[b : b + 1], boxes[j : j + 1], flips[j : j + 1], 16, "bilinear")[0]
        torch.testing.assert_close(batch["image"][b], (pixels - 0.5) / 0.25)
    with pytest.raises(SoftLabelStoreError, match="no soft-label file for 1 of 2 samples"):
        import_fkd_tar(root, tmp_path / "t", samples=[samples[0], "n09999999/x.JPEG"], labels=[0, 1], num_classes=K)


def test_anything_but_numpy_arrays_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "fkd" / "train" / "n0").mkdir(parents=True)
    torch.save([Payload(), np.zeros(1, bool), np.zeros((1, 2, 5), np.float32)], tmp_path / "fkd/train/n0/a.tar")
    with pytest.raises(
        SoftLabelStoreError,
        match=r"numpy arrays only \(.*Unsupported global: GLOBAL print was not an allowed global by default\.\)",
    ):
        import_fkd_tar(tmp_path / "fkd", tmp_path / "s", num_classes=K)
    torch.save([np.zeros((2, 4), np.float32), np.zeros(2, bool)], tmp_path / "fkd/train/n0/a.tar")
    with pytest.raises(SoftLabelStoreError, match=r"expected \[coords, flips, labels\]"):
        import_fkd_tar(tmp_path / "fkd", tmp_path / "s", num_classes=K)
    bad = np.array([[[K + 3.0], [1.0]]] * 2, np.float32)  # a class index beyond the classes
    torch.save([np.zeros((2, 4), np.float32), np.zeros(2, bool), bad], tmp_path / "fkd/train/n0/a.tar")
    with pytest.raises(SoftLabelStoreError, match="class indices not integers"):
        import_fkd_tar(tmp_path / "fkd", tmp_path / "s", num_classes=K)
    with pytest.raises(SoftLabelStoreError, match="no FKD soft labels"):
        import_fkd_tar(tmp_path / "nothing", tmp_path / "s")


def test_files_written_by_numpy_1_and_the_legacy_torch_format_load(tmp_path):
    """Labels made in 2021–22: NumPy 1.x names its reconstructor `numpy.core.multiarray`, and old torch
    wrote the non-zip format."""
    buf = io.BytesIO()
    arrays = [np.full((2, 4), 0.25, np.float32), np.array([True, False]), np.array([[[3.0], [0.9]]] * 2, np.float32)]
    torch.save(arrays, buf, _use_new_zipfile_serialization=False)
    (tmp_path / "fkd" / "n0").mkdir(parents=True)
    (tmp_path / "fkd" / "n0" / "a.tar").write_bytes(buf.getvalue().replace(b"numpy._core.", b"numpy.core."))
    import_fkd_tar(tmp_path / "fkd", tmp_path / "s", num_classes=K)
    coords, flips, labels, _ = SoftLabelStore.open(tmp_path / "s").get(0)
    assert np.array_equal(coords, arrays[0]) and np.array_equal(flips, arrays[1]) and np.array_equal(labels, arrays[2])
    assert label_file_key("n0/n0_1.JPEG") == "n0/n0_1.tar" and json.dumps(label_file_key("a/b.c.png")) == '"a/b.tar"'
