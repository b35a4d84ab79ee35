"""Shared fixtures: a tiny digits protocol, a session-trained teacher, generated Fashion-MNIST files."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent


TINY_PROTOCOL = {
    "name": "tinydigits",
    "version": 1,
    "description": "test-only digits protocol",
    "dataset": {"name": "digits", "val_size": 0.1, "split_seed": 0},
    "input": {"size": 8, "channels": 1, "mean": [0.3053], "std": [0.3759]},
    "augment": {"kind": "padcrop", "pad": 1, "flip": False},
    "batch_size": 64,
    "epochs": 2,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
    "schedule": {"name": "cosine"},
    "teacher": {"epochs": 3, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "schedule": {"name": "cosine"}},
    "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
    "seeds": [0, 1],
    "methods": {"kd": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}, "dkd": {"warmup_epochs": 1}},
}


def write_protocol(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_protocol_path(tmp_path_factory) -> Path:
    return write_protocol(tmp_path_factory.mktemp("protocols") / "tinydigits.yaml", TINY_PROTOCOL)


@pytest.fixture(scope="session")
def teacher_store(tmp_path_factory, tiny_protocol_path) -> Path:
    """A teacher store holding the tiny protocol's trained resnet14 (trained once per session)."""
    from distillbench.benchmark.protocol import load_protocol
    from distillbench.benchmark.teachers import train_teacher

    root = tmp_path_factory.mktemp("teachers")
    train_teacher(load_protocol(tiny_protocol_path), "resnet14", root=root, progress=False)
    return root


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write an unsigned-byte IDX file (MNIST format), gzip-compressed when `compress`."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_fmnist(tmp_path) -> Path:
    """$DATA_ROOT with a small Fashion-MNIST in the real IDX .gz format (60 train / 20 test per class... scaled)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for split, n in (("train", 300), ("t10k", 100)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, size=(n, 28, 28))
        images[:, :4, :4] = labels[:, None, None] * 25  # a learnable corner code
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return tmp_path
