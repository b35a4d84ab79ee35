"""KD³'s web proxy: an unlabelled "webly collected" image pool under covariate shift (kd3.md §9).

The small protocols model the paper's setting (Tang et al., ICCV 2023, arXiv 2307.11469) on a base
dataset (`fmnist` or `digits`): a stratified, seeded held-out slice H of the base *train* split is
never shown to the teacher, which trains on the rest (D_o-train). The pool is every image of H plus
out-of-class procedural distractors (strokes, blobs, checkerboards, noise textures) making up
`distractor_fraction` of it, all passed through one documented covariate shift on [0, 1] pixels:

    x′ = clip(scale·x + offset + N(0, noise_std²), 0, 1)
    then a Gaussian blur (σ = blur_sigma) with probability blur_p, then x′ ← 1 − x′ with probability invert_p

(the shift is applied to the distractors too, so that style alone does not separate them). The pool
is written once as a folder of PNG files in shuffled order (`000000.png`, …) with `manifest.json`
(generator version, parameters, fingerprint of H) and `membership.csv` — the hidden membership
(in-distribution or not, source class), used for diagnostics only and never by training code. The
loader reads any folder of PNG/JPEG/BMP images; a real web pool needs no membership file.

Training-data contract: a method module whose class attribute `train_data` is `"pool"` is trained
on the pool (its batches carry `label` = −1); if it defines `select_pool_indices(datamodule)`, that
is called every time the train loader is built and the loader runs over the returned pool indices
(`None` = all). Other modules (the teacher, KD on D_o-train) get the labelled D_o-train split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .base import ArrayDataModule, ArrayDataset, stratified_split
from .digits import DigitsDataModule
from .errors import CorruptDatasetError, DatasetError, DatasetNotFoundError
from .fmnist import FashionMNISTDataModule

GENERATOR_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
BASES: dict[str, type[ArrayDataModule]] = {"digits": DigitsDataModule, "fmnist": FashionMNISTDataModule}
DEFAULT_SHIFT = {"scale": 0.7, "offset": 0.2, "noise_std": 0.15, "blur_sigma": 0.8, "blur_p": 0.5, "invert_p": 0.3}
DISTRACTOR_KINDS = ("strokes", "blobs", "checkerboard", "noise")
UNLABELLED = -1


# -- the generator ---------------------------------------------------------------------------
def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of float images (N, C, H, W), reflect padding (kernel radius ⌈3σ⌉)."""
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    out = images
    for axis in (2, 3):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > r else "edge")
        length = out.shape[axis]
        out = sum(k[i] * np.take(padded, np.arange(i, i + length), axis=axis) for i in range(len(k)))
    return out


def covariate_shift(images: np.ndarray, rng: np.random.Generator, shift: Mapping[str, float]) -> np.ndarray:
    """The documented shift on uint8 images (N, C, H, W) → uint8 (module docstring)."""
    x = images.astype(np.float64) / 255.0
    x = np.clip(shift["scale"] * x + shift["offset"] + rng.normal(0.0, shift["noise_std"], x.shape), 0.0, 1.0)
    blur = rng.random(len(x)) < shift["blur_p"]
    if blur.any() and shift["blur_sigma"] > 0:
        x[blur] = gaussian_blur(x[blur], shift["blur_sigma"])
    invert = rng.random(len(x)) < shift["invert_p"]
    x[invert] = 1.0 - x[invert]
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _normalise(img: np.ndarray) -> np.ndarray:
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _strokes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for _ in range(rng.integers(1, 4)):
        p0, p1 = rng.uniform(0, [h, w]), rng.uniform(0, [h, w])
        d = p1 - p0
        t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
        dist = np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))
        width = rng.uniform(0.5, 0.12 * max(h, w) + 0.5)
        img = np.maximum(img, np.clip(width + 0.5 - dist, 0, 1) * rng.uniform(0.5, 1.0))
    return img


def _blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sy, sx = rng.uniform(0.08, 0.3) * h, rng.uniform(0.08, 0.3) * w
        img += rng.uniform(0.4, 1.0) * np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    return np.clip(img, 0, 1)


def _checkerboard(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    period = int(rng.integers(1, max(2, min(h, w) // 3) + 1))
    board = ((yy + rng.integers(0, period)) // period + (xx + rng.integers(0, period)) // period) % 2
    lo, hi = sorted(rng.uniform(0, 1, 2))
    return lo + (hi - lo) * board


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    field = rng.random((1, 1, h, w))
    return _normalise(gaussian_blur(field, rng.uniform(0.5, 1.5))[0, 0])


_DRAW = {"strokes": _strokes, "blobs": _blobs, "checkerboard": _checkerboard, "noise": _noise}


def distractors(n: int, shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """`n` out-of-class procedural images, uint8 (n, C, H, W), kinds in equal shares (cycled)."""
    c, h, w = shape
    kinds = [DISTRACTOR_KINDS[i % len(DISTRACTOR_KINDS)] for i in range(n)]
    out = np.zeros((n, c, h, w), dtype=np.uint8)
    for i, kind in enumerate(kinds):
        out[i] = np.rint(np.clip(_DRAW[kind](rng, h, w), 0, 1) * 255.0).astype(np.uint8)[None]
    return out, kinds


def generate_pool(
    held_images: np.ndarray,
    held_labels: np.ndarray,
    *,
    seed: int,
    distractor_fraction: float = 0.4,
    shift: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The pool from H: shifted H plus `distractor_fraction` of shifted distractors, shuffled.

    Returns `images` uint8 (N, C, H, W), `in_distribution` bool (N,), `source_class` int (N,; −1 for
    distractors) and `kind` (N,; "heldout" or a distractor kind).
    """
    if not 0 <= distractor_fraction < 1:
        raise DatasetError(f"distractor_fraction must be in [0, 1), got {distractor_fraction}")
    shift = {**DEFAULT_SHIFT, **(shift or {})}
    unknown = set(shift) - set(DEFAULT_SHIFT)
    if unknown:
        raise DatasetError(f"unknown shift parameter(s) {sorted(unknown)}; valid: {sorted(DEFAULT_SHIFT)}")
    rng = np.random.default_rng(seed)
    n_held = len(held_images)
    n_dis = round(n_held * distractor_fraction / (1.0 - distractor_fraction))
    dis, dis_kinds = distractors(n_dis, tuple(held_images.shape[1:]), rng)
    images = covariate_shift(np.concatenate([held_images, dis]), rng, shift)
    order = rng.permutation(len(images))
    in_dist = np.r_[np.ones(n_held, bool), np.zeros(n_dis, bool)]
    source = np.r_[held_labels.astype(np.int64), np.full(n_dis, UNLABELLED)]
    kinds = np.array(["heldout"] * n_held + dis_kinds)
    return {
        "images": images[order],
        "in_distribution": in_dist[order],
        "source_class": source[order],
        "kind": kinds[order],
    }


# -- the on-disk format ----------------------------------------------------------------------
def write_pool(folder: Path, pool: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    """Write PNG files, `membership.csv` and `manifest.json` into a temporary folder, then rename."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = []
    for i, img in enumerate(pool["images"]):
        name = f"{i:06d}.png"
        mode = "L" if img.shape[0] == 1 else "RGB"
        Image.fromarray(img[0] if mode == "L" else img.transpose(1, 2, 0), mode=mode).save(tmp / name)
        names.append(name)
    with open(tmp / "membership.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "in_distribution", "source_class", "kind"])
        for row in zip(names, pool["in_distribution"], pool["source_class"], pool["kind"], strict=True):
            writer.writerow([row[0], int(row[1]), int(row[2]), row[3]])
    (tmp / "manifest.json").write_text(json.dumps({**manifest, "count": len(names)}, indent=2, sort_keys=True))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process (a DDP rank) wrote the same pool first
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise


def read_image_folder(folder: Path, channels: int) -> tuple[Tensor, list[str]]:
    """Every PNG/JPEG/BMP file of `folder` (sorted by name) as uint8 (N, C, H, W), with the names."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetNotFoundError(
            "webproxy pool", [f"{folder} (no {'/'.join(IMAGE_SUFFIXES)} files)"], ["delete the folder to regenerate it"]
        )
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DatasetError(f"image folders are read as 1 or 3 channels, not {channels}")
    arrays = []
    for path in files:
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert(mode), dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise CorruptDatasetError(f"{path}: not a readable image ({exc})") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if arrays and arr.shape != arrays[0].shape:
            raise CorruptDatasetError(f"{path}: size {arr.shape[1:]} differs from {arrays[0].shape[1:]} of {files[0]}")
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)), [p.name for p in files]


def read_membership(folder: Path, names: Sequence[str]) -> dict[str, Tensor] | None:
    """The hidden membership in file order, or None when the folder has no `membership.csv`."""
    path = Path(folder) / "membership.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    missing = [n for n in names if n not in rows]
    if missing:
        raise CorruptDatasetError(f"{path}: no row for {len(missing)} image(s), e.g. {missing[0]}")
    return {
        "in_distribution": torch.tensor([rows[n]["in_distribution"] == "1" for n in names]),
        "source_class": torch.tensor([int(rows[n]["source_class"]) for n in names]),
    }


# -- the datamodule --------------------------------------------------------------------------
class UnlabelledSubset(Dataset):
    """Positions 0..len(indices)−1 of a pool subset; keys `(position, epoch)` → the pool's items."""

    def __init__(self, pool: ArrayDataset, indices: Tensor):
        self.pool, self.indices = pool, indices.long()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, keys):
        pairs = [k if isinstance(k, tuple) else (k, 0) for k in keys]
        return self.pool.__getitems__([(int(self.indices[p]), e) for p, e in pairs])


class WebProxyDataModule(ArrayDataModule):
    """D_o-train (labelled, for the teacher and the upper-bound arm), the web pool, val and test.

    Options (protocol `dataset.options`): `base` (fmnist | digits), `heldout_size` (count or
    fraction of the base train split), `distractor_fraction`, `shift` (overrides of DEFAULT_SHIFT),
    `pool_seed` (default: split_seed), `pool_dir` (default `$DATA_ROOT/webproxy/<id>` or
    `~/.cache/distillbench/webproxy/<id>`; generated there on first use).
    """

    name = "webproxy"
    num_classes = 10

    def __init__(
        self,
        *,
        base: str = "fmnist",
        heldout_size: int | float = 10_000,
        distractor_fraction: float = 0.4,
        shift: Mapping[str, float] | None = None,
        pool_seed: int | None = None,
        pool_dir: str | None = None,
        **kwargs: Any,
    ):
        if base not in BASES:
            raise DatasetError(f"webproxy base {base!r} is not one of {', '.join(BASES)}")
        self.base = BASES[base]
        self.default_mean, self.default_std = self.base.default_mean, self.base.default_std
        super().__init__(**kwargs)
        self.heldout_size, self.distractor_fraction = heldout_size, distractor_fraction
        self.shift = {**DEFAULT_SHIFT, **(shift or {})}
        self.pool_seed = self.split_seed if pool_seed is None else pool_seed
        self.pool_dir = pool_dir
        self.pool_set: ArrayDataset | None = None
        self.pool_membership: dict[str, Tensor] | None = None
        self.pool_path: Path | None = None

    def load_arrays(self):
        return self.base(root=self.root).load_arrays()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        (x_train, y_train), (x_test, y_test) = self.load_arrays()
        rest, held = stratified_split(y_train.numpy(), self.heldout_size, self.split_seed)
        kept, val = stratified_split(y_train[rest].numpy(), self.val_size, self.split_seed)
        kept, val = rest[kept], rest[val]
        kw = {"mean": self.mean, "std": self.std, "seed": self.seed}
        self.train_set = ArrayDataset(x_train[kept], y_train[kept], augment_spec=self.augment_spec, **kw)
        self.val_set = ArrayDataset(x_train[val], y_train[val], **kw)
        self.test_set = ArrayDataset(x_test, y_test, **kw)
        self.pool_path = self._ensure_pool(x_train[held].numpy(), y_train[held].numpy())
        images, names = read_image_folder(self.pool_path, channels=x_train.shape[1])
        self.pool_membership = read_membership(self.pool_path, names)
        labels = torch.full((len(images),), UNLABELLED, dtype=torch.long)
        self.pool_set = ArrayDataset(images, labels, augment_spec=self.augment_spec, **kw)

    def _pool_manifest(self, held_images: np.ndarray) -> dict[str, Any]:
        return {
            "generator": "distillbench.datasets.webproxy",
            "generator_version": GENERATOR_VERSION,
            "base": self.base.name,
            "heldout_sha256": hashlib.sha256(held_images.tobytes()).hexdigest()[:16],
            "heldout_count": len(held_images),
            "distractor_fraction": self.distractor_fraction,
            "shift": dict(sorted(self.shift.items())),
            "seed": self.pool_seed,
        }

    def _ensure_pool(self, held_images: np.ndarray, held_labels: np.ndarray) -> Path:
        manifest = self._pool_manifest(held_images)
        pool_id = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]
        if self.pool_dir:
            folder = Path(self.pool_dir)
        else:
            root = Path(self.root) if self.root else Path.home() / ".cache" / "distillbench"
            folder = root / "webproxy" / f"{self.base.name}-{pool_id}"
        if not folder.is_dir():
            print(f"generating the {self.base.name} web-proxy pool → {folder}", file=sys.stderr)
            pool = generate_pool(
                held_images,
                held_labels,
                seed=self.pool_seed,
                distractor_fraction=self.distractor_fraction,
                shift=self.shift,
            )
            write_pool(folder, pool, {**manifest, "pool_id": pool_id})
        on_disk = folder / "manifest.json"
        if on_disk.is_file():
            found = json.loads(on_disk.read_text())
            if found.get("pool_id") not in (None, pool_id):
                raise CorruptDatasetError(
                    f"{folder} holds a pool made with other settings (pool_id {found.get('pool_id')} ≠ {pool_id}); "
                    "delete it or point pool_dir elsewhere"
                )
        return folder

    # -- loaders -----------------------------------------------------------------------------
    def _trains_on_pool(self) -> Any:
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        return module if getattr(module, "train_data", "labelled") == "pool" else None

    def pool_loader(self, indices: Tensor | None = None, *, train: bool = True) -> DataLoader:
        """Shuffled global batches over the pool (or the given pool indices); `train=False`: in order."""
        self.setup()
        dataset = self.pool_set if indices is None else UnlabelledSubset(self.pool_set, indices)
        if train and len(dataset) < self.global_batch:
            raise DatasetError(f"{len(dataset)} pool images is less than one global batch ({self.global_batch})")
        return self._loader(dataset, train=train)

    def train_dataloader(self) -> DataLoader:
        module = self._trains_on_pool()
        if module is None:
            return super().train_dataloader()
        select = getattr(module, "select_pool_indices", None)
        return self.pool_loader(select(self) if callable(select) else None)
