"""What detection protocols (`task: detection`) do differently in runs and teachers.

A detection run goes through the runner like any other (`runner.run`: the method's detection module from the
registry, its stages, the student detector built for the protocol's image size); the module evaluates with
COCOeval on the evaluation split after every epoch, so the record's `metrics` are AP, AP50, AP75, APs, APm,
APl (percent; the reported number is the last epoch's AP), with `task: detection`. Teachers are trained here
by the detection `vanilla` module with the protocol's teacher recipe and stored with their AP in the sidecar.

Not supported yet on detection protocols (each a clear error, `check_request`): several devices, RESUME and
the soft-label store (TEACHER_CACHE, AUGMENT=store).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L

from ..methods import get_method
from ..methods.detection import AP_METRICS
from .errors import BenchmarkError
from .results import write_json_atomic
from .trainer import build_trainer
from .zoo import create_model


def detection_metrics(row: dict[str, Any]) -> dict[str, float]:
    return {k: row[f"test/{k}"] for k in AP_METRICS if f"test/{k}" in row}


def check_request(request) -> None:
    """What detection runs do not support yet, refused before any work."""
    problems = []
    if request.devices * request.num_nodes > 1:
        problems.append("several devices (DEVICES=1 NUM_NODES=1)")
    if request.resume:
        problems.append("RESUME")
    if request.teacher_cache or request.augment == "store" or request.crops is not None:
        problems.append("the soft-label store (TEACHER_CACHE, AUGMENT=store, CROPS)")
    if problems:
        raise BenchmarkError(f"detection protocols do not support {', '.join(problems)} yet")


def train_detection_teacher(protocol, arch: str, *, root=None, accelerator="auto", progress=True, data_root=None):
    """Train detector `arch` on the protocol's training split with its teacher recipe (the detection `vanilla`
    module) and store it with its sidecar (AP on the evaluation split in percent; `top1` is None)."""
    from .runner import make_datamodule
    from .teachers import store_trained, teacher_paths

    ckpt, sidecar = teacher_paths(root, protocol, arch)
    recipe = protocol.teacher_recipe_for(arch)
    if recipe.source != "train":
        raise BenchmarkError(f"the teachers of {protocol.name!r} are imported, not trained")
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    datamodule = make_datamodule(protocol, seed=recipe.seed, data_root=data_root)
    datamodule.setup()
    fingerprint = datamodule.fingerprint()
    model = create_model(arch, num_classes=datamodule.num_classes, image_size=protocol.input.size)
    module = get_method("vanilla", task="detection").module_cls(
        model,
        num_classes=datamodule.num_classes,
        optimizer=recipe.optimizer,
        schedule=recipe.schedule,
        epochs=recipe.epochs,
        coco_gt=datamodule.val_set.coco,
    )
    trainer, history, _ = build_trainer(
        ckpt.parent / f"{arch}.logs",
        accelerator=accelerator,
        epochs=recipe.epochs,
        progress=progress,
        checkpoint=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    last = history.history[-1]
    info = store_trained(
        protocol,
        arch,
        model,
        ckpt,
        fingerprint=fingerprint,
        num_classes=datamodule.num_classes,
        metrics={"task": "detection", "top1": None, "top5": None, **detection_metrics(last)},
        epochs=recipe.epochs,
        seed=recipe.seed,
        train_time_s=time.perf_counter() - start,
    )
    write_json_atomic(sidecar, info)
    return info


__all__ = ["check_request", "train_detection_teacher"]
