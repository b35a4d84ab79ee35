"""COCO detection data (train2017/, val2017/, annotations/instances_*.json) read through pycocotools.

Targets follow torchvision detection: boxes xyxy float32, labels int64 in contiguous 1..K (0 = background),
image_id, area, iscrowd. ``CocoDataModule`` finds the tree at ``root`` or ``$DATA_ROOT/coco``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .errors import CorruptDatasetError, DatasetNotFoundError

HOW_TO_GET = [
    "download train2017.zip, val2017.zip and annotations_trainval2017.zip from https://cocodataset.org/#download "
    "and unzip them into $DATA_ROOT/coco",
    "or, for a small local test set: python -m distillbench.datasets.shapes --root $DATA_ROOT/coco",
]


def expected_paths(root: Path, split: str) -> list[Path]:
    return [root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"]


def resolve_root(root=None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("DATA_ROOT")
    if not env:
        raise DatasetNotFoundError("coco", ["(nowhere: DATA_ROOT is not set and no root was given)"], HOW_TO_GET)
    return Path(env) / "coco"


def load_coco(ann_file: Path):
    """pycocotools COCO for ``ann_file``, with a clear error for a corrupt/non-COCO file; no printing."""
    from pycocotools.coco import COCO

    try:
        doc = json.loads(Path(ann_file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptDatasetError(f"{ann_file}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not all(k in doc for k in ("images", "annotations", "categories")):
        raise CorruptDatasetError(f"{ann_file}: not a COCO instances file (needs images, annotations, categories)")
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """Images of one split with torchvision-detection targets."""

    def __init__(self, root, split: str = "val", flip: bool = False):
        self.root = Path(root)
        self.split = split
        self.flip = flip  # random horizontal flip of image and boxes (training augmentation), torch's RNG
        paths = expected_paths(self.root, split)
        missing = [p for p in paths if not p.exists()]
        if missing:
            searched = [f"{p} ({'found' if p.exists() else 'MISSING'})" for p in paths]
            raise DatasetNotFoundError(f"coco {split}", searched, HOW_TO_GET)
        self.img_dir, self.ann_file = paths
        self.coco = load_coco(self.ann_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.ids = sorted(self.coco.getImgIds())

    @property
    def num_classes(self) -> int:
        """Foreground classes K (labels are 1..K, 0 is background)."""
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, image_id: int) -> dict:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": int(image_id),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64),
        }

    def __getitem__(self, idx: int):
        image_id = self.ids[idx]
        info = self.coco.loadImgs([image_id])[0]
        path = self.img_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except FileNotFoundError:
            raise DatasetNotFoundError(f"coco image {info['file_name']}", [str(path)], HOW_TO_GET) from None
        image = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        target = self.target(image_id)
        if self.flip and bool(torch.rand(()) < 0.5):
            image, target = hflip(image, target)
        return image, target


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror a CHW image and its xyxy boxes left-right."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def collate(batch):
    """(list[image CHW], list[target]) — detection images differ in size, so no stacking."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


class CocoDataModule(L.LightningDataModule):
    """COCO detection (train2017 / val2017) from ``root`` or ``$DATA_ROOT/coco``. ``flip``: random horizontal
    flips of the training images (Detectron2's default augmentation)."""

    name = "coco"

    def __init__(self, root=None, batch_size: int = 8, num_workers: int = 0, flip: bool = False):
        super().__init__()
        self.root = resolve_root(root)
        self.batch_size, self.num_workers, self.flip = batch_size, num_workers, flip
        self.train_set: CocoDetection | None = None
        self.val_set: CocoDetection | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = CocoDetection(self.root, "train", flip=self.flip)
        if self.val_set is None:
            self.val_set = CocoDetection(self.root, "val")

    @property
    def eval_batch_size(self) -> int:
        return self.batch_size

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the training annotations: which data a teacher was trained on."""
        self.setup("fit")
        digest = hashlib.sha256(self.name.encode())
        with open(self.train_set.ann_file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:16]

    def train_pass_loader(self) -> DataLoader:
        """Every training image once, in order, without augmentation (ND's class-means pass)."""
        self.setup("fit")
        plain = CocoDetection(self.root, "train")
        loader = plain, self.batch_size
        return DataLoader(*loader, shuffle=False, num_workers=self.num_workers, collate_fn=collate)

    @property
    def num_classes(self) -> int:
        self.setup("validate")
        return self.val_set.num_classes

    def train_dataloader(self):
        dl = self.train_set, self.batch_size
        return DataLoader(*dl, shuffle=True, num_workers=self.num_workers, collate_fn=collate)

    def val_dataloader(self):
        dl = self.val_set, self.batch_size
        return DataLoader(*dl, shuffle=False, num_workers=self.num_workers, collate_fn=collate)


def _detection_augment(augment) -> bool:
    """A detection protocol's `augment`: {kind: none, flip: bool} (random horizontal flips or none)."""
    augment = dict(augment or {"kind": "none"})
    if augment.get("kind", "none") != "none" or set(augment) - {"kind", "flip"}:
        raise ValueError(f"detection data takes augment {{kind: none, flip: true|false}}, got {augment}")
    return bool(augment.get("flip", False))


class CocoProtocolDataModule(CocoDataModule):
    """The `coco` dataset of the protocol registry: ``$DATA_ROOT/coco`` (``root`` is the data root, as for
    every registered dataset); takes the runner's keyword arguments, of which detection uses the batch size,
    workers and ``augment`` (flip)."""

    def __init__(self, root=None, *, batch_size: int = 8, num_workers: int = 0, augment=None, **_recipe):
        tree = Path(root) / "coco" if root else None
        super().__init__(tree, batch_size=batch_size, num_workers=num_workers, flip=_detection_augment(augment))


def shapes_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distillbench"


class ShapesDataModule(CocoDataModule):
    """The generated `shapes` set (datasets/shapes.py) in COCO layout, made on first use under
    ``<root>/shapes/<settings>`` (``root``: the data root, else ``~/.cache/distillbench``); the images are
    ``image_size`` px squares (the protocol's input size)."""

    name = "shapes"

    def __init__(
        self,
        root=None,
        *,
        batch_size: int = 8,
        num_workers: int = 0,
        augment=None,
        image_size: int = 64,
        num_train: int = 64,
        num_val: int = 16,
        gen_seed: int = 0,
        **_recipe,
    ):
        base = Path(root) if root else shapes_cache_root()
        self.settings = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": gen_seed}
        tree = base / "shapes" / f"n{num_train}-{num_val}-px{image_size}-seed{gen_seed}"
        super().__init__(tree, batch_size=batch_size, num_workers=num_workers, flip=_detection_augment(augment))

    def prepare(self) -> None:
        if all(p.exists() for split in ("train", "val") for p in expected_paths(self.root, split)):
            return
        from .shapes import make_shapes

        self.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.", dir=self.root.parent))
        try:
            make_shapes(tmp, **self.settings)
            if not self.root.exists():  # another process may have made it meanwhile: theirs is identical
                os.replace(tmp, self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        super().setup(stage)
