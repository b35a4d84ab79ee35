"""The soft-label store of a run: find or generate it, and train from it (ferkd.md §1).

A store lives beside its teacher, `<teachers>/<protocol>/soft_labels/<arch>-<key hash>/`, keyed by the
teacher's sha256, the protocol's `soft_labels` settings and the training split's sample list; a
`TEACHER_CACHE=<path>` whose key differs is refused with the differing fields named. `StoreDataModule`
replaces the training loader of a run by stored-crop replay (`CachedTeacherDataset`), multi-crop and
crop-major for FKD/FerKD, one crop per image per epoch for cached KD/DKD; evaluation is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ..datasets.soft_labels import (
    CachedTeacherDataset,
    SoftLabelStore,
    SoftLabelStoreError,
    StoreBatchSampler,
    TeacherMeta,
    epoch_plan,
    generate_store,
    key_hash,
    make_key,
    sample_list_sha256,
)
from .protocol import Protocol


def teacher_meta(protocol: Protocol, arch: str, info: dict[str, Any]) -> TeacherMeta:
    stats = info.get("input") or {"mean": protocol.input.mean, "std": protocol.input.std}
    return TeacherMeta(
        arch=arch,
        sha256=info["sha256"],
        size=int(stats.get("size", protocol.input.size)),
        mean=tuple(stats["mean"]),
        std=tuple(stats["std"]),
    )


def store_key(protocol: Protocol, meta: TeacherMeta, images, labels) -> dict[str, Any]:
    s = protocol.soft_labels
    return make_key(
        meta,
        protocol.train_augment,
        num_crops=s["num_crops"],
        k=s["k"],
        temperature=s.get("temperature", 1.0),
        data_sha256=sample_list_sha256(images, labels),
    )


def default_store_path(teachers_dir: Path, arch: str, key: dict[str, Any]) -> Path:
    return Path(teachers_dir) / "soft_labels" / f"{arch}-{key_hash(key)}"


def ensure_store(
    protocol: Protocol,
    model: torch.nn.Module,
    info: dict[str, Any],
    arch: str,
    train_set,
    teachers_dir: Path,
    *,
    path: str | Path | None = None,
    device: str = "cpu",
    limit: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> SoftLabelStore:
    """Open the run's store, generating (or resuming) it first when it does not exist yet.

    An explicit `path` must hold a store with this run's key; the default path is derived from the key.
    `limit` generates a partial store over the first `limit` images (timing/round-trip checks only).
    """
    protocol = protocol if protocol.store_augment else protocol.with_store_augment()
    meta = teacher_meta(protocol, arch, info)
    images, labels = train_set.images, train_set.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    key = store_key(protocol, meta, images, labels)
    target = Path(path) if path else default_store_path(teachers_dir, arch, key)
    manifest = target / "manifest.json"
    if manifest.exists():
        try:
            return SoftLabelStore.open(target, expected_key=key)
        except SoftLabelStoreError as exc:
            if "did not finish" not in str(exc):
                raise
    if path and not manifest.exists() and target.is_dir() and any(target.iterdir()):
        raise SoftLabelStoreError(f"{target} is not empty and holds no soft-label store")
    if os.environ.get("LOCAL_RANK", "0") != "0":
        raise SoftLabelStoreError(f"no soft-label store at {target} on a DDP worker; run `make softlabels` first")
    s = protocol.soft_labels
    say(f"soft-label store: {len(images)} images × {s['num_crops']} crops of teacher {arch} → {target}")
    generate_store(
        model.to(device),
        images,
        labels,
        target,
        meta=meta,
        augment=protocol.train_augment,
        num_crops=s["num_crops"],
        k=s["k"],
        temperature=s.get("temperature", 1.0),
        seed=s.get("seed", 0),
        store_logits=s.get("store_logits", True),
        store_embeddings=s.get("store_embeddings", False),
        label_dtype=s.get("label_dtype", "float32"),
        progress=_progress_bar(len(images)) if progress else None,
        extra={"protocol": protocol.name, "protocol_hash": protocol.hash(), "limit": limit},
    )
    model.cpu()
    return SoftLabelStore.open(target, expected_key=key)


def _progress_bar(total: int) -> Callable[[int, int], None]:
    from rich.progress import Progress

    bar = Progress(transient=False)
    task = bar.add_task("soft labels", total=total)
    bar.start()

    def update(done: int, total_: int) -> None:
        bar.update(task, completed=done)
        if done >= total_:
            bar.stop()

    return update


def _identity(batch):
    return batch


class StoreDataModule(L.LightningDataModule):
    """A run's data with the training split replayed from the soft-label store.

    `crops_per_image` n > 1 gives FKD's multi-crop passes (`fkd_passes`); the protocol's batch counts
    crops. Validation and test loaders are the wrapped datamodule's.
    """

    def __init__(
        self,
        base,
        store: SoftLabelStore,
        *,
        epochs: int,
        seed: int,
        crops_per_image: int = 1,
        recover_mode: str = "marginal_smoothing",
        interpolation: str = "bilinear",
    ):
        super().__init__()
        base.setup()
        self.base, self.store = base, store
        self.num_classes = base.num_classes
        self.epochs, self.seed, self.crops_per_image = epochs, seed, crops_per_image
        if crops_per_image > store.num_crops:
            raise SoftLabelStoreError(f"{crops_per_image} crops per image but the store holds {store.num_crops}")
        self.train_set = CachedTeacherDataset(
            base.train_set, store, recover_mode=recover_mode, interpolation=interpolation, seed=seed
        )

    def setup(self, stage: str | None = None) -> None:
        self.base.setup(stage)

    def fingerprint(self) -> str:
        return self.base.fingerprint()

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = StoreBatchSampler(
            len(self.train_set),
            global_batch=self.base.global_batch,
            epochs=self.epochs,
            num_crops=self.crops_per_image,
            rank=rank,
            world_size=world,
            seed=self.seed,
        )
        workers = self.base.num_workers
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            collate_fn=_identity,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def val_dataloader(self):
        self.base.trainer = getattr(self, "trainer", None)
        return self.base.val_dataloader()

    def test_dataloader(self):
        self.base.trainer = getattr(self, "trainer", None)
        return self.base.test_dataloader()

    def summary(self) -> dict[str, Any]:
        m = self.store.manifest
        return {
            "path": str(self.store.path),
            "key_hash": m["key_hash"],
            "num_crops": self.store.num_crops,
            "k": self.store.k,
            "label_dtype": m.get("label_dtype", "float32"),
            "temperature": m["key"]["temperature"],
            "augment": m["key"]["augment"],
            "has_logits": self.store.has_logits,
            # stored logits: softmax(z/T) at any T equals the live teacher's on the stored (bicubic) crop
            "exact_targets": self.store.has_logits,
            "crops_per_image": self.crops_per_image,
            "generation_time_s": (m.get("generation") or {}).get("time_s"),
        }

    def lr_epoch(self, epoch: int) -> int:
        """The schedule's epoch for Lightning epoch `epoch`: the start of its pass (FKD's accounting)."""
        plan = epoch_plan(self.epochs, self.crops_per_image)
        return plan[epoch][0] if epoch < len(plan) else epoch

    def crop_column(self, field: str) -> np.ndarray:
        return self.store.column(field)

    def restrict(self, crop_pool: np.ndarray) -> None:
        self.train_set.restrict(crop_pool, min_crops=self.crops_per_image)
