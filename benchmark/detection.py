"""Runs and teachers of detection protocols (`task: detection`): the runner's `run` and the teacher store's
`train_teacher` hand over to these when the protocol's task is detection.

A detection run resolves like any other (`runner.resolve`: the method's detection module from the
registry, the pair, the protocol hash), trains the student detector with the protocol's recipe, evaluates it
with COCOeval on the evaluation split after every epoch and writes one run record whose `metrics` are AP,
AP50, AP75, APs, APm, APl (percent; the reported number is the last epoch's AP) and `task: detection`.
Teachers are trained by the detection `vanilla` module with the protocol's teacher recipe and stored with
their AP in the sidecar.

Not supported yet on detection protocols (each a clear error): several devices, RESUME, the soft-label
store (TEACHER_CACHE, AUGMENT=store), methods with extra teachers.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..methods import FrozenTeacher, NonFiniteLossError, StageContext, get_method
from . import cost
from .checkpointing import RecordProgress
from .errors import BenchmarkError
from .results import check_writable, now_iso, save_record, set_aside, write_json_atomic
from .trainer import build_trainer, make_loggers
from .zoo import create_model

AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detection_metrics(row: dict[str, Any]) -> dict[str, float]:
    return {k: row[f"test/{k}"] for k in AP_METRICS if f"test/{k}" in row}


def _check_supported(request) -> None:
    problems = []
    if request.devices * request.num_nodes > 1:
        problems.append("several devices (DEVICES=1 NUM_NODES=1)")
    if request.resume:
        problems.append("RESUME")
    if request.teacher_cache or request.augment == "store" or request.crops is not None:
        problems.append("the soft-label store (TEACHER_CACHE, AUGMENT=store, CROPS)")
    if problems:
        raise BenchmarkError(f"detection protocols do not support {', '.join(problems)} yet")


def teacher_summary(info: dict[str, Any], model) -> dict[str, Any]:
    return {
        "arch": info["arch"],
        "checkpoint": info["checkpoint"],
        "checkpoint_sha256": info["sha256"],
        "top1": None,
        "AP": info.get("AP"),
        "params": cost.count_params(model),
        "flops": None,
    }


def run_detection(r, say=print) -> dict[str, Any]:
    """One seed of a detection protocol (`r`: `runner.ResolvedRun`); returns the record (also written)."""
    from .runner import _new_record, make_datamodule
    from .teachers import ensure_teacher

    request, protocol, pair, seed = r.request, r.protocol, r.pair, r.request.seed
    _check_supported(request)
    if r.extra_teachers:
        raise BenchmarkError("detection protocols do not support methods with extra teachers yet")
    check_writable(r.path, request.force)
    run_id = uuid.uuid4().hex[:12]
    datamodule = make_datamodule(protocol, seed=seed, data_root=request.data_root, pair=pair)
    datamodule.setup()
    num_classes = datamodule.num_classes
    teacher, summary = None, None
    if r.spec.needs_teacher:
        model, info = ensure_teacher(
            protocol,
            pair.teacher,
            data_fingerprint=datamodule.fingerprint(),
            root=request.teachers,
            accelerator=request.accelerator,
            progress=request.progress,
            data_root=request.data_root,
            say=say,
        )
        teacher, summary = FrozenTeacher(model, info=info), teacher_summary(info, model)
    L.seed_everything(seed, workers=True, verbose=False)
    student = create_model(pair.student, num_classes=num_classes, image_size=protocol.input.size)
    record = _new_record(r, run_id, summary, student)
    record.update(task="detection", eval_split="val2017")
    set_aside(r.path)
    r.run_dir.mkdir(parents=True, exist_ok=True)
    save_record(r.path, record)
    loggers = make_loggers(
        r.run_dir,
        run_id=run_id,
        group=f"{protocol.name}/{r.pair_label}",
        name=f"{request.method}-s{seed}",
        config={k: record[k] for k in ("method", "hparams", "protocol", "protocol_hash", "pair", "seed", "teacher")},
        tags=[protocol.name, request.method, pair.student],
        use_wandb=request.wandb,
    )
    start = time.perf_counter()
    trainer, history, throughput = build_trainer(
        r.run_dir,
        accelerator=request.accelerator,
        precision=request.precision,
        epochs=protocol.epochs,
        loggers=loggers,
        progress=request.progress,
        checkpoint=False,
        seed=seed,
        callbacks=[RecordProgress(r.path, record, lambda: time.perf_counter() - start)],
    )
    context = StageContext(
        method=request.method,
        hparams=r.hparams,
        datamodule=datamodule,
        teacher=teacher,
        teacher_info=summary or {},
        protocol=dataclasses.asdict(protocol),
        seed=seed,
        work_dir=r.run_dir,
        cache_dir=Path(summary["checkpoint"]).parent if summary else r.run_dir,
        student=student,
        student_arch=pair.student,
    )
    module = None
    module_cls, stages = r.spec.plan(r.hparams)
    recipe = protocol.student_recipe(pair)
    try:
        for stage in stages:
            say(f"stage {stage.name!r} of {request.method} …")
            stage_start = time.perf_counter()
            context.artifacts[stage.name] = stage.run(context)
            record.setdefault("stage_time_s", {})[stage.name] = round(time.perf_counter() - stage_start, 2)
        module = module_cls(
            student,
            teacher,
            num_classes=num_classes,
            hparams=r.hparams,
            optimizer=recipe["optimizer"],
            schedule=recipe["schedule"],
            epochs=protocol.epochs,
            artifacts=context.artifacts,
            coco_gt=datamodule.val_set.coco,
        )
        record["adapter_params"] = cost.count_params(module.adapter_parameters())
        trainer.fit(module, datamodule)
        record["status"] = "interrupted" if trainer.interrupted else "finished"
    except NonFiniteLossError as exc:
        record.update(status="failed", error={"type": "NonFiniteLossError", "message": str(exc), "step": exc.step})
        raise
    except BaseException as exc:
        interrupted = trainer.interrupted or isinstance(exc, KeyboardInterrupt | SIGTERMException)
        record.update(
            status="interrupted" if interrupted else "failed",
            error={"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(limit=8)},
        )
        raise
    finally:
        record["train_time_s"] = round(time.perf_counter() - start, 2)
        record["history"] = history.history
        record.update(throughput.summary())
        record["finished_at"] = now_iso()
        record["peak_mem_mb"] = cost.peak_memory_mb(trainer.strategy.root_device)
        if history.history:
            record["metrics"] = detection_metrics(history.history[-1])
            best = max(history.history, key=lambda row: row.get("test/AP", -1))
            record["best_epoch_metrics"] = {"epoch": best["epoch"], **detection_metrics(best)}
        if module is not None and module.is_reference_student:
            record["overhead_vs_student"] = 1.0
        save_record(r.path, record)
        say(f"record ({record['status']}) → {r.path}")
    return record


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


__all__ = ["AP_METRICS", "run_detection", "train_detection_teacher"]
