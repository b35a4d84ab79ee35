"""distillbench.datasets — LightningDataModules by name, with real loaders for each format."""

from __future__ import annotations

import difflib
from typing import Any

from .base import ArrayDataModule, ArrayDataset, ShardedEpochSampler
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .coco import CocoProtocolDataModule, ShapesDataModule
from .digits import DigitsDataModule
from .errors import CorruptDatasetError, DatasetError, DatasetNotFoundError, UnknownDatasetError
from .fmnist import FashionMNISTDataModule
from .imagenet import ImageNetDataModule
from .webproxy import WebProxyDataModule

DATAMODULES: dict[str, type] = {
    "digits": DigitsDataModule,
    "fmnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "imagenet": ImageNetDataModule,
    "webproxy": WebProxyDataModule,
    "coco": CocoProtocolDataModule,
    "shapes": ShapesDataModule,
}


def list_datasets() -> list[str]:
    return sorted(DATAMODULES)


def get_datamodule_class(name: str) -> type:
    try:
        return DATAMODULES[name]
    except KeyError:
        close = difflib.get_close_matches(name, DATAMODULES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownDatasetError(f"unknown dataset {name!r}{hint}; available: {', '.join(list_datasets())}") from None


def create_datamodule(name: str, **kwargs: Any):
    return get_datamodule_class(name)(**kwargs)


__all__ = [
    "DATAMODULES",
    "ArrayDataModule",
    "ArrayDataset",
    "CorruptDatasetError",
    "DatasetError",
    "DatasetNotFoundError",
    "ShardedEpochSampler",
    "create_datamodule",
    "get_datamodule_class",
    "list_datasets",
]
