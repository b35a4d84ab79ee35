"""In-memory image-classification data: dataset, sharded epoch sampler and LightningDataModule.

Splits are deterministic: the test split is the dataset's own (or a fixed stratified slice where the
dataset has none), and the held-out validation slice is carved from train, stratified, with the
protocol's `split_seed` — the same for every run seed. Shuffling and augmentation use the run seed.

The training sampler shards each *global* batch across ranks (rank r takes the r-th contiguous
slice), so a step sees the same images on 1 or N devices; the last incomplete global batch of an
epoch is dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from . import augment, timm_augment
from .augment import eval_spec
from .batch_augment import black_fill, pad_crop_flip_at
from .errors import DatasetError
from .resumable import ResumableLoader


def _identity(batch: Any) -> Any:
    return batch


class ArrayDataset(Dataset):
    """uint8 images (N, C, H, W) and int64 labels held in memory.

    Keys are `index` or `(index, epoch)`; `__getitems__` returns one collated batch dict
    (`image` float32 normalised, `label`, `index`), applying the batched augmentation.

    With `deferred_padcrop=(pad, flip)` the images stay un-augmented and the batch also carries `crop`
    (B, 3) int64: the (top, left, flip) that `augment.padcrop` would have drawn, for the data module to
    apply on the device (`ArrayDataModule.on_after_batch_transfer`).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment_spec: Mapping[str, Any] | None = None,
        seed: int = 0,
        deferred_padcrop: tuple[int, bool] | None = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DatasetError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise DatasetError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment_spec = dict(augment_spec) if augment_spec else None
        self.seed = seed
        if deferred_padcrop is not None and self.augment_spec:
            raise DatasetError("a deferred pad-crop replaces the augmentation: pass no augment_spec with it")
        self.deferred_padcrop = deferred_padcrop

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> dict[str, Tensor]:
        pairs = [k if isinstance(k, tuple) else (k, 0) for k in keys]
        index = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
        epoch = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
        idx = torch.from_numpy(index)
        images = self.images[idx]
        spec = self.augment_spec or {}
        if spec:
            images = augment.apply(images, index, epoch, self.seed, spec)
        if spec.get("auto_augment"):  # timm's RandAugment after the crop (OFA's ViT/MLP-student recipe)
            mean = self.mean.flatten().tolist()
            images = timm_augment.rand_augment_uint8(images, index, epoch, self.seed, spec["auto_augment"], mean)
        x = self.normalize(images)
        if spec.get("re_prob"):  # timm's RandomErasing acts on the normalised image
            x = timm_augment.random_erase(x, index, epoch, self.seed, float(spec["re_prob"]))
        batch = {"image": x, "label": self.labels[idx], "index": idx}
        if self.deferred_padcrop is not None:
            top, left, flips = augment.padcrop_params(index, epoch, self.seed, *self.deferred_padcrop)
            batch["crop"] = torch.from_numpy(np.stack([top, left, flips.astype(np.int64)], axis=1))
        return batch

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        batch = self.__getitems__([key])
        return {k: v[0] for k, v in batch.items()}

    def normalize(self, images: Tensor) -> Tensor:
        return (images.float().div_(255.0) - self.mean) / self.std


class ShardedEpochSampler(Sampler):
    """Yields `(index, epoch)` keys. Order is a function of (seed, epoch) only.

    Training (`drop_last=True`): a seeded permutation cut into global batches; rank r yields the
    r-th contiguous `global_batch // world_size` slice of each. Evaluation: rank r takes every
    world_size-th index, no padding (torchmetrics syncs the states, so nothing is counted twice).
    """

    def __init__(
        self,
        n: int,
        *,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
    ):
        if global_batch % world_size:
            raise DatasetError(f"global batch {global_batch} is not divisible by {world_size} devices")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def _local(self) -> Tensor:
        order = self._order()
        if not self.drop_last:
            return order[self.rank :: self.world_size]
        steps = self.n // self.global_batch
        local = self.global_batch // self.world_size
        grid = order[: steps * self.global_batch].view(steps, self.global_batch)
        return grid[:, self.rank * local : (self.rank + 1) * local].reshape(-1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(i, epoch) for i in self._local().tolist()])

    def __len__(self) -> int:
        if not self.drop_last:
            return len(range(self.rank, self.n, self.world_size))
        return (self.n // self.global_batch) * (self.global_batch // self.world_size)


def stratified_split(labels: np.ndarray, size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) index arrays; `size` is a count or a fraction of len(labels)."""
    idx = np.arange(len(labels))
    kept, held = train_test_split(idx, test_size=size, random_state=seed, stratify=labels)
    return np.sort(kept), np.sort(held)


class ArrayDataModule(L.LightningDataModule):
    """Train / held-out val / test loaders over in-memory arrays; subclasses implement `load_arrays`.

    `val_dataloader` returns [val, test]: the base module evaluates both after every epoch, so the
    last epoch's test metric (the reported number) and the best epoch (logged apart) both exist.
    """

    name: ClassVar[str] = ""
    num_classes: ClassVar[int] = 0
    default_mean: ClassVar[tuple[float, ...]] = ()
    default_std: ClassVar[tuple[float, ...]] = ()

    def __init__(
        self,
        *,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        augment: Mapping[str, Any] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        num_workers: int = 0,
        root: str | None = None,
        image_size: int | None = None,
        augment_on_device: bool = False,
    ):
        super().__init__()
        self.global_batch = batch_size
        self.eval_batch_size = eval_batch_size or max(batch_size, 256)
        self.val_size, self.split_seed, self.seed = val_size, split_seed, seed
        self.augment_spec = dict(augment or {"kind": "none"})
        if self.augment_spec.get("kind") == "rrc" and image_size is not None:
            self.augment_spec.setdefault("size", image_size)
        self.eval_spec = eval_spec(self.augment_spec)  # e.g. resize + centre crop after rrc
        self.augment_on_device = bool(augment_on_device)
        if self.augment_on_device:
            extra = sorted(set(self.augment_spec) - {"kind", "pad", "flip"})
            if self.augment_spec.get("kind") != "padcrop" or extra:
                raise DatasetError(
                    "augment_on_device supports only a plain padcrop augmentation (kind, pad, flip), got "
                    f"{self.augment_spec}"
                )
        self.mean = tuple(mean or self.default_mean)
        self.std = tuple(std or self.default_std)
        self.num_workers = num_workers
        self.root = root
        self.train_set: ArrayDataset | None = None
        self.val_set: ArrayDataset | None = None
        self.test_set: ArrayDataset | None = None

    def load_arrays(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """((train_images, train_labels), (test_images, test_labels)); uint8 NCHW, int64."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        (x_train, y_train), (x_test, y_test) = self.load_arrays()
        kept, held = stratified_split(y_train.numpy(), self.val_size, self.split_seed)
        kw = {"mean": self.mean, "std": self.std, "seed": self.seed}
        if self.augment_on_device:  # the loader ships un-augmented images; on_after_batch_transfer crops them
            deferred = (int(self.augment_spec.get("pad", 4)), bool(self.augment_spec.get("flip", True)))
            self.train_set = ArrayDataset(x_train[kept], y_train[kept], deferred_padcrop=deferred, **kw)
        else:
            self.train_set = ArrayDataset(x_train[kept], y_train[kept], augment_spec=self.augment_spec, **kw)
        self.val_set = ArrayDataset(x_train[held], y_train[held], augment_spec=self.eval_spec, **kw)
        self.test_set = ArrayDataset(x_test, y_test, augment_spec=self.eval_spec, **kw)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With `augment_on_device`: the training batch's pad-crop + flip, applied on its device.

        Same offsets and flips as the loader-side `augment.padcrop` (counter-based on seed, epoch and
        index), so the batches — and the training run — are the same either way.
        """
        if isinstance(batch, dict) and "crop" in batch:
            batch = dict(batch)
            crop = batch.pop("crop")
            pad = self.train_set.deferred_padcrop[0]
            fill = black_fill(self.mean, self.std).to(batch["image"].device)
            batch["image"] = pad_crop_flip_at(batch["image"], crop[:, 0], crop[:, 1], crop[:, 2].bool(), pad, fill)
        return batch

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the training split's images and labels: which data a teacher was trained on.

        Part of a teacher's key, so a teacher trained on a generated tiny tree or another DATA_ROOT is
        never used with the real dataset.
        """
        self.setup()
        digest = hashlib.sha256(self.name.encode())
        digest.update(str(tuple(self.train_set.images.shape)).encode())
        digest.update(self.train_set.images.numpy().tobytes())
        digest.update(self.train_set.labels.numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the batches the model sees (after any resizing augmentation)."""
        self.setup()
        size = self.augment_spec.get("size")
        channels, height, width = self.train_set.images.shape[1:]
        return (channels, int(size), int(size)) if size else (channels, height, width)

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: ArrayDataset, *, train: bool) -> DataLoader:
        rank, world = self._rank_world()
        batch = self.global_batch if train else self.eval_batch_size * world
        sampler = ShardedEpochSampler(
            len(dataset),
            global_batch=batch,
            rank=rank,
            world_size=world,
            shuffle=train,
            drop_last=train,
            seed=self.seed,
        )
        cls, extra = (ResumableLoader, {"progress": self._batches_done}) if train else (DataLoader, {})
        return cls(
            dataset,
            batch_sampler=BatchSampler(sampler, batch_size=batch // world, drop_last=False),
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._on_cuda(),  # page-locked batches: asynchronous host-to-device copies
            **extra,
        )

    def _on_cuda(self) -> bool:
        device = getattr(getattr(getattr(self, "trainer", None), "strategy", None), "root_device", None)
        return device is not None and device.type == "cuda"

    def _batches_done(self) -> int:
        """Training batches of the current epoch already trained on (saved in checkpoints for exact resume)."""
        trainer = getattr(self, "trainer", None)
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        return [self._loader(self.val_set, train=False), self._loader(self.test_set, train=False)]

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, train=False)
