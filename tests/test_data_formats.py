"""CIFAR pickled batches and the ImageNet ImageFolder tree: generated in the exact formats, loaded
through the real code; the restricted unpickler; RandomResizedCrop / resize-centre-crop against
torchvision; clear errors for missing, malformed and malicious data."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from distillbench.datasets import DatasetNotFoundError, create_datamodule
from distillbench.datasets.augment import apply, flip_mask, resize_center_crop, rrc_params
from distillbench.datasets.cifar import CIFAR10, CIFAR100, load_cifar_arrays, read_batch
from distillbench.datasets.errors import CorruptDatasetError
from distillbench.datasets.imagenet import load_imagenet_index
from distillbench.datasets.make_tiny import dump_py2_pickle, main, make_cifar, make_imagenet
from distillbench.datasets.safe_pickle import load_pickle
from PIL import Image


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_cifar(CIFAR100, root)
    make_cifar(CIFAR10, root, train_per_class=6)
    make_imagenet(root)
    return root


def test_py2_pickle_matches_stdlib_and_restricted_loader(tmp_path):
    data = (np.arange(3 * 3072) % 253).astype(np.uint8).reshape(3, 3072)
    obj = {"data": data, "labels": [0, 300, 70000], "batch_label": "b" * 300}
    dump_py2_pickle(obj, tmp_path / "batch")
    raw = (tmp_path / "batch").read_bytes()
    assert raw.startswith(b"\x80\x02}") and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    trusted = pickle.loads(raw, encoding="latin1")  # our own bytes: a second, independent decoder
    loaded = load_pickle(tmp_path / "batch")
    for out in (trusted, loaded):
        np.testing.assert_array_equal(out["data"], data)
        assert out["labels"] == [0, 300, 70000] and out["batch_label"] == "b" * 300


def test_python3_repickled_batch_also_loads(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(tmp_path / "b", "wb") as f:
        pickle.dump({"data": images, "fine_labels": [1, 2, 3, 99]}, f, protocol=2)
    x, y = read_batch(tmp_path / "b", CIFAR100)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [1, 2, 3, 99]
    np.testing.assert_array_equal(x[2, 1].reshape(-1), images[2, 1024:2048])  # R, G, B planes, row-major


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = b"\x80\x02cposix\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little")
    payload += f"touch {marker}".encode() + b"\x85R."
    (tmp_path / "evil").write_bytes(payload)
    with pytest.raises(CorruptDatasetError, match=r"refusing global posix\.system"):
        load_pickle(tmp_path / "evil")
    assert not marker.exists()
    (tmp_path / "short").write_bytes(b"\x80\x02}(U\x04data")
    with pytest.raises(CorruptDatasetError, match="not a valid dataset pickle"):
        load_pickle(tmp_path / "short")


def test_cifar100_tree_loads_through_the_datamodule(tiny_root):
    arrays = load_cifar_arrays("cifar100", str(tiny_root), download=False)
    (x, y), (xt, _) = arrays["train"], arrays["test"]
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.uint8 and xt.shape == (200, 3, 32, 32)
    assert torch.bincount(y, minlength=100).tolist() == [10] * 100
    dm = create_datamodule("cifar100", root=str(tiny_root), val_size=0.1, batch_size=64, image_size=32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (900, 100, 200)
    assert torch.bincount(dm.val_set.labels, minlength=100).tolist() == [1] * 100  # stratified
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 3, 32, 32) and dm.input_shape == (3, 32, 32)
    other = tiny_root / "other"
    make_cifar(CIFAR100, other, seed=1)
    assert create_datamodule("cifar100", root=str(other)).fingerprint() != dm.fingerprint()


def test_cifar10_concatenates_five_batches(tiny_root):
    arrays = load_cifar_arrays("cifar10", str(tiny_root / "cifar10"), search=[tiny_root / "cifar-10-batches-py"])
    x, _ = arrays["train"]
    parts = [read_batch(tiny_root / "cifar-10-batches-py" / f"data_batch_{i}", CIFAR10) for i in range(1, 6)]
    assert len(x) == 60 == sum(len(p[1]) for p in parts)
    np.testing.assert_array_equal(x.numpy(), np.concatenate([p[0] for p in parts]))


def test_missing_cifar_names_every_place(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar_arrays("cifar100", str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message and str(tmp_path / "cifar100" / "cifar-100-python") in message
    assert "make_tiny --format cifar100" in message and "DISTILLBENCH_DOWNLOAD=1" in message
    with pytest.raises(DatasetNotFoundError, match="DATA_ROOT is not set"):
        load_cifar_arrays("cifar10", None, download=False)
    (tmp_path / "cifar-100-python").mkdir()
    for name in ("train", "test", "meta"):
        dump_py2_pickle(
            {"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, tmp_path / "cifar-100-python" / name
        )
    with pytest.raises(CorruptDatasetError, match="class names"):
        load_cifar_arrays("cifar100", str(tmp_path), download=False)


def test_rrc_params_follow_torchvision_rule():
    n = 4000
    h, w = np.full(n, 40), np.full(n, 60)
    top, left, ch, cw = rrc_params(h, w, np.arange(n), np.zeros(n, np.int64), 3, (0.08, 1.0), (3 / 4, 4 / 3))
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= 40).all() and (left + cw <= 60).all()
    area = ch * cw / 2400
    torch.manual_seed(0)
    image = torch.zeros(1, 40, 60)
    tv = np.array([np.prod(T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])[2:]) for _ in range(n)])
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert abs(np.median(area) - np.median(tv / 2400)) < 0.03 and abs(area.mean() - tv.mean() / 2400) < 0.02
    aspect = cw / ch
    assert aspect.min() > 0.6 and aspect.max() < 1.6
    again = rrc_params(h, w, np.arange(n), np.zeros(n, np.int64), 3)
    assert all((a == b).all() for a, b in zip((top, left, ch, cw), again, strict=True))
    # impossible scale → torchvision's fallback: the whole image, centre-cropped to the nearest allowed aspect
    ft, fl, fh, fw = rrc_params(
        np.array([10, 100]), np.array([100, 10]), np.arange(2), np.zeros(2, np.int64), 0, (2, 3)
    )
    assert (fh.tolist(), fw.tolist()) == ([10, 13], [13, 10]) and (ft.tolist(), fl.tolist()) == ([0, 43], [43, 0])


def test_in_memory_rrc_and_eval_match_torchvision():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8))
    index, epoch = np.arange(6), np.full(6, 2)
    spec = {"kind": "rrc", "size": 48, "scale": (0.3, 1.0), "ratio": (3 / 4, 4 / 3), "flip": False}
    out = apply(images, index, epoch, 5, spec)
    top, left, h, w = rrc_params(np.full(6, 32), np.full(6, 32), index, epoch, 5, (0.3, 1.0), (3 / 4, 4 / 3))
    for k in range(6):
        ref = TF.resized_crop(images[k], int(top[k]), int(left[k]), int(h[k]), int(w[k]), [48, 48], antialias=True)
        assert (out[k].int() - ref.int()).abs().max() <= 1
    ev = resize_center_crop(images, 28, crop_pct=0.875)  # resize 32 → 32, crop 28
    np.testing.assert_array_equal(ev.numpy(), TF.center_crop(images, [28, 28]).numpy())
    big = resize_center_crop(images, 224)
    ref = TF.center_crop(TF.resize(images, 256, antialias=True), [224, 224])
    assert big.shape == (6, 3, 224, 224) and (big.int() - ref.int()).abs().max() <= 1


def test_hetero_style_cifar_datamodule_upsamples(tiny_root):
    dm = create_datamodule(
        "cifar100", root=str(tiny_root), batch_size=16, augment={"kind": "rrc", "flip": True}, image_size=64
    )
    train = next(iter(dm.train_dataloader()))
    val, test = (next(iter(loader)) for loader in dm.val_dataloader())
    assert val["image"].shape[1:] == (3, 64, 64)
    assert train["image"].shape == (16, 3, 64, 64) and test["image"].shape[1:] == (3, 64, 64)
    assert dm.eval_spec == {"kind": "resize_crop", "size": 64, "crop_pct": 0.875} and dm.input_shape == (3, 64, 64)


def test_imagenet_tree_loads_with_torchvision_transforms(tiny_root):
    dm = create_datamodule(
        "imagenet", root=str(tiny_root), batch_size=8, val_size=4, augment={"kind": "rrc", "flip": True}, image_size=32
    )
    dm.setup()
    assert dm.classes == sorted(dm.classes) and len(dm.classes) == 4
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20, 4, 8)
    assert dm.test_set.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    batch = dm.train_set.__getitems__([(0, 3), (5, 3)])
    assert batch["image"].shape == (2, 3, 32, 32)
    # the train crop equals torchvision's resized_crop (PIL) at our box; eval equals Resize(36) + CenterCrop(32)
    pil = Image.open(dm.train_set.folder / dm.train_set.files[0]).convert("RGB")
    top, left, h, w = rrc_params(np.array([pil.height]), np.array([pil.width]), np.array([0]), np.array([3]), dm.seed)
    ref = TF.resized_crop(pil, int(top[0]), int(left[0]), int(h[0]), int(w[0]), [32, 32])
    ref = TF.hflip(ref) if flip_mask(np.array([0]), np.array([3]), dm.seed)[0] else ref
    expected = (TF.to_tensor(ref) - dm.train_set.mean[0]) / dm.train_set.std[0]
    torch.testing.assert_close(batch["image"][0], expected, atol=1e-5, rtol=0)
    test_pil = Image.open(dm.test_set.folder / dm.test_set.files[0]).convert("RGB")
    ref = TF.center_crop(TF.resize(test_pil, 36), [32, 32])
    expected = (TF.to_tensor(ref) - dm.test_set.mean[0]) / dm.test_set.std[0]
    torch.testing.assert_close(dm.test_set[0]["image"], expected, atol=1e-5, rtol=0)
    assert (
        dm.fingerprint()
        == create_datamodule(
            "imagenet", root=str(tiny_root), val_size=4, image_size=32, augment={"kind": "rrc"}
        ).fingerprint()
    )


def test_imagenet_layout_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(DatasetNotFoundError) as info:
        load_imagenet_index(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "imagenet") in message and str(tmp_path / "ILSVRC2012") in message
    assert "train/<wnid>/*.JPEG" in message and "does not exist" in message
    make_imagenet(tmp_path, classes=3)
    val = tmp_path / "imagenet" / "val"
    for image in list(val.glob("*/*.JPEG")):
        image.rename(val / image.name)
    for folder in val.iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(CorruptDatasetError, match=r"holds 6 images directly, not in <wnid>/ folders"):
        load_imagenet_index(str(tmp_path))
    (val / "n09999999").mkdir()
    with pytest.raises(CorruptDatasetError, match=r"only in train/: \['n01440764'.*only in val/: \['n09999999'\]"):
        load_imagenet_index(str(tmp_path))


def test_corrupt_jpeg_is_named(tmp_path):
    make_imagenet(tmp_path, classes=2)
    victim = next((tmp_path / "imagenet" / "val").glob("*/*.JPEG"))
    victim.write_bytes(victim.read_bytes()[:40])
    dm = create_datamodule("imagenet", root=str(tmp_path), val_size=2, augment={"kind": "rrc"}, image_size=16)
    dm.setup()
    with pytest.raises(CorruptDatasetError, match=victim.name):
        dm.test_set.__getitems__(list(range(len(dm.test_set))))


def test_make_tiny_cli(tmp_path, capsys):
    assert main(["--format", "cifar10", "--out", str(tmp_path), "--train-per-class", "5"]) == 0
    assert "DATA_ROOT=" in capsys.readouterr().out
    assert load_cifar_arrays("cifar10", str(tmp_path))["train"][0].shape == (50, 3, 32, 32)
