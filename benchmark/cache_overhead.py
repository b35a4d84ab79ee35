"""Distillation overhead of live KD vs KD from the soft-label store (teacher cache), data loading included.

    python -m distillbench.benchmark.cache_overhead --protocol fmnist [--limit 1024] [--crops 8]

A training step = make the batch (data) + forward/backward/SGD (step). For the same global batch this
times, in alternating rounds (medians, so a background load hits all alike):
- vanilla: the protocol's live augmentation + the student's CE step (the denominator);
- live KD: the same batch + KD with a frozen teacher forward;
- cached KD: a batch replayed from the store (stored crops + stored logits) + KD without a teacher;
- vanilla on the store's crops: the same replayed batch + the student's CE step (what `AUGMENT=store`
  trains on), the denominator that holds the augmentation fixed: on CPU a step's time depends on the
  pixels (a pad-crop Fashion-MNIST batch, mostly constant background, steps faster than resized crops
  or noise), so the ratio over the pad-crop vanilla mixes augmentation and distillation cost;
and prints each ratio over vanilla (and cached KD over vanilla on the store's crops). The store may be
partial (`--limit` images, `--crops` views each):
replay cost per batch does not depend on how many images the store covers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.base import ArrayDataset
from ..datasets.soft_labels import CachedTeacherDataset
from ..methods import FrozenTeacher
from ..methods.kd import kd_loss
from .protocol import load_protocol
from .runner import make_datamodule
from .soft_labels import ensure_store
from .teachers import ensure_teacher, teacher_paths
from .zoo import create_model


def _median_time(fn, steps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def measure(protocol_name: str, limit: int, crops: int, steps: int, rounds: int, teachers=None, data_root=None):
    protocol = load_protocol(protocol_name)
    store_protocol = protocol.with_store_augment(crops)
    pair = protocol.pair()
    dm = make_datamodule(protocol, seed=0, data_root=data_root)
    dm.setup()
    model, info = ensure_teacher(protocol, pair.teacher, data_fingerprint=dm.fingerprint(), root=teachers)
    t0 = time.perf_counter()
    store = ensure_store(
        store_protocol,
        model,
        info,
        pair.teacher,
        dm.train_set,
        teacher_paths(teachers, protocol, pair.teacher)[0].parent,
        limit=limit,
        progress=False,
    )
    store_s = time.perf_counter() - t0
    train = dm.train_set
    sub = ArrayDataset(train.images[:limit], train.labels[:limit], mean=dm.mean, std=dm.std)
    cached = CachedTeacherDataset(sub, store, seed=0)
    live = ArrayDataset(train.images, train.labels, mean=dm.mean, std=dm.std, augment_spec=protocol.augment)
    teacher = FrozenTeacher(model)
    torch.manual_seed(0)
    student = create_model(pair.student, num_classes=dm.num_classes, in_chans=protocol.input.channels).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    b = protocol.batch_size
    rng = np.random.default_rng(0)
    kd_hp = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, **protocol.methods.get("kd", {})}

    def live_batch():
        keys = [(int(i), 0) for i in rng.integers(0, len(live), b)]
        return live.__getitems__(keys)

    def cached_batch():
        keys = [(int(i), int(e), 0) for i, e in zip(rng.integers(0, limit, b), rng.integers(0, 1000, b), strict=True)]
        return cached.__getitems__(keys)

    def train_step(batch, z_t=None):
        opt.zero_grad(set_to_none=True)
        z = student(batch["image"])
        loss = F.cross_entropy(z, batch["label"])
        if z_t is not None:
            loss = kd_hp["ce_weight"] * loss + kd_hp["kd_weight"] * kd_loss(z, z_t, kd_hp["temperature"])
        loss.backward()
        opt.step()

    arms = {
        "vanilla": lambda: train_step(live_batch()),
        "kd_live": lambda: (lambda bt: train_step(bt, teacher.logits(bt["image"])))(live_batch()),
        "kd_cached": lambda: (lambda bt: train_step(bt, bt["teacher_logits"]))(cached_batch()),
        "vanilla_store": lambda: train_step(cached_batch()),
        "data_live": live_batch,
        "data_cached": cached_batch,
    }
    times = {k: [] for k in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            times[name].append(_median_time(fn, steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "protocol": protocol.name,
        "batch": b,
        "store": {"images": store.num_images, "crops": store.num_crops, "build_s": round(store_s, 1)},
        "ms": {k: round(1000 * v, 2) for k, v in med.items()},
        "overhead_kd_live": round(med["kd_live"] / med["vanilla"], 3),
        "overhead_kd_cached": round(med["kd_cached"] / med["vanilla"], 3),
        "overhead_kd_cached_vs_vanilla_store": round(med["kd_cached"] / med["vanilla_store"], 3),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="fmnist")
    parser.add_argument("--limit", type=int, default=1024, help="images in the (partial) store")
    parser.add_argument("--crops", type=int, default=8, help="views per image in the store")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--teachers", default=None)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    result = measure(args.protocol, args.limit, args.crops, args.steps, args.rounds, args.teachers, args.data_root)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
