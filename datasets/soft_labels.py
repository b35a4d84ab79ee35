"""FKD's region-level soft-label store (Shen & Xing, ECCV 2022) and the teacher cache built on it.

Generation (`generate_store`): for every training image, N RandomResizedCrop boxes (+ flip flags) from a
generator seeded by (store seed, image index); each crop is cut at the teacher's input size with bicubic
interpolation, normalised with the teacher's own mean/std and run through the frozen teacher; the
softmax at T_gen is quantised to its top-k (`quantize`). Also stored: the teacher probability of the
ground-truth class per crop (`gt_prob`, FerKD's confidence) and optionally the full logits and the
penultimate embedding (exact targets for cached KD/DKD at any temperature).

Format (distillbench; the official code writes one pickle per image): a directory with `manifest.json`
and shards of M images, each a folder of `.npy` arrays opened memory-mapped —
`coords` (M, N, 4) float32 = (top/H, left/W, height/H, width/W), `flips` (M, N) bool,
`labels` (M, N, 2, k) (row 0 top-k class indices as floats, row 1 their probabilities), `gt_prob` (M, N)
float32, optional `logits` (M, N, K) float32 and `embeddings` (M, N, D) float16. A shard is written to a
temporary folder, fsynced and renamed, so a complete shard is never half-written and resume skips it.
The store's key (teacher sha256, augmentation, N, k, T_gen, the ordered sample list's sha256, the
teacher input size/statistics and interpolation) is checked when a run opens it.

Replay (`CachedTeacherDataset`): a training batch draws stored crops per image (a seeded permutation of
the N, first n), cuts the same box from the original image at the student's size with bilinear
interpolation (the official training setting), flips as stored and returns the recovered soft label
(`recover`), the stored logits/embedding and `gt_prob` with the batch — no teacher at train time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import flip_mask, rrc_params
from .crops import boxes_to_coords, coords_to_boxes, crop_resize
from .errors import DatasetError
from .rng import uniform

SCHEMA_VERSION = 1
RECOVER_MODES = ("marginal_smoothing", "marginal_renorm", "hard")
FIELDS = ("coords", "flips", "labels", "gt_prob", "logits", "embeddings")
KEY_FIELDS = ("teacher_sha256", "augment", "num_crops", "k", "temperature", "data_sha256", "teacher_input")


class SoftLabelStoreError(DatasetError):
    """A missing, incomplete or mismatching soft-label store."""


# -- quantise / recover (official semantics, any k) -------------------------------------------
def quantize(probs: Tensor, k: int) -> Tensor:
    """Top-k of each row, sorted descending → (N, 2, k): row 0 the class indices (as floats), row 1 the
    probabilities (FKD `generate_soft_label.py`)."""
    probs = torch.as_tensor(probs)
    if probs.ndim != 2 or not 1 <= k <= probs.shape[1]:
        raise ValueError(f"quantize needs probs (N, K) and 1 ≤ k ≤ K, got {tuple(probs.shape)} and k={k}")
    values, indices = probs.topk(k, dim=1, largest=True, sorted=True)
    return torch.stack([indices.to(values.dtype), values], dim=1)


def recover(quantized: Tensor, num_classes: int, mode: str = "marginal_smoothing") -> Tensor:
    """Dense soft labels (N, K) from quantised top-k (N, 2, k) (FKD `Recover_soft_label`, any k):

    - `marginal_smoothing`: p̂_c = q_c for the k stored classes, (1 − Σ q) / (K − k) for the others
      (nothing spread when k = K; a float16 leftover of ~−1e-6 is kept, as officially);
    - `marginal_renorm`: p̂ = q / Σ q on the stored classes (eps 1e-12), 0 elsewhere;
    - `hard`: one-hot of the teacher's top-1 class (row 0's first index).
    """
    if mode not in RECOVER_MODES:
        raise ValueError(f"unknown recover mode {mode!r}; valid: {', '.join(RECOVER_MODES)}")
    q = torch.as_tensor(quantized).float()
    indices = q[:, 0].round().long()
    values = q[:, 1]
    n, k = values.shape
    if mode == "hard":
        return F.one_hot(indices[:, 0], num_classes).float()
    if mode == "marginal_renorm":
        out = torch.zeros(n, num_classes).scatter_(1, indices, values)
        return out / out.sum(dim=1, keepdim=True).clamp_min(1e-12)
    rest = (1.0 - values.sum(dim=1, keepdim=True)) / (num_classes - k) if k < num_classes else values.new_zeros(n, 1)
    out = rest.expand(n, num_classes).clone()
    return out.scatter_(1, indices, values)


# -- keys and manifest --------------------------------------------------------------------------
def sample_list_sha256(images: Tensor, labels: Tensor) -> str:
    """sha256 of the ordered sample list: row i of the store is dataset index i."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def key_mismatch(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    return [f for f in KEY_FIELDS if _normalise(found.get(f)) != _normalise(expected.get(f))]


@dataclass(frozen=True)
class TeacherMeta:
    """What a store records about its teacher: identity and the input it expects."""

    arch: str
    sha256: str
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def input_key(self) -> dict[str, Any]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}


def make_key(
    teacher: TeacherMeta,
    augment: Mapping[str, Any],
    *,
    num_crops: int,
    k: int,
    temperature: float,
    data_sha256: str,
) -> dict[str, Any]:
    if augment.get("kind", "rrc") == "padcrop":
        aug = {"kind": "padcrop", "pad": int(augment["pad"]), "flip": bool(augment["flip"]), "views": "exhaustive"}
        if num_crops != padcrop_num_views(aug["pad"], aug["flip"]):
            raise SoftLabelStoreError(
                f"an exhaustive pad-crop store holds all {padcrop_num_views(aug['pad'], aug['flip'])} views "
                f"(pad {aug['pad']}, flip {aug['flip']}), not {num_crops}"
            )
    else:
        aug = {
            "kind": "rrc",
            "scale": [float(s) for s in augment["scale"]],
            "ratio": [float(r) for r in augment["ratio"]],
            "flip": bool(augment["flip"]),
        }
    return {
        "teacher_sha256": teacher.sha256,
        "augment": aug,
        "num_crops": int(num_crops),
        "k": int(k),
        "temperature": float(temperature),
        "data_sha256": data_sha256,
        "teacher_input": teacher.input_key(),
    }


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


LABEL_DTYPES = ("float32", "float16")
FP16_MAX_CLASSES = 2048  # every integer ≤ 2048 is exact in float16 (11-bit significand); 2049 is not


def check_label_dtype(label_dtype: str, num_classes: int | None = None) -> None:
    """`labels` are stored float32 (default: cached targets equal the live teacher's to 1e-5) or float16
    (half the disk; probabilities within 1e-3), the latter only while every class index stays exact."""
    if label_dtype not in LABEL_DTYPES:
        raise SoftLabelStoreError(f"label_dtype must be one of {', '.join(LABEL_DTYPES)}, got {label_dtype!r}")
    if label_dtype == "float16" and num_classes is not None and num_classes > FP16_MAX_CLASSES:
        raise SoftLabelStoreError(
            f"label_dtype float16 stores class indices exactly only up to {FP16_MAX_CLASSES} classes, "
            f"this teacher has {num_classes}: use float32"
        )


# -- generation ---------------------------------------------------------------------------------
def padcrop_num_views(pad: int, flip: bool) -> int:
    """(2·pad + 1)² offsets × 2 flips (1 without flip): every view RandomCrop(pad) + flip can produce."""
    return (2 * pad + 1) ** 2 * (2 if flip else 1)


def padcrop_views(pad: int, flip: bool, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """All pad-crop views as boxes in the zero-padded (H + 2·pad, W + 2·pad) image: view v has offset
    o = v // f (top = o // (2·pad + 1), left = o % (2·pad + 1)) and flip v % f = 1, f = 2 with flip."""
    f = 2 if flip else 1
    view = np.arange(padcrop_num_views(pad, flip))
    offset = view // f
    top, left = offset // (2 * pad + 1), offset % (2 * pad + 1)
    boxes = np.stack([top, left, np.full_like(top, height), np.full_like(top, width)], axis=1)
    return boxes.astype(np.int64), view % f == 1


def source_images(images: Tensor, augment: Mapping[str, Any]) -> Tensor:
    """The images the stored boxes refer to: zero-padded for pad-crop stores (as RandomCrop pads), else as is."""
    if augment.get("kind") == "padcrop" and augment["pad"] > 0:
        return F.pad(images, (augment["pad"],) * 4)
    return images


def crop_params(seed: int, index: int, num_crops: int, height: int, width: int, augment) -> tuple[np.ndarray, ...]:
    """The N boxes and flip flags of image `index`: crop j is the live `rrc` draw of (seed, epoch j, index)
    (counter-based), so any range of images can be generated alone (resume, ranks) with the same result.
    A pad-crop store holds every view instead (`padcrop_views`), the same for every image; `height` and
    `width` are then the unpadded size."""
    if augment.get("kind") == "padcrop":
        return padcrop_views(augment["pad"], augment["flip"], height, width)
    crops = np.arange(num_crops)
    idx = np.full(num_crops, index)
    top, left, h, w = rrc_params(
        np.full(num_crops, height), np.full(num_crops, width), idx, crops, seed, augment["scale"], augment["ratio"]
    )
    flips = flip_mask(idx, crops, seed) if augment["flip"] else np.zeros(num_crops, dtype=bool)
    return np.stack([top, left, h, w], axis=1), flips


def teacher_forward(
    model: nn.Module, crops: Tensor, meta: TeacherMeta, want_embedding: bool
) -> tuple[Tensor, Tensor | None]:
    """Logits (and penultimate embedding) of crops in [0, 1], normalised with the teacher's statistics."""
    mean = torch.tensor(meta.mean, dtype=crops.dtype, device=crops.device).view(1, -1, 1, 1)
    std = torch.tensor(meta.std, dtype=crops.dtype, device=crops.device).view(1, -1, 1, 1)
    x = (crops - mean) / std
    with torch.no_grad():
        if want_embedding:
            emb = model.forward_head(model.forward_features(x), pre_logits=True)
            return model.get_classifier()(emb), emb
        return model(x), None


def generate_store(
    teacher: nn.Module,
    images: Tensor,
    labels: Tensor,
    path: str | Path,
    *,
    meta: TeacherMeta,
    augment: Mapping[str, Any],
    num_crops: int = 32,
    k: int = 5,
    temperature: float = 1.0,
    seed: int = 0,
    chunk: int = 1024,
    store_logits: bool = True,
    store_embeddings: bool = False,
    shard_size: int = 4096,
    label_dtype: str = "float32",
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate (or resume) a store for `images` (uint8 (M, C, H, W)) and `labels`; returns the manifest.

    `limit` keeps the first `limit` images only (a partial store: its sample list, hence its key, differs
    from the full dataset's, so training refuses it — it serves timing and round-trip checks). `chunk`
    is the number of crops per teacher forward (the official loop dropped a remainder; here every crop
    is run). `progress(done_images, total_images)` is called after each shard.
    """
    check_label_dtype(label_dtype)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    model = teacher.eval().requires_grad_(False)
    device = next(model.parameters()).device
    num_images, _, height, width = images.shape
    key = make_key(
        meta,
        augment,
        num_crops=num_crops,
        k=k,
        temperature=temperature,
        data_sha256=sample_list_sha256(images, labels),
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    manifest_path = path / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        bad = key_mismatch(old.get("key", {}), key)
        if bad:
            raise SoftLabelStoreError(
                f"{path} holds a store with another key (differs in {', '.join(bad)}); choose another folder"
            )
    shards = [(s, min(s + shard_size, num_images)) for s in range(0, num_images, shard_size)]
    probe = torch.zeros(1, images.shape[1], meta.size, meta.size, device=device)
    num_classes = int(teacher_forward(model, probe, meta, False)[0].shape[1])
    check_label_dtype(label_dtype, num_classes)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "key_hash": key_hash(key),
        "teacher": {"arch": meta.arch, **meta.input_key(), "sha256": meta.sha256},
        "num_images": num_images,
        "num_classes": num_classes,
        "image_size": [height, width],
        "seed": seed,
        "label_dtype": label_dtype,
        "store_logits": store_logits,
        "store_embeddings": store_embeddings,
        "shard_size": shard_size,
        "shards": [f"shard-{i:05d}" for i in range(len(shards))],
        "complete": False,
        **dict(extra or {}),
    }
    _write_json_atomic(manifest_path, manifest)
    start = time.perf_counter()
    generated = 0
    for i, (lo, hi) in enumerate(shards):
        final = path / manifest["shards"][i]
        if (final / "gt_prob.npy").exists():
            if progress:
                progress(hi, num_images)
            continue
        arrays = _generate_shard(model, images[lo:hi], labels[lo:hi], lo, key, meta, seed, chunk, device, manifest)
        write_shard(final, arrays)
        generated += hi - lo
        if progress:
            progress(hi, num_images)
    manifest.update(
        complete=True,
        generation={"time_s": round(time.perf_counter() - start, 3), "images_generated": generated},
    )
    _write_json_atomic(manifest_path, manifest)
    return manifest


def write_shard(final: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write a shard's arrays to a temporary folder, fsync each file and rename it into place: a shard
    folder either holds every array or does not exist (resume skips exactly the complete ones)."""
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, array in arrays.items():
        with open(tmp / f"{name}.npy", "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, final)


def _generate_shard(model, images, labels, first_index, key, meta, seed, chunk, device, manifest) -> dict:
    n = key["num_crops"]
    m, _, height, width = images.shape
    params = [crop_params(seed, first_index + j, n, height, width, key["augment"]) for j in range(m)]
    boxes, flips = zip(*params, strict=True)
    boxes, flips = np.concatenate(boxes), np.concatenate(flips)
    owner = np.repeat(np.arange(m), n)
    source = source_images(images, key["augment"])
    height, width = source.shape[-2:]  # coords are normalised by the (padded) source size
    logits, embeddings = [], []
    for lo in range(0, len(owner), chunk):
        sel = slice(lo, lo + chunk)
        crops = crop_resize(source[owner[sel]], boxes[sel], flips[sel], meta.size, meta.interpolation).to(device)
        z, emb = teacher_forward(model, crops, meta, manifest["store_embeddings"])
        logits.append(z.float().cpu())
        if emb is not None:
            embeddings.append(emb.float().cpu())
    z = torch.cat(logits)
    num_classes = z.shape[1]
    probs = F.softmax(z / key["temperature"], dim=1)
    target = labels.long().repeat_interleave(n)
    out = {
        "coords": boxes_to_coords(boxes, height, width).reshape(m, n, 4),
        "flips": flips.reshape(m, n),
        "labels": quantize(probs, key["k"]).numpy().astype(manifest["label_dtype"]).reshape(m, n, 2, key["k"]),
        "gt_prob": probs.gather(1, target[:, None]).squeeze(1).numpy().astype(np.float32).reshape(m, n),
    }
    if manifest["store_logits"]:
        out["logits"] = z.numpy().astype(np.float32).reshape(m, n, num_classes)
    if embeddings:
        out["embeddings"] = torch.cat(embeddings).numpy().astype(np.float16).reshape(m, n, -1)
    return out


# -- opening ------------------------------------------------------------------------------------
class SoftLabelStore:
    """A complete store, opened memory-mapped. `gather(index, crop)` reads any set of (image, crop) pairs."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path, self.manifest = path, manifest
        self.key = manifest["key"]
        self.num_images = int(manifest["num_images"])
        self.num_crops = int(self.key["num_crops"])
        self.k = int(self.key["k"])
        self.num_classes = int(manifest["num_classes"])
        self.shard_size = int(manifest["shard_size"])
        self._shards = [self._open_shard(path / name) for name in manifest["shards"]]
        self.fields = [f for f in FIELDS if f in self._shards[0]]

    @staticmethod
    def _open_shard(folder: Path) -> dict[str, np.ndarray]:
        if not folder.is_dir():
            raise SoftLabelStoreError(f"{folder}: shard missing; regenerate the store (`make softlabels`)")
        return {f: np.load(folder / f"{f}.npy", mmap_mode="r") for f in FIELDS if (folder / f"{f}.npy").exists()}

    @classmethod
    def open(cls, path: str | Path, expected_key: Mapping[str, Any] | None = None) -> SoftLabelStore:
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise SoftLabelStoreError(
                f"no soft-label store at {path} (no manifest.json); generate it with `make softlabels PROTOCOL=...`"
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise SoftLabelStoreError(f"{path}: store schema {manifest.get('schema_version')} ≠ {SCHEMA_VERSION}")
        if not manifest.get("complete"):
            raise SoftLabelStoreError(f"{path}: generation did not finish; rerun `make softlabels` to resume it")
        if expected_key is not None:
            bad = key_mismatch(manifest["key"], expected_key)
            if bad:
                detail = "; ".join(f"{f}: store {manifest['key'].get(f)!r} ≠ run {expected_key.get(f)!r}" for f in bad)
                raise SoftLabelStoreError(f"{path} does not match this run ({detail})")
        return cls(path, manifest)

    @property
    def has_logits(self) -> bool:
        return "logits" in self.fields

    def _locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.num_images):
            raise SoftLabelStoreError(f"image index out of range for a store of {self.num_images} images")
        return index // self.shard_size, index % self.shard_size

    def gather(self, index: np.ndarray, crop: np.ndarray | None = None, fields: Sequence[str] | None = None) -> dict:
        """Arrays for images `index` (B,), all N crops (crop None) or crop `crop[b]` of image b."""
        shard, row = self._locate(index)
        fields = [f for f in (fields or self.fields) if f in self.fields]
        first = self._shards[0]
        tail = 1 if crop is None else 2  # leading axes dropped: (image) or (image, crop)
        out = {f: np.empty((len(shard), *first[f].shape[tail:]), dtype=first[f].dtype) for f in fields}
        crop = None if crop is None else np.asarray(crop)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            for f in fields:
                arr = self._shards[s][f]
                out[f][sel] = arr[row[sel]] if crop is None else arr[row[sel], crop[sel]]
        return out

    def get(self, i: int) -> tuple[np.ndarray, ...]:
        """(coords, flips, labels, gt_prob[, logits][, embeddings]) of image i, all N crops."""
        data = self.gather(np.array([i]))
        return tuple(data[f][0] for f in FIELDS if f in data)

    def column(self, field: str) -> np.ndarray:
        """One field for every image, (M, N, ...) — e.g. `gt_prob` for FerKD's crop categories."""
        return np.concatenate([np.asarray(s[field]) for s in self._shards])


# -- replay -------------------------------------------------------------------------------------
def fkd_passes(epochs: int, num_crops: int) -> list[tuple[int, int]]:
    """FKD's epoch accounting (`train_FKD.py`): passes start at e = 0, n, 2n, … while e < E − n, each
    with n crops per image and counting as n epochs; the last epochs run one at a time with 1 crop.
    E = 12, n = 4 → [(0, 4), (4, 4), (8, 1), (9, 1), (10, 1), (11, 1)]."""
    passes, e = [], 0
    while e < epochs:
        if num_crops > 1 and e < epochs - num_crops:
            passes.append((e, num_crops))
            e += num_crops
        else:
            passes.append((e, 1))
            e += 1
    return passes


def epoch_plan(epochs: int, num_crops: int) -> list[tuple[int, int, int]]:
    """Per Lightning epoch: (pass start, crops per image, part). An n-crop pass spans n Lightning epochs,
    each holding 1/n of the pass's steps, so every epoch has the single-crop number of steps."""
    plan = []
    for start, n in fkd_passes(epochs, num_crops):
        plan += [(start, n, part) for part in range(n)]
    return plan


class StoreBatchSampler:
    """Crop-major multi-crop batches, sharded across ranks by image.

    A step of an n-crop pass holds b/n images (b = the global batch, counted in crops) and yields keys
    (index, pass start, slot) crop-major: slot 0 of every local image, then slot 1, … Rank r takes the
    r-th contiguous slice of each step's images. Order is a function of (seed, pass) only. Lightning
    calls `set_epoch` through the `sampler` attribute.
    """

    def __init__(self, n: int, *, global_batch: int, epochs: int, num_crops: int, rank=0, world_size=1, seed=0):
        self.n, self.global_batch, self.rank, self.world_size, self.seed = n, global_batch, rank, world_size, seed
        self.plan = epoch_plan(epochs, num_crops)
        for _, crops, _ in self.plan:
            if global_batch % crops or (global_batch // crops) % world_size:
                raise DatasetError(
                    f"global batch {global_batch} must be divisible by {crops} crops × {world_size} devices"
                )
        self.steps = n // global_batch
        self.epoch = 0
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        start, crops, part = self.plan[min(self.epoch, len(self.plan) - 1)]
        images = self.global_batch // crops
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + start))
        grid = order[: crops * self.steps * images].view(crops * self.steps, images)
        local = images // self.world_size
        for row in grid[part * self.steps : (part + 1) * self.steps]:
            mine = row[self.rank * local : (self.rank + 1) * local].tolist()
            yield [(i, start, slot) for slot in range(crops) for i in mine]


class CachedTeacherDataset(torch.utils.data.Dataset):
    """Replays stored crops of an `ArrayDataset` and returns the teacher's targets with the batch.

    Keys `(index, pass, slot)`: slot s of pass p is stored crop perm[s] of a permutation of the image's
    (allowed) N crops drawn from (seed, pass, index). The batch dict holds `image` (student size,
    `interpolation`, student mean/std), `label`, `index`, `crop` (stored crop id), `soft_target`
    (`recover(labels, K, recover_mode)`), `gt_prob`, and `teacher_logits` / `teacher_embedding` when
    stored.
    """

    def __init__(
        self,
        dataset,
        store: SoftLabelStore,
        *,
        recover_mode: str = "marginal_smoothing",
        interpolation: str = "bilinear",
        seed: int = 0,
        crop_pool: np.ndarray | None = None,
    ):
        if len(dataset) != store.num_images:
            raise SoftLabelStoreError(f"dataset has {len(dataset)} images, the store {store.num_images}")
        if recover_mode not in RECOVER_MODES:
            raise ValueError(f"unknown recover mode {recover_mode!r}; valid: {', '.join(RECOVER_MODES)}")
        self.dataset, self.store = dataset, store
        self.recover_mode, self.interpolation, self.seed = recover_mode, interpolation, seed
        self.crop_pool: np.ndarray | None = None
        if crop_pool is not None:
            self.restrict(crop_pool)

    def restrict(self, crop_pool: np.ndarray, min_crops: int = 1) -> None:
        """Sample only crops where `crop_pool` (M, N) is True (e.g. FerKD's easy_action='drop')."""
        pool = np.asarray(crop_pool, dtype=bool)
        if pool.shape != (self.store.num_images, self.store.num_crops):
            raise SoftLabelStoreError(f"crop pool {pool.shape} ≠ store {(self.store.num_images, self.store.num_crops)}")
        if (pool.sum(1) < min_crops).any():
            raise SoftLabelStoreError(f"some images keep fewer than {min_crops} crops in the sampling pool")
        self.crop_pool = pool

    def __len__(self) -> int:
        return len(self.dataset)

    def choose_crops(self, index: np.ndarray, pass_id: np.ndarray, slot: np.ndarray) -> np.ndarray:
        streams = 1000 + np.arange(self.store.num_crops, dtype=np.uint64)  # one counter stream per stored crop
        u = uniform(self.seed + 7919, np.asarray(pass_id)[:, None], np.asarray(index)[:, None], streams)
        if self.crop_pool is not None:
            u = np.where(self.crop_pool[index], u, np.inf)
        perm = np.argsort(u, axis=1, kind="stable")
        return perm[np.arange(len(index)), slot]

    def __getitems__(self, keys: Sequence[tuple[int, int, int]]) -> dict[str, Tensor]:
        keys = np.asarray([tuple(k) + (0,) * (3 - len(k)) if isinstance(k, tuple) else (k, 0, 0) for k in keys])
        index, pass_id, slot = keys[:, 0], keys[:, 1], keys[:, 2]
        crop = self.choose_crops(index, pass_id, slot)
        data = self.store.gather(index, crop)
        ds, store_k_classes = self.dataset, self.store.num_classes
        idx = torch.from_numpy(index)
        images = ds.images[idx]
        size = images.shape[-2]
        images = source_images(images, self.store.key["augment"])
        boxes = coords_to_boxes(data["coords"], *images.shape[-2:])
        pixels = crop_resize(images, boxes, data["flips"], size=size, interpolation=self.interpolation)
        batch = {
            "image": (pixels - ds.mean) / ds.std,
            "label": ds.labels[idx],
            "index": idx,
            "crop": torch.from_numpy(crop),
            "soft_target": recover(torch.from_numpy(np.asarray(data["labels"])), store_k_classes, self.recover_mode),
            "gt_prob": torch.from_numpy(np.asarray(data["gt_prob"], dtype=np.float32)),
        }
        if "logits" in data:
            batch["teacher_logits"] = torch.from_numpy(np.asarray(data["logits"], dtype=np.float32))
        if "embeddings" in data:
            batch["teacher_embedding"] = torch.from_numpy(np.asarray(data["embeddings"], dtype=np.float32))
        return batch

    def __getitem__(self, key) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([key]).items()}


def import_fkd_tar(root: str | Path, path: str | Path, **kwargs) -> dict[str, Any]:
    """Convert the official FKD per-image soft-label files (a folder, .zip or .tar of
    `<wnid>/<stem>.tar` `torch.save` lists [coords, flips, labels]) into a store at `path`; see
    `distillbench.datasets.fkd_import.import_fkd_tar` for the options."""
    from .fkd_import import import_fkd_tar as convert

    return convert(root, path, **kwargs)


def replay_crop(image: Tensor, coords, flip: bool, size: int, interpolation: str = "bilinear", pad: int = 0) -> Tensor:
    """One stored crop of one image (C, H, W) → float32 (C, size, size) in [0, 1] (`pad`: a pad-crop
    store's padding, whose coords refer to the zero-padded image)."""
    image = F.pad(image, (pad,) * 4) if pad else image
    _, h, w = image.shape
    boxes = coords_to_boxes(np.asarray(coords, dtype=np.float32)[None], h, w)
    return crop_resize(image[None], boxes, np.array([bool(flip)]), size, interpolation)[0]


def verify_store(
    store: SoftLabelStore, teacher: nn.Module, images: Tensor, labels: Tensor, meta: TeacherMeta, n: int = 32, seed=0
) -> dict[str, Any]:
    """The round-trip check on a real store: for n random images, replay every stored crop at the teacher's
    size and interpolation, run the teacher live, and compare with what the store holds."""
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(store.num_images, size=min(n, store.num_images), replace=False))
    data = store.gather(index)
    m, crops = len(index), store.num_crops
    source = source_images(images[torch.from_numpy(index)], store.key["augment"])
    boxes = coords_to_boxes(np.asarray(data["coords"]).reshape(-1, 4), *source.shape[-2:])
    owner = torch.from_numpy(np.repeat(index, crops))
    rows = torch.from_numpy(np.repeat(np.arange(m), crops))
    pixels = crop_resize(source[rows], boxes, np.asarray(data["flips"]).reshape(-1), meta.size, meta.interpolation)
    device = next(teacher.parameters()).device
    z, _ = teacher_forward(teacher.eval(), pixels.to(device), meta, False)
    z = z.float().cpu()
    p = F.softmax(z / store.key["temperature"], dim=1)
    q = torch.from_numpy(np.asarray(data["labels"], dtype=np.float32).reshape(m * crops, 2, store.k))
    top = p.topk(store.k, dim=1)
    out = {
        "images": m,
        "crops": m * crops,
        "topk_indices_equal": float((q[:, 0].round().long() == top.indices).float().mean()),
        "max_abs_prob_err": float((q[:, 1] - top.values).abs().max()),
        "max_abs_gt_prob_err": float(
            (torch.from_numpy(np.asarray(data["gt_prob"]).reshape(-1)) - p.gather(1, labels[owner][:, None])[:, 0])
            .abs()
            .max()
        ),
    }
    if "logits" in data:
        stored = torch.from_numpy(np.asarray(data["logits"]).reshape(m * crops, -1))
        out["max_abs_logit_err"] = float((stored - z).abs().max())
    return out
