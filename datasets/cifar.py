"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the "python version" pickled batches.

The on-disk format torchvision downloads and the CRD/mdistiller code reads:
- `cifar-10-batches-py/`: `data_batch_1` … `data_batch_5`, `test_batch`, `batches.meta`;
- `cifar-100-python/`: `train`, `test`, `meta`.
Each batch is a pickled dict (written by Python 2's cPickle) with `data`, a uint8 array (N, 3072) —
the 1,024 red, then green, then blue values of a 32×32 image in row-major order — and the labels
(`labels` for CIFAR-10, `fine_labels` for CIFAR-100). The files are read with a restricted unpickler
(`safe_pickle`), never plain `pickle.load`.

Search order: `$DATA_ROOT/<folder>`, `$DATA_ROOT/<name>/<folder>`. A torchvision download (archive
checked against torchvision's md5) happens only when asked: `download=True` or `DISTILLBENCH_DOWNLOAD=1`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import ArrayDataModule
from .errors import CorruptDatasetError, DatasetNotFoundError
from .safe_pickle import load_pickle


@dataclass(frozen=True)
class CifarFormat:
    name: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    torchvision_class: str


CIFAR10 = CifarFormat(
    name="cifar10",
    folder="cifar-10-batches-py",
    train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test=("test_batch",),
    meta="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    torchvision_class="CIFAR10",
)
CIFAR100 = CifarFormat(
    name="cifar100",
    folder="cifar-100-python",
    train=("train",),
    test=("test",),
    meta="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    torchvision_class="CIFAR100",
)
FORMATS = {f.name: f for f in (CIFAR10, CIFAR100)}


def how_to_get(fmt: CifarFormat) -> list[str]:
    return [
        f"download https://www.cs.toronto.edu/~kriz/{fmt.folder.replace('-batches-py', '-python')}.tar.gz "
        f"and extract it into $DATA_ROOT (giving $DATA_ROOT/{fmt.folder}/)",
        f"or let torchvision fetch it once, online: DISTILLBENCH_DOWNLOAD=1 with DATA_ROOT set "
        f'(or `python -c "import torchvision; '
        f"torchvision.datasets.{fmt.torchvision_class}('$DATA_ROOT', download=True)\"`)",
        f"a tiny tree in the same format for smoke runs: python -m distillbench.datasets.make_tiny --format {fmt.name} "
        "--out DIR",
    ]


def candidate_dirs(fmt: CifarFormat, root: str | None) -> list[Path]:
    root = root or os.environ.get("DATA_ROOT")
    if not root:
        return []
    return [Path(root) / fmt.folder, Path(root) / fmt.name / fmt.folder]


def _complete(folder: Path, fmt: CifarFormat) -> bool:
    return all((folder / f).is_file() for f in (*fmt.train, *fmt.test, fmt.meta))


def read_batch(path: Path, fmt: CifarFormat) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch → (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    entry = load_pickle(path)
    if not isinstance(entry, dict) or "data" not in entry or fmt.label_key not in entry:
        keys = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise CorruptDatasetError(f"{path}: expected a dict with 'data' and {fmt.label_key!r}, found {keys}")
    data, labels = entry["data"], np.asarray(entry[fmt.label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise CorruptDatasetError(
            f"{path}: 'data' must be a uint8 array (N, 3072), found {type(data).__name__} {shape}"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptDatasetError(f"{path}: {len(data)} images but labels of shape {labels.shape} ({labels.dtype})")
    if len(labels) and (labels.min() < 0 or labels.max() >= fmt.num_classes):
        raise CorruptDatasetError(f"{path}: labels outside 0..{fmt.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_meta(path: Path, fmt: CifarFormat) -> list[str]:
    meta = load_pickle(path)
    names = meta.get(fmt.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != fmt.num_classes:
        raise CorruptDatasetError(f"{path}: expected {fmt.num_classes} class names under {fmt.names_key!r}")
    return names


def load_cifar_arrays(
    name: str, root: str | None = None, *, download: bool | None = None, search: list[Path] | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """{"train": (uint8 (N,3,32,32), int64), "test": ...} from the first complete folder found."""
    fmt = FORMATS[name]
    searched = search if search is not None else candidate_dirs(fmt, root)
    folder = next((d for d in searched if _complete(d, fmt)), None)
    if download is None:
        download = os.environ.get("DISTILLBENCH_DOWNLOAD", "") in ("1", "true", "yes")
    root = root or os.environ.get("DATA_ROOT")
    if folder is None and download and root:
        folder = _download(fmt, Path(root))
        if folder is None:
            searched = [*searched, Path(f"torchvision download into {root} (failed: offline?)")]
    if folder is None:
        places = [str(d) for d in searched] or ["(nowhere: DATA_ROOT is not set and no root was given)"]
        raise DatasetNotFoundError(name, places, how_to_get(fmt))
    read_meta(folder / fmt.meta, fmt)
    out = {}
    for split, files in (("train", fmt.train), ("test", fmt.test)):
        parts = [read_batch(folder / f, fmt) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        out[split] = (torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    return out


def _download(fmt: CifarFormat, root: Path) -> Path | None:
    try:
        import torchvision.datasets as tvd
        from torchvision.datasets.utils import download_and_extract_archive

        cls = getattr(tvd, fmt.torchvision_class)
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception:  # offline or blocked: the caller reports every place searched
        return None
    folder = root / fmt.folder
    return folder if _complete(folder, fmt) else None


class _CifarDataModule(ArrayDataModule):
    fmt: CifarFormat
    default_mean = (0.5071, 0.4867, 0.4408)
    default_std = (0.2675, 0.2565, 0.2761)

    def __init__(self, *, download: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        self.download = download

    def load_arrays(self):
        arrays = load_cifar_arrays(self.name, self.root, download=self.download)
        return arrays["train"], arrays["test"]


class CIFAR10DataModule(_CifarDataModule):
    name = "cifar10"
    num_classes = 10
    fmt = CIFAR10
    default_mean = (0.4914, 0.4822, 0.4465)
    default_std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CifarDataModule):
    """mean/std are the ones of mdistiller and CRD (../shared/methods/baselines.md §4)."""

    name = "cifar100"
    num_classes = 100
    fmt = CIFAR100
