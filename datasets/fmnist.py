"""Fashion-MNIST (Xiao et al. 2017): 60k train / 10k test, 28×28 grey, 10 classes.

Read directly from the IDX files (gzip-compressed or not) — torchvision's `FashionMNIST` only reads
uncompressed files under `<root>/FashionMNIST/raw`, while the Debian package ships `.gz` files.
Search order: `$DATA_ROOT/fashion-mnist`, the Debian package's `/usr/share/datasets/fashion-mnist`,
torchvision's `$DATA_ROOT/FashionMNIST/raw`, then a torchvision download when online.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import ArrayDataModule
from .errors import CorruptDatasetError, DatasetNotFoundError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = [
    "Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist)",
    "copy the four IDX files (train-images-idx3-ubyte.gz, ...) to $DATA_ROOT/fashion-mnist",
    "run once with network access: torchvision downloads them to $DATA_ROOT/FashionMNIST/raw",
]


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format; `.gz` or raw) of unsigned bytes into an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # truncated gzip stream, bad CRC, ...
        raise CorruptDatasetError(f"{path}: cannot read IDX data ({exc}); delete it and fetch it again") from exc
    if len(data) < 4:
        raise CorruptDatasetError(f"{path}: {len(data)} bytes is too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise CorruptDatasetError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    header_len = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = int(np.prod(shape))
    if len(data) - header_len != expected:
        raise CorruptDatasetError(
            f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header_len} data bytes (truncated or corrupt); fetch it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def candidate_dirs(root: str | None) -> list[Path]:
    root = root or os.environ.get("DATA_ROOT")
    dirs = [Path(root) / "fashion-mnist"] if root else []
    dirs.append(SYSTEM_DIR)
    if root:
        dirs.append(Path(root) / "FashionMNIST" / "raw")
    return dirs


def load_fmnist_arrays(
    root: str | None = None, *, download: bool = True, search: list[Path] | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """{"train": (images uint8 (N,1,28,28), labels int64), "test": ...} from the first complete folder."""
    searched = search if search is not None else candidate_dirs(root)
    folder = next((d for d in searched if all(_find_file(d, s) for pair in FILES.values() for s in pair)), None)
    if folder is None and download and root is not None:
        folder = _download(Path(root))
        searched = [*searched, Path("torchvision download (failed: offline?)")] if folder is None else searched
    if folder is None:
        raise DatasetNotFoundError("fmnist", [str(d) for d in searched], HOW_TO_GET)
    out = {}
    for split, (img_stem, lbl_stem) in FILES.items():
        images = read_idx(_find_file(folder, img_stem))
        labels = read_idx(_find_file(folder, lbl_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CorruptDatasetError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
        if labels.max(initial=0) > 9:
            raise CorruptDatasetError(f"{folder}: {split} labels outside 0..9")
        out[split] = (torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))
    return out


def _download(root: Path) -> Path | None:
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception:  # offline or blocked: the caller reports every place searched
        return None
    return root / "FashionMNIST" / "raw"


class FashionMNISTDataModule(ArrayDataModule):
    name = "fmnist"
    num_classes = 10
    default_mean = (0.2860,)
    default_std = (0.3530,)

    def load_arrays(self):
        arrays = load_fmnist_arrays(self.root)
        return arrays["train"], arrays["test"]
