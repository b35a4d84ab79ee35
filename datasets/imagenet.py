"""ImageNet-1K (ILSVRC-2012) from an ImageFolder tree: `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`.

Class indices are the sorted wnids of `train/` (the standard order, which torchvision/timm weights
use); `val/` must hold the same wnid folders — the official validation archive is flat and has to be
sorted into them first. `val/` is the test split; the held-out slice for tuning is carved from
`train/`, stratified, as for every protocol.

Images are decoded per sample (PIL) in the data-loader workers. Training crops follow
`augment.rrc_params` (torchvision's RandomResizedCrop rule, parameters a function of (seed, epoch,
index) only); evaluation is Resize(size / crop_pct) + CenterCrop(size), i.e. 256 → 224.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from . import timm_augment
from .augment import DEFAULT_CROP_PCT, center_box, flip_mask, resize_shorter, rrc_params
from .base import ArrayDataModule, stratified_split
from .errors import CorruptDatasetError, DatasetError, DatasetNotFoundError

EXTENSIONS = (".jpeg", ".jpg", ".png")
LAYOUT = "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (one folder per class, same wnids in both)"
HOW_TO_GET = [
    "register at https://image-net.org and download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
    "extract train/ (one inner .tar per wnid → train/<wnid>/) and sort the flat val/ images into val/<wnid>/ "
    "using the ground truth (e.g. the LOC_val_solution.csv of the Kaggle release)",
    "place the tree at $DATA_ROOT/imagenet (or $DATA_ROOT/ILSVRC2012, or $DATA_ROOT itself)",
    "a tiny tree in the same layout for smoke runs: "
    "python -m distillbench.datasets.make_tiny --format imagenet --out DIR",
]


def candidate_dirs(root: str | None) -> list[Path]:
    root = root or os.environ.get("DATA_ROOT")
    if not root:
        return []
    return [Path(root) / "imagenet", Path(root) / "ILSVRC2012", Path(root)]


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(EXTENSIONS))


def _class_dirs(split_dir: Path) -> list[str]:
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def scan_split(split_dir: Path, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Relative paths `<wnid>/<file>` and labels (index of the wnid in `classes`)."""
    files, labels = [], []
    for label, wnid in enumerate(classes):
        names = _images_in(split_dir / wnid)
        if not names:
            raise CorruptDatasetError(f"{split_dir / wnid}: class folder without images ({', '.join(EXTENSIONS)})")
        files += [f"{wnid}/{n}" for n in names]
        labels += [label] * len(names)
    return files, np.asarray(labels, dtype=np.int64)


def describe(folder: Path) -> str:
    """What a folder holds, for error messages."""
    if not folder.exists():
        return "does not exist"
    subdirs = _class_dirs(folder)
    flat = _images_in(folder)
    return f"{len(subdirs)} sub-folder(s) {subdirs[:4]}{'…' if len(subdirs) > 4 else ''}, {len(flat)} image file(s)"


def find_tree(root: str | None, search: list[Path] | None = None) -> Path:
    searched = search if search is not None else candidate_dirs(root)
    for place in searched:
        if (place / "train").is_dir() and (place / "val").is_dir():
            return place
    found = [f"{p}: {describe(p)}" for p in searched] or ["(nowhere: DATA_ROOT is not set and no root was given)"]
    raise DatasetNotFoundError("imagenet", [*found, f"expected layout: {LAYOUT}"], HOW_TO_GET)


def load_imagenet_index(root: str | None = None, *, search: list[Path] | None = None) -> dict[str, Any]:
    """Scan the tree: {"root", "classes", "train": (files, labels), "test": (files, labels)}."""
    tree = find_tree(root, search)
    classes = _class_dirs(tree / "train")
    if not classes:
        raise CorruptDatasetError(f"{tree / 'train'}: no class folders ({describe(tree / 'train')}); expected {LAYOUT}")
    val_classes = _class_dirs(tree / "val")
    if not val_classes and _images_in(tree / "val"):
        raise CorruptDatasetError(
            f"{tree / 'val'} holds {len(_images_in(tree / 'val'))} images directly, not in <wnid>/ folders: sort "
            f"the official (flat) validation images into val/<wnid>/ first; expected {LAYOUT}"
        )
    if set(val_classes) != set(classes):
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise CorruptDatasetError(
            f"{tree}: train/ and val/ must hold the same class folders; only in train/: {only_train[:5]} "
            f"({len(only_train)}), only in val/: {only_val[:5]} ({len(only_val)}); expected {LAYOUT}"
        )
    if len(classes) > ImageNetDataModule.num_classes:
        raise CorruptDatasetError(f"{tree / 'train'}: {len(classes)} class folders, more than ImageNet-1K's 1000")
    return {
        "root": tree,
        "classes": classes,
        "train": scan_split(tree / "train", classes),
        "test": scan_split(tree / "val", classes),
    }


class ImageFileDataset(Dataset):
    """Image files decoded per sample; keys `index` or `(index, epoch)` like `ArrayDataset`.

    `spec` is the transform: `rrc` (training) or `resize_crop` (evaluation), with `size`.
    """

    def __init__(
        self,
        folder: Path,
        files: Sequence[str],
        labels: Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        spec: Mapping[str, Any],
        seed: int = 0,
    ):
        self.folder, self.files, self.labels = Path(folder), list(files), labels.long()
        self.spec, self.seed = dict(spec), seed
        if self.spec.get("kind") not in ("rrc", "resize_crop") or "size" not in self.spec:
            raise DatasetError(f"image files need an 'rrc' or 'resize_crop' transform with a size, got {self.spec}")
        self.size = int(self.spec["size"])
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def _open(self, i: int) -> Image.Image:
        path = self.folder / self.files[i]
        try:
            image = Image.open(path)
            image.load()
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            raise CorruptDatasetError(f"{path}: cannot decode image ({exc}); replace or remove the file") from None
        return image.convert("RGB")

    def _eval(self, image: Image.Image) -> Image.Image:
        short = int(self.size / float(self.spec.get("crop_pct", DEFAULT_CROP_PCT)))
        h, w = resize_shorter(image.height, image.width, short)
        image = image.resize((w, h), Image.BILINEAR)
        top, left = center_box(h, w, self.size)
        return image.crop((left, top, left + self.size, top + self.size))

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> dict[str, Tensor]:
        pairs = [k if isinstance(k, tuple) else (k, 0) for k in keys]
        index = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
        epoch = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
        images = [self._open(int(i)) for i in index]
        if self.spec["kind"] == "rrc":
            top, left, h, w = rrc_params(
                np.array([im.height for im in images]),
                np.array([im.width for im in images]),
                index,
                epoch,
                self.seed,
                tuple(self.spec.get("scale", (0.08, 1.0))),
                tuple(self.spec.get("ratio", (3 / 4, 4 / 3))),
            )
            flips = flip_mask(index, epoch, self.seed) if self.spec.get("flip", True) else np.zeros(len(index), bool)
            out = []
            for k, im in enumerate(images):
                box = (int(left[k]), int(top[k]), int(left[k] + w[k]), int(top[k] + h[k]))
                im = im.crop(box).resize((self.size, self.size), Image.BILINEAR)  # torchvision's order
                out.append(im.transpose(Image.FLIP_LEFT_RIGHT) if flips[k] else im)
            images = out
            if self.spec.get("auto_augment"):  # timm's RandAugment after the crop (OFA's ViT/MLP recipe)
                mean = self.mean.flatten().tolist()
                images = timm_augment.rand_augment(images, index, epoch, self.seed, self.spec["auto_augment"], mean)
        else:
            images = [self._eval(im) for im in images]
        batch = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)
        idx = torch.from_numpy(index)
        x = ((batch.float().div_(255.0) - self.mean) / self.std).contiguous()
        if self.spec.get("re_prob"):  # timm's RandomErasing acts on the normalised image
            x = timm_augment.random_erase(x, index, epoch, self.seed, float(self.spec["re_prob"]))
        return {"image": x, "label": self.labels[idx], "index": idx}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        batch = self.__getitems__([key])
        return {k: v[0] for k, v in batch.items()}


class ImageNetDataModule(ArrayDataModule):
    """ImageNet-1K; same splits, sampler and loaders as the in-memory modules, files decoded per sample."""

    name = "imagenet"
    num_classes = 1000
    default_mean = (0.485, 0.456, 0.406)
    default_std = (0.229, 0.224, 0.225)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.augment_spec.get("kind") != "rrc" or "size" not in self.augment_spec:
            raise DatasetError(
                "imagenet needs the 'rrc' augmentation with a size (the protocol's input.size), "
                f"got {self.augment_spec}"
            )
        index = load_imagenet_index(self.root)
        self.classes = index["classes"]
        files, labels = index["train"]
        kept, held = stratified_split(labels, self.val_size, self.split_seed)
        files = np.asarray(files, dtype=object)
        tree, kw = index["root"], {"mean": self.mean, "std": self.std, "seed": self.seed}
        self.train_set = ImageFileDataset(
            tree / "train", files[kept], torch.from_numpy(labels[kept]), spec=self.augment_spec, **kw
        )
        self.val_set = ImageFileDataset(
            tree / "train", files[held], torch.from_numpy(labels[held]), spec=self.eval_spec, **kw
        )
        test_files, test_labels = index["test"]
        self.test_set = ImageFileDataset(
            tree / "val", test_files, torch.from_numpy(test_labels), spec=self.eval_spec, **kw
        )

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the training split's relative paths, file sizes and labels (not the pixels:
        hashing 140 GB per run is not affordable; a changed file almost always changes its size)."""
        self.setup()
        digest = hashlib.sha256(self.name.encode())
        for rel, label in zip(self.train_set.files, self.train_set.labels.tolist(), strict=True):
            size = (self.train_set.folder / rel).stat().st_size
            digest.update(f"{rel}\0{size}\0{label}\n".encode())
        return digest.hexdigest()[:16]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = int(self.augment_spec["size"])
        return (3, size, size)
