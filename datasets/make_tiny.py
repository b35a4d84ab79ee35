"""Generate tiny datasets in the exact on-disk formats the real loaders read, for tests and smoke runs.

    python -m distillbench.datasets.make_tiny --format cifar100 --out DIR [--train-per-class 10] [--test-per-class 2]
    python -m distillbench.datasets.make_tiny --format imagenet --out DIR [--classes 4]

- `cifar10` / `cifar100`: `DIR/cifar-10-batches-py/` or `DIR/cifar-100-python/`, each batch a
  Python-2-style protocol-2 pickle (byte strings as BINSTRING, the NumPy array as
  `numpy.core.multiarray._reconstruct` + `numpy.dtype('u1')` + a raw byte buffer), as cPickle wrote the
  published files. Use `DATA_ROOT=DIR`.
- `imagenet`: `DIR/imagenet/{train,val}/<wnid>/*.JPEG`, JPEGs of varied sizes. Use `DATA_ROOT=DIR`.

Images are learnable: a class-specific colour and a class-specific bright square on noise, so a
model trained for an epoch or two beats chance. Everything is seeded (the same files on every run).
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .cifar import CIFAR10, CIFAR100, CifarFormat

# -- a Python 2 cPickle (protocol 2) writer: the opcodes the published CIFAR files use ------------
_PROTO2, _STOP, _MARK = b"\x80\x02", b".", b"("
_EMPTY_DICT, _SETITEMS, _EMPTY_LIST, _APPENDS = b"}", b"u", b"]", b"e"
_TUPLE, _TUPLE1, _TUPLE3, _REDUCE, _BUILD = b"t", b"\x85", b"\x87", b"R", b"b"
_NONE, _NEWTRUE, _NEWFALSE = b"N", b"\x88", b"\x89"


def _py2_str(data: bytes) -> bytes:
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data  # SHORT_BINSTRING
    return b"T" + struct.pack("<i", len(data)) + data  # BINSTRING


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])  # BININT1
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)  # BININT2
    return b"J" + struct.pack("<i", value)  # BININT


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _py2_ndarray(array: np.ndarray) -> bytes:
    """A C-contiguous uint8 array as NumPy 1.x pickled it under Python 2."""
    if array.dtype != np.uint8:
        raise ValueError("only uint8 arrays are written")
    dtype = (
        _global("numpy", "dtype")
        + (_py2_str(b"u1") + _NEWFALSE + _NEWTRUE + _TUPLE3)
        + _REDUCE
        + _MARK
        + _py2_int(3)
        + _py2_str(b"|")
        + _NONE * 3
        + b"J"
        + struct.pack("<i", -1)
        + b"J"
        + struct.pack("<i", -1)
        + _py2_int(0)
        + _TUPLE
        + _BUILD
    )
    shape = _MARK + b"".join(_py2_int(int(n)) for n in array.shape) + _TUPLE
    return (
        _global("numpy.core.multiarray", "_reconstruct")
        + (_global("numpy", "ndarray") + (_py2_int(0) + _TUPLE1) + _py2_str(b"b") + _TUPLE3)
        + _REDUCE
        + (_MARK + _py2_int(1) + shape + dtype + _NEWFALSE + _py2_str(np.ascontiguousarray(array).tobytes()) + _TUPLE)
        + _BUILD
    )


def _py2_value(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        return _py2_ndarray(value)
    if isinstance(value, bool):
        return _NEWTRUE if value else _NEWFALSE
    if isinstance(value, int):
        return _py2_int(value)
    if isinstance(value, str):
        return _py2_str(value.encode("latin1"))
    if isinstance(value, list):
        return _EMPTY_LIST + (_MARK + b"".join(_py2_value(v) for v in value) + _APPENDS if value else b"")
    if isinstance(value, dict):
        items = b"".join(_py2_value(k) + _py2_value(v) for k, v in value.items())
        return _EMPTY_DICT + (_MARK + items + _SETITEMS if value else b"")
    raise TypeError(f"cannot write {type(value).__name__} as a Python 2 pickle")


def dump_py2_pickle(obj: Any, path: Path) -> None:
    path.write_bytes(_PROTO2 + _py2_value(obj) + _STOP)


# -- image content ------------------------------------------------------------------------------
def class_images(labels: np.ndarray, size: int, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """uint8 (N, size, size, 3): noise around a class colour plus a class-placed bright square."""
    hue = np.stack([(labels * 37) % 256, (labels * 91 + 80) % 256, (labels * 53 + 160) % 256], axis=1)
    images = np.clip(hue[:, None, None, :] + rng.normal(0, 40, size=(len(labels), size, size, 3)), 0, 255)
    side = max(size // 4, 2)
    for k, label in enumerate(labels):
        r = (label * 7) % (size - side + 1)
        c = (label * 13 // max(num_classes // 10, 1)) % (size - side + 1)
        images[k, r : r + side, c : c + side] = 255
    return images.astype(np.uint8)


def _balanced_labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def make_cifar(
    fmt: CifarFormat, out: Path, *, train_per_class: int = 10, test_per_class: int = 2, seed: int = 0
) -> Path:
    """Write `out/<fmt.folder>/` with every batch file and the meta file of the real format."""
    rng = np.random.default_rng(seed)
    folder = out / fmt.folder
    folder.mkdir(parents=True, exist_ok=True)
    for split, files, per_class in (("train", fmt.train, train_per_class), ("test", fmt.test, test_per_class)):
        labels = _balanced_labels(fmt.num_classes, per_class, rng)
        images = class_images(labels, 32, rng, fmt.num_classes).transpose(0, 3, 1, 2).reshape(len(labels), 3072)
        for part, chunk in zip(files, np.array_split(np.arange(len(labels)), len(files)), strict=True):
            entry = {"batch_label": f"{split} batch {part}", fmt.label_key: [int(v) for v in labels[chunk]]}
            if fmt is CIFAR100:
                entry["coarse_labels"] = [int(v) // 5 for v in labels[chunk]]
            entry["data"] = np.ascontiguousarray(images[chunk])
            entry["filenames"] = [f"tiny_{split}_{i}.png" for i in chunk]
            dump_py2_pickle(entry, folder / part)
    names = [f"class_{i:03d}" for i in range(fmt.num_classes)]
    meta = {fmt.names_key: names}
    if fmt is CIFAR100:
        meta["coarse_label_names"] = [f"super_{i:02d}" for i in range(20)]
    else:
        meta.update(num_cases_per_batch=len(labels) // len(fmt.train), num_vis=3072)
    dump_py2_pickle(meta, folder / fmt.meta)
    return folder


def make_imagenet(
    out: Path, *, classes: int = 4, train_per_class: int = 6, val_per_class: int = 2, seed: int = 0
) -> Path:
    """Write `out/imagenet/{train,val}/<wnid>/*.JPEG` (image sizes between 40 and 72 px)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    tree = out / "imagenet"
    wnids = [f"n{1440764 + 1000 * k:08d}" for k in range(classes)]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, wnid in enumerate(wnids):
            folder = tree / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = int(rng.integers(40, 73))
                pixels = class_images(np.array([label]), size, rng, classes)[0]
                width = int(rng.integers(size, size + 24))  # non-square, as real photos
                canvas = np.concatenate([pixels, pixels[:, : width - size]], axis=1)
                name = (
                    f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{label * per_class + i + 1:08d}.JPEG"
                )
                Image.fromarray(canvas).save(folder / name, format="JPEG", quality=90)
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillbench.datasets.make_tiny", description=__doc__)
    parser.add_argument("--format", required=True, choices=["cifar10", "cifar100", "imagenet"])
    parser.add_argument("--out", required=True, type=Path, help="becomes DATA_ROOT")
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--classes", type=int, default=4, help="imagenet only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.format == "imagenet":
        made = make_imagenet(
            args.out,
            classes=args.classes,
            train_per_class=args.train_per_class or 6,
            val_per_class=args.test_per_class or 2,
            seed=args.seed,
        )
    else:
        made = make_cifar(
            CIFAR10 if args.format == "cifar10" else CIFAR100,
            args.out,
            train_per_class=args.train_per_class or 10,
            test_per_class=args.test_per_class or 2,
            seed=args.seed,
        )
    print(f"wrote {made}; use DATA_ROOT={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
