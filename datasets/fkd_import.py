"""Import soft labels released (or generated) by the official FKD code into a distillbench store.

The official format (szq0214/FKD, `FKD_SLG/generate_soft_label.py`, read by `utils_FKD.ImageFolder_FKD`):
one file per training image, `<root>/train/<wnid>/<stem>.tar` for the image `train/<wnid>/<stem>.JPEG`
(the stem is the file name up to its first dot). Despite the suffix, each file is a `torch.save` of
the list `[coords, flips, labels]`:

- `coords` (N, 4) numpy float32 (float16 with `--use_fp16`): (top/H, left/W, height/H, width/W) of the
  RandomResizedCrop box — the convention of our store;
- `flips` (N,) numpy bool: horizontal flip applied after the crop;
- `labels` numpy float32 (float16 with `--use_fp16`): (N, 2, k) for the `marginal_*_k{5,10}` label
  types (row 0 the top-k class indices as floats, row 1 their probabilities — our `quantize`), (N, 2)
  for `smoothing` (top-1 index and probability) and (N,) integer class indices for `hard`.

The released labels (e.g. "Marginal Smoothing Top-5 (500-crop)") are a zip of that tree; this module
reads the tree, a `.zip` or a `.tar[.gz]` archive of it. Files are loaded with `torch.load(weights_only=
True)` and an allow-list of numpy's array reconstruction only: anything else in a file is refused.

What the official files do not hold is recorded as such in the manifest: the teacher's checkpoint
sha256 (`teacher_sha256` = "unknown: imported FKD soft labels" unless given), no logits, and `gt_prob`
(FerKD's confidence) recovered from the quantised labels by marginal smoothing — exact when the ground
truth is among the stored top-k, the smoothed leftover otherwise (`gt_prob_source`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .safe_pickle import _numpy_reconstruct
from .soft_labels import (
    SCHEMA_VERSION,
    SoftLabelStoreError,
    TeacherMeta,
    _write_json_atomic,
    check_label_dtype,
    key_hash,
    key_mismatch,
    make_key,
    recover,
    write_shard,
)

UNKNOWN_TEACHER = "unknown: imported FKD soft labels"
#: the official generator's defaults (`generate_soft_label.py`): EfficientNet-L2-NS-475, bicubic,
#: ImageNet statistics, RandomResizedCrop scale (0.08, 0.936); the released 500-crop labels used them
FKD_TEACHER = TeacherMeta(
    "tf_efficientnet_l2_ns_475", UNKNOWN_TEACHER, 475, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"
)
FKD_AUGMENT = {"kind": "rrc", "scale": (0.08, 0.936), "ratio": (3 / 4, 4 / 3), "flip": True}

_DTYPES = ("Bool", "Float16", "Float32", "Float64", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16")
_SAFE_GLOBALS = [
    (_numpy_reconstruct(), "numpy.core.multiarray._reconstruct"),  # files written with NumPy 1.x
    (_numpy_reconstruct(), "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    *(getattr(np.dtypes, f"{name}DType") for name in _DTYPES if hasattr(np, "dtypes")),
]


def label_file_key(sample: str) -> str:
    """`<wnid>/<image file>` → the key `<wnid>/<stem>.tar` of its official soft-label file."""
    parts = sample.replace(os.sep, "/").split("/")
    if len(parts) < 2:
        raise SoftLabelStoreError(f"sample {sample!r} must be '<class folder>/<file>'")
    return f"{parts[-2]}/{parts[-1].split('.')[0]}.tar"


class _Source:
    """The label files of a folder, a zip or a tar archive, by key `<wnid>/<stem>.tar`."""

    def __init__(self, root: Path):
        self.root, self._zip, self._tar = root, None, None
        if root.is_dir():
            top = root / "train" if (root / "train").is_dir() else root  # any prefix above train/ is fine
            members = {p.relative_to(top).as_posix(): p for p in top.rglob("*.tar") if p.is_file()}
        elif root.is_file() and zipfile.is_zipfile(root):
            self._zip = zipfile.ZipFile(root)  # closed by `close`
            members = {n: n for n in self._zip.namelist() if n.endswith(".tar")}
        elif root.is_file() and tarfile.is_tarfile(root):
            self._tar = tarfile.open(root)  # noqa: SIM115 (closed by `close`)
            members = {m.name: m for m in self._tar.getmembers() if m.isfile() and m.name.endswith(".tar")}
        else:
            raise SoftLabelStoreError(
                f"no FKD soft labels at {root}: expected the folder of `<wnid>/<stem>.tar` files (or its "
                "parent holding train/), or the released .zip/.tar archive of it"
            )
        self.files: dict[str, Any] = {}
        for name, member in members.items():
            key = "/".join(name.split("/")[-2:])
            if key in self.files:
                raise SoftLabelStoreError(f"{root}: two soft-label files for {key} ({name} and another)")
            self.files[key] = member
        if not self.files:
            raise SoftLabelStoreError(f"{root}: no `<wnid>/<stem>.tar` soft-label files found")

    def read(self, key: str) -> bytes:
        member = self.files[key]
        if self._zip is not None:
            return self._zip.read(member)
        if self._tar is not None:
            return self._tar.extractfile(member).read()
        return Path(member).read_bytes()

    def where(self, key: str) -> str:
        return f"{self.root}:{key}" if self._zip or self._tar else str(self.files[key])

    def close(self) -> None:
        for archive in (self._zip, self._tar):
            if archive is not None:
                archive.close()


def load_fkd_file(data: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One official file → (coords (N, 4) float32, flips (N,) bool, labels (N, 2, k) in the file's float
    dtype); `hard` labels become k = 1 with probability 1."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler's errors vary by cause; all mean "not an FKD label file"
        lines = [line for line in str(exc).splitlines() if "Unsupported" in line or "error:" in line]
        why = lines[-1].split(" Please use")[0].strip() if lines else f"{type(exc).__name__}: {str(exc)[:200]}"
        raise SoftLabelStoreError(f"{where}: not an FKD soft-label file of numpy arrays only ({why})") from None
    if not isinstance(obj, list | tuple) or len(obj) != 3:
        raise SoftLabelStoreError(f"{where}: expected [coords, flips, labels], got {type(obj).__name__}")
    coords, flips, labels = (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in obj)
    n = len(coords)
    if coords.shape != (n, 4) or flips.shape != (n,) or len(labels) != n or n == 0:
        raise SoftLabelStoreError(
            f"{where}: coords {coords.shape}, flips {flips.shape}, labels {labels.shape} do not describe N crops"
        )
    if not np.all((coords >= 0) & (coords <= 1)):
        raise SoftLabelStoreError(f"{where}: crop coords outside [0, 1]")
    if labels.ndim == 1:  # `hard`: class indices only
        labels = np.stack([labels.astype(np.float32), np.ones(n, np.float32)], axis=1)[:, :, None]
    elif labels.ndim == 2 and labels.shape[1] == 2:  # `smoothing`: top-1 index and probability
        labels = labels[:, :, None]
    if labels.ndim != 3 or labels.shape[1] != 2:
        raise SoftLabelStoreError(f"{where}: labels of shape {labels.shape}; expected (N, 2, k), (N, 2) or (N,)")
    dtype = np.float16 if labels.dtype == np.float16 else np.float32
    index = labels[:, 0].astype(np.float64)
    if not np.all((index == np.round(index)) & (index >= 0) & (index < num_classes)):
        raise SoftLabelStoreError(f"{where}: class indices not integers in [0, {num_classes})")
    return coords.astype(np.float32), flips.astype(bool), labels.astype(dtype)


def file_list_sha256(samples: Sequence[str], labels: Sequence[int]) -> str:
    """sha256 of the ordered (relative path, label) list: the sample identity of a file-based dataset."""
    digest = hashlib.sha256()
    for rel, label in zip(samples, labels, strict=True):
        digest.update(f"{rel}\0{int(label)}\n".encode())
    return digest.hexdigest()


def _default_samples(source: _Source) -> tuple[list[str], np.ndarray]:
    keys = sorted(source.files)
    classes = sorted({k.split("/")[0] for k in keys})
    index = {c: i for i, c in enumerate(classes)}
    return keys, np.array([index[k.split("/")[0]] for k in keys], dtype=np.int64)


def import_fkd_tar(
    root: str | Path,
    path: str | Path,
    *,
    samples: Sequence[str] | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    num_classes: int = 1000,
    teacher: TeacherMeta = FKD_TEACHER,
    augment: Mapping[str, Any] = FKD_AUGMENT,
    temperature: float = 1.0,
    data_sha256: str | None = None,
    label_dtype: str | None = None,
    shard_size: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Convert official FKD soft labels at `root` into a store at `path`; returns its manifest.

    Row i of the store is `samples[i]` (`<wnid>/<image file>`, e.g. an `ImageFileDataset`'s `files`) with
    ground truth `labels[i]`; by default every label file, sorted (ImageFolder's order), labelled by the
    sorted position of its class folder. A sample without a label file is an error; label files of
    other images (e.g. a held-out split) are skipped and counted. `data_sha256` defaults to
    `file_list_sha256(samples, labels)`; pass the run's own value to make the store match its key.
    The teacher and augmentation default to the official generator's; the teacher's sha256 cannot be
    known from the files and is recorded as unknown unless `teacher` carries it. Resumable like
    `generate_store`: complete shards are kept.
    """
    source = _Source(Path(root))
    try:
        if samples is None:
            if labels is not None:
                raise SoftLabelStoreError("labels without samples: pass the ordered samples they belong to")
            samples, labels = _default_samples(source)
        if labels is None or len(labels) != len(samples):
            raise SoftLabelStoreError("import_fkd_tar needs one ground-truth label per sample")
        labels = np.asarray(labels, dtype=np.int64)
        keys = [label_file_key(s) for s in samples]
        missing = [k for k in keys if k not in source.files]
        if missing:
            raise SoftLabelStoreError(
                f"{root}: no soft-label file for {len(missing)} of {len(keys)} samples, e.g. {missing[:3]} "
                "(the official name of image <wnid>/<stem>.<ext> is <wnid>/<stem>.tar)"
            )
        first = load_fkd_file(source.read(keys[0]), source.where(keys[0]), num_classes)
        num_crops, k = len(first[0]), first[2].shape[2]
        dtype = label_dtype or ("float16" if first[2].dtype == np.float16 else "float32")
        check_label_dtype(dtype, num_classes)
        key = make_key(
            teacher,
            augment,
            num_crops=num_crops,
            k=k,
            temperature=temperature,
            data_sha256=data_sha256 or file_list_sha256(samples, labels),
        )
        return _write_store(source, Path(path), keys, labels, key, teacher, num_classes, dtype, shard_size, progress)
    finally:
        source.close()


def _write_store(source, path, keys, labels, key, teacher, num_classes, dtype, shard_size, progress) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    manifest_path = path / "manifest.json"
    if manifest_path.exists():
        bad = key_mismatch(json.loads(manifest_path.read_text()).get("key", {}), key)
        if bad:
            raise SoftLabelStoreError(f"{path} holds a store with another key (differs in {', '.join(bad)})")
    num_images = len(keys)
    shards = [(s, min(s + shard_size, num_images)) for s in range(0, num_images, shard_size)]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "key_hash": key_hash(key),
        "teacher": {"arch": teacher.arch, **teacher.input_key(), "sha256": teacher.sha256},
        "num_images": num_images,
        "num_classes": num_classes,
        "image_size": None,
        "seed": None,
        "label_dtype": dtype,
        "store_logits": False,
        "store_embeddings": False,
        "shard_size": shard_size,
        "shards": [f"shard-{i:05d}" for i in range(len(shards))],
        "complete": False,
        "imported": {
            "format": "fkd",
            "source": str(source.root),
            "files_used": num_images,
            "files_skipped": len(source.files) - len(set(keys)),
            "gt_prob_source": "recovered from the quantised labels (marginal smoothing)",
        },
    }
    _write_json_atomic(manifest_path, manifest)
    for i, (lo, hi) in enumerate(shards):
        final = path / manifest["shards"][i]
        if not (final / "gt_prob.npy").exists():
            write_shard(final, _import_shard(source, keys[lo:hi], labels[lo:hi], key, num_classes, dtype))
        if progress:
            progress(hi, num_images)
    manifest["complete"] = True
    _write_json_atomic(manifest_path, manifest)
    return manifest


def _import_shard(source, keys, labels, key, num_classes, dtype) -> dict[str, np.ndarray]:
    coords, flips, quantised = [], [], []
    for name in keys:
        c, f, q = load_fkd_file(source.read(name), source.where(name), num_classes)
        if len(c) != key["num_crops"] or q.shape[2] != key["k"]:
            raise SoftLabelStoreError(
                f"{source.where(name)}: {len(c)} crops, top-{q.shape[2]}; the first file had "
                f"{key['num_crops']} crops, top-{key['k']}"
            )
        coords.append(c), flips.append(f), quantised.append(q)
    q = np.stack(quantised).astype(dtype)
    m, n = q.shape[:2]
    dense = recover(torch.from_numpy(q.reshape(m * n, 2, -1).astype(np.float32)), num_classes)
    target = torch.from_numpy(np.repeat(np.asarray(labels), n))
    gt_prob = dense.gather(1, target[:, None])[:, 0].numpy().reshape(m, n)
    return {"coords": np.stack(coords), "flips": np.stack(flips), "labels": q, "gt_prob": gt_prob.astype(np.float32)}
