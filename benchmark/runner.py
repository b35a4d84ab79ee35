"""Run one (method, protocol, pair, seed): resolve, build, fit, record.

The runner never names a method: it looks the method up in the registry, runs its pre-training
stages in order (each stage's artifact is handed to the next and to the module), fits the module
with the protocol's recipe and writes one run record (rank 0 only) whatever the outcome —
`finished`, `failed` (with the error and step) or `interrupted`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..datasets import create_datamodule, get_datamodule_class
from ..methods import FrozenTeacher, NonFiniteLossError, StageContext, get_method
from . import cost
from .checkpointing import RecordProgress, check_checkpoint_fits, find_resume_point, resume_checkpoint
from .ema import StudentEMA
from .errors import BenchmarkError
from .protocol import Protocol, load_protocol
from .results import (
    SCHEMA_VERSION,
    check_writable,
    git_commit,
    hardware,
    now_iso,
    record_path,
    save_record,
    set_aside,
    settle_stale,
    versions,
)
from .soft_labels import StoreDataModule, ensure_store
from .speed import compile_module, uses_channels_last
from .teachers import ensure_teacher
from .trainer import build_trainer, make_loggers, resolve_accelerator, uses_sync_batchnorm
from .zoo import UnknownModelError, create_model, is_model


@dataclass
class RunRequest:
    method: str
    protocol: Any  # a protocol name, a YAML path or a Protocol
    pair: str | None = None
    seed: int = 0
    devices: int = 1
    num_nodes: int = 1  # multi-node: must match torchrun --nnodes / SLURM --nodes
    accelerator: str = "auto"
    precision: str = "32-true"
    epochs: int | None = None
    teacher_epochs: int | None = None
    results: str = "results"
    teachers: str | None = None
    data_root: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None
    force: bool = False
    resume: bool = False
    checkpoint_every_n_steps: int | None = None
    wandb: bool = True
    progress: bool = True
    measure_overhead: bool = True
    teacher_cache: str | None = None  # "1": the run's soft-label store (made if missing); or a store path
    augment: str | None = None  # "store": the soft-label store's RandomResizedCrop, drawn live
    crops: int | None = None  # crops per image in the soft-label store (overrides the protocol's)
    compile: str | None = None  # a dynamo backend ("inductor"): torch.compile student and teacher (speed.py)
    #: pad-crop + flip on the training device after the batch transfer (same draws: results unchanged)
    augment_on_device: bool = False


@dataclass
class ResolvedRun:
    request: RunRequest
    protocol: Protocol
    spec: Any
    pair: Any
    hparams: dict[str, Any]
    variant: str
    pair_label: str
    path: Path
    #: {hyper-parameter: arch} of the method's extra teachers (`MethodSpec.teacher_hparams`)
    extra_teachers: dict[str, str] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.path.with_suffix("")

    @property
    def protocol_hash(self) -> str:
        """The run's protocol hash: the pair's, plus the extra teachers' identities when the method has any."""
        return self.protocol.hash(self.pair, self.extra_teachers)


def make_datamodule(
    protocol: Protocol, *, seed: int, data_root: str | None = None, pair=None, augment_on_device: bool = False
):
    """The protocol's data; with `pair`, trained with that pair's augmentation (its student recipe).

    `augment_on_device`: a padcrop augmentation runs on the training device (`ArrayDataModule`)."""
    val = protocol.dataset.val_size
    return create_datamodule(
        protocol.dataset.name,
        batch_size=protocol.batch_size,
        val_size=int(val) if val >= 1 else val,
        split_seed=protocol.dataset.split_seed,
        seed=seed,
        augment=protocol.student_recipe(pair)["augment"] if pair is not None else protocol.train_augment,
        mean=protocol.input.mean,
        std=protocol.input.std,
        num_workers=protocol.num_workers,
        root=data_root or os.environ.get("DATA_ROOT"),
        image_size=protocol.input.size,
        **({"augment_on_device": True} if augment_on_device else {}),
        **protocol.dataset.options,
    )


def available_devices(accelerator: str) -> int:
    if resolve_accelerator(accelerator) in ("gpu", "cuda"):
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def resolve(request: RunRequest) -> ResolvedRun:
    """Everything that can be checked before any work: fails fast with a specific message."""
    protocol = request.protocol if isinstance(request.protocol, Protocol) else load_protocol(request.protocol)
    spec = get_method(request.method, task=protocol.task)
    changes = dict(request.hparams)
    protocol = protocol.for_pair(protocol.pair_for(request.method, request.pair))  # the pair's own epochs / batch
    if request.epochs and request.epochs != protocol.epochs:
        protocol = protocol.with_epochs(request.epochs)
        changes["epochs"] = request.epochs
    if request.teacher_epochs:
        protocol = protocol.with_teacher_epochs(request.teacher_epochs)
        changes["teacher_epochs"] = request.teacher_epochs
    pair = protocol.pair_for(request.method, request.pair)
    protocol = _store_protocol(request, spec, protocol, changes)
    hparams = spec.resolve_hparams(
        protocol.methods.get(request.method), pair.methods.get(request.method), request.hparams
    )
    # anything that departs from the protocol's configuration gets its own results folder
    variant = (
        request.variant if request.variant is not None else ",".join(f"{k}={v}" for k, v in sorted(changes.items()))
    )
    if request.devices < 1:
        raise BenchmarkError(f"DEVICES must be ≥ 1, got {request.devices}")
    if request.num_nodes < 1:
        raise BenchmarkError(f"NUM_NODES must be ≥ 1, got {request.num_nodes}")
    if protocol.batch_size % (request.devices * request.num_nodes):
        raise BenchmarkError(
            f"the global batch {protocol.batch_size} of protocol {protocol.name!r} is not divisible by "
            f"{request.devices * request.num_nodes} devices; choose DEVICES × NUM_NODES dividing {protocol.batch_size}"
        )
    available = available_devices(request.accelerator)
    if request.devices > available:
        raise BenchmarkError(
            f"DEVICES={request.devices} but only {available} "
            f"{resolve_accelerator(request.accelerator)} device(s) are available"
        )
    get_datamodule_class(protocol.dataset.name)
    if protocol.task == "detection":
        from .detection import check_request

        check_request(request)
    extra_teachers = spec.extra_teachers(hparams) if spec.needs_teacher else {}
    roles = {"student": pair.student, **({"teacher": pair.teacher} if spec.needs_teacher else {})}
    roles.update({f"teacher {key!r}": arch for key, arch in extra_teachers.items()})
    for role, arch in roles.items():
        if not is_model(arch):
            try:
                create_model(arch)
            except UnknownModelError as exc:  # says what the zoo and timm hold, with close names
                raise UnknownModelError(f"pair {pair.name!r} of protocol {protocol.name!r}: {role} {exc}") from None
    if not spec.needs_teacher:  # one teacher-less run per student recipe, whichever pair asked for it
        pair = protocol.reference_pair(pair)
    pair_label = pair.name if spec.needs_teacher else f"none__{pair.student}"
    path = record_path(request.results, protocol.name, request.method, variant, pair_label, request.seed)
    protocol.recipe(pair, extra_teachers)  # an extra teacher of a kind without a recipe fails here
    return ResolvedRun(request, protocol, spec, pair, hparams, variant, pair_label, path, extra_teachers)


def uses_store(request: RunRequest, spec) -> bool:
    """Whether the run trains on the soft-label store's crops (FKD/FerKD stages or TEACHER_CACHE)."""
    return bool(request.teacher_cache) or any(stage.name == "soft_labels" for stage in spec.stages)


def _store_protocol(request: RunRequest, spec, protocol: Protocol, changes: dict[str, Any]) -> Protocol:
    if request.augment not in (None, "", "protocol", "store"):
        raise BenchmarkError(f"AUGMENT must be 'protocol' or 'store', got {request.augment!r}")
    store = uses_store(request, spec)
    if request.teacher_cache:
        if not spec.needs_teacher:
            raise BenchmarkError(f"TEACHER_CACHE needs a method with a teacher; {spec.name!r} has none")
        changes["teacher_cache"] = 1
    if request.augment == "store" and not store:
        changes["augment"] = "store"
    if request.crops is not None:
        changes["crops"] = request.crops
    if store or request.augment == "store" or request.crops is not None:
        return protocol.with_store_augment(request.crops)
    return protocol


def run(request: RunRequest, say=print) -> dict[str, Any]:
    """Run one seed and return its record (also written to disk on rank 0)."""
    r = resolve(request)
    # torchrun sets RANK/LOCAL_RANK, Lightning's own launcher LOCAL_RANK/NODE_RANK, srun SLURM_PROCID
    is_worker = any(os.environ.get(v, "0") != "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))
    prior, ckpt_path, ckpt_info = None, None, {}
    if is_worker:  # rank 0 has checked and set everything up before launching this process
        if request.resume and resume_checkpoint(r).is_file():
            ckpt_path = resume_checkpoint(r)
    else:
        if r.pair.name != r.protocol.pair(request.pair).name and not request.force:
            shared = settle_stale(r.path) if r.path.exists() else None
            if isinstance(shared, dict) and shared.get("status") == "finished":
                say(f"{request.method} has no teacher: pair {r.pair.name}'s record {r.path} serves this pair too")
                return shared
        existing = check_writable(r.path, request.force or request.resume)
        if request.resume and existing is not None and not request.force:
            if existing.get("status") == "finished":
                say(f"{r.path} is already finished: nothing to resume")
                return existing
            found = find_resume_point(r, existing)
            if found is not None:
                (ckpt_path, ckpt_info), prior = found, existing
        if prior is None and request.resume:
            say("no checkpoint to resume from: starting from scratch")
    protocol, pair, seed = r.protocol, r.pair, request.seed
    if is_worker:
        run_id = os.environ.get("DISTILLBENCH_RUN_ID") or uuid.uuid4().hex[:12]
    else:  # a resumed run keeps its id (and so its W&B run)
        run_id = prior["run_id"] if prior and prior.get("run_id") else uuid.uuid4().hex[:12]
    os.environ["DISTILLBENCH_RUN_ID"] = run_id  # DDP workers re-run this command: share the id

    datamodule = make_datamodule(
        protocol, seed=seed, data_root=request.data_root, pair=pair, augment_on_device=request.augment_on_device
    )
    datamodule.setup()  # a missing or corrupt dataset fails here, before anything is written
    num_classes = datamodule.num_classes
    teacher, teacher_info = _build_teacher(r, datamodule, say) if r.spec.needs_teacher else (None, None)
    extra = {key: _build_teacher(r, datamodule, say, arch) for key, arch in r.extra_teachers.items()}
    L.seed_everything(seed, workers=True, verbose=False)  # after any teacher training: same init either way
    student = build_model(protocol, pair.student, num_classes)
    record = _new_record(r, run_id, teacher_info, student)
    if extra:
        record["extra_teachers"] = {key: summary for key, (_, summary) in extra.items()}
    if prior is not None:
        record["started_at"] = prior.get("started_at", record["started_at"])
        point = {k: v for k, v in ckpt_info.items() if k != "shapes"}
        record["resumes"] = [*prior.get("resumes", []), {"at": now_iso(), "checkpoint": point}]
        say(f"resuming {r.path.name} (run {run_id}) from {ckpt_path}")
    previous_time = float((prior or {}).get("train_time_s") or 0.0)

    if not is_worker:
        if prior is None:  # only now that data and teacher loaded: a bad input leaves existing files alone
            set_aside(r.path)  # a failed, interrupted or forced-over run is kept beside the new one
        r.run_dir.mkdir(parents=True, exist_ok=True)
        save_record(r.path, record)  # `running`: a killed process leaves a record the next command settles
    r.run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        k: record[k]
        for k in (
            "method",
            "variant",
            "hparams",
            "protocol",
            "protocol_version",
            "protocol_hash",
            "pair",
            "seed",
            "teacher",
            "world_size",
            "precision",
        )
    }
    loggers = make_loggers(
        r.run_dir,
        run_id=run_id,
        group=f"{protocol.name}/{r.pair_label}",
        name=f"{request.method}-s{seed}",
        config={**config, "recipe": protocol.recipe(pair)},
        tags=[protocol.name, request.method, pair.student],
        use_wandb=request.wandb,
    )
    start = time.perf_counter()
    recipe = protocol.student_recipe(pair)
    trainer, history, throughput = build_trainer(
        r.run_dir,
        accelerator=request.accelerator,
        devices=request.devices,
        num_nodes=request.num_nodes,
        precision=request.precision,
        epochs=protocol.epochs,
        loggers=loggers,
        progress=request.progress,
        seed=seed,
        checkpoint_every_n_steps=request.checkpoint_every_n_steps,
        callbacks=[
            RecordProgress(r.path, record, lambda: previous_time + time.perf_counter() - start),
            *([StudentEMA(recipe["ema_decay"])] if recipe["ema_decay"] else []),
        ],
        gradient_clip_val=recipe["grad_clip"],
    )
    context = StageContext(
        method=request.method,
        hparams=r.hparams,
        datamodule=datamodule,
        teacher=teacher,
        teacher_info=teacher_info or {},
        protocol=dataclasses.asdict(protocol),
        seed=seed,
        work_dir=r.run_dir,
        cache_dir=Path(teacher_info["checkpoint"]).parent if teacher_info else r.run_dir,
        student=student,
        student_arch=pair.student,
        teachers={key: frozen for key, (frozen, _) in extra.items()},
    )
    if uses_store(request, r.spec):
        context.soft_labels = soft_label_source(context, r, teacher, say)
    input_shape = (protocol.input.channels, protocol.input.size, protocol.input.size)
    context.build_model = lambda name: build_model(protocol, name, num_classes)
    context.count_flops = lambda model: model_flops(protocol, model)
    context.make_trainer = stage_trainer_factory(request, seed)
    start = time.perf_counter()
    module = None
    module_cls, stages = r.spec.plan(r.hparams)
    try:
        for stage in stages:
            say(f"stage {stage.name!r} of {request.method} …")
            stage_start = time.perf_counter()
            context.artifacts[stage.name] = stage.run(context)
            if isinstance(context.artifacts[stage.name], dict) and "record" in context.artifacts[stage.name]:
                record.setdefault("stages", {})[stage.name] = context.artifacts[stage.name]["record"]
            record.setdefault("stage_time_s", {})[stage.name] = round(time.perf_counter() - stage_start, 2)
        if request.teacher_cache and "soft_labels" not in context.artifacts:
            context.artifacts["soft_labels"] = context.soft_labels(require_logits=True)
        if context.datamodule is not datamodule:  # trained from the soft-label store
            datamodule = context.datamodule
            record.update(teacher_source="store", soft_labels=datamodule.summary())
        if context.student is not student:  # a search stage chose the student
            student = context.student
            record["student"] = {"arch": context.student_arch, "params": cost.count_params(student)}
        module = build_module(r, student, teacher, num_classes, context.artifacts, module_cls)
        record["adapter_params"] = cost.count_params(module.adapter_parameters())
        record["adapter_flops"] = cost.count_adapter_flops(module, input_shape)
        speed_up(module, request)
        if request.compile:
            record["compile"] = request.compile
        if getattr(datamodule, "augment_on_device", False):
            record["augment_on_device"] = True
        if ckpt_info:
            check_checkpoint_fits(ckpt_path, ckpt_info["shapes"], module)
        trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)
        record["status"] = "interrupted" if trainer.interrupted else "finished"
    except NonFiniteLossError as exc:
        record.update(
            status="failed",
            error={"type": "NonFiniteLossError", "message": str(exc), "step": exc.step, "epoch": exc.epoch},
        )
        raise
    except BaseException as exc:
        # Lightning turns Ctrl-C into a graceful shutdown followed by SystemExit; the trainer knows
        interrupted = trainer.interrupted or isinstance(exc, KeyboardInterrupt | SIGTERMException)
        record.update(
            status="interrupted" if interrupted else "failed",
            error={"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(limit=8)},
        )
        raise
    finally:
        record["train_time_s"] = round(previous_time + time.perf_counter() - start, 2)
        try:
            _finish_record(record, trainer, history, throughput, module, datamodule, student, loggers, request, r, say)
        except Exception as exc:  # never lose the record over a cost measurement
            record.setdefault("warnings", []).append(f"finishing the record failed: {type(exc).__name__}: {exc}")
            if trainer.is_global_zero:
                save_record(r.path, record)
    return record


def stage_trainer_factory(request: RunRequest, seed: int):
    """`context.make_trainer(run_dir, epochs)` for stages that train (e.g. a MIM distillation stage): the run's
    accelerator, precision and per-epoch RNG, a CSV log under `run_dir`, no checkpoints, no evaluation."""

    def make(run_dir, epochs: int):
        trainer, history, _ = build_trainer(
            Path(run_dir),
            accelerator=request.accelerator,
            devices=request.devices,
            num_nodes=request.num_nodes,
            precision=request.precision,
            epochs=epochs,
            progress=request.progress,
            checkpoint=False,
            seed=seed,
        )
        trainer.epoch_history = history
        trainer.limit_val_batches = 0  # a pre-training stage has no classifier to evaluate yet
        return trainer

    return make


def soft_label_source(context: StageContext, r: ResolvedRun, teacher: FrozenTeacher, say):
    """`context.soft_labels(...)`: open or make the run's store and train from it (ferkd.md §1)."""

    def prepare(*, crops_per_image: int = 1, recover_mode: str = "marginal_smoothing", require_logits=False):
        request = r.request
        base = context.datamodule
        base.setup()
        store = ensure_store(
            r.protocol,
            teacher.model,
            teacher.info,
            r.pair.teacher,
            base.train_set,
            context.cache_dir,
            path=None if str(request.teacher_cache) in ("", "1", "None") else request.teacher_cache,
            device="cuda" if resolve_accelerator(request.accelerator) in ("gpu", "cuda") else "cpu",
            progress=request.progress,
            say=say,
        )
        if require_logits and not store.has_logits:
            raise BenchmarkError(
                f"the soft-label store {store.path} has no logits (store_logits: false): cached KD needs them"
            )
        context.datamodule = StoreDataModule(
            base,
            store,
            epochs=r.protocol.epochs,
            seed=request.seed,
            crops_per_image=crops_per_image,
            recover_mode=recover_mode,
        )
        return context.datamodule

    return prepare


def speed_up(module, request: RunRequest, device=None) -> None:
    """The fast path (speed.py): a channels-last conv teacher on CUDA, torch.compile with `compile`."""
    if device is None:
        device = "cuda" if resolve_accelerator(request.accelerator) in ("gpu", "cuda") else "cpu"
    if module.teacher is not None and uses_channels_last(device):
        module.teacher.to_channels_last()
    if request.compile:
        compile_module(module, request.compile)


def build_module(
    r: ResolvedRun, student, teacher: FrozenTeacher | None, num_classes: int, artifacts: dict, module_cls=None
):
    """The method's LightningModule for a resolved run (shared by `run` and the cost benchmark).

    `module_cls` defaults to the class the method's spec plans for these hparams (an extension such as
    ND may wrap the method's own class).
    """
    if module_cls is None:
        module_cls, _ = r.spec.plan(r.hparams)
    recipe = r.protocol.student_recipe(r.pair)
    return module_cls(
        student,
        teacher,
        num_classes=num_classes,
        hparams=r.hparams,
        optimizer=recipe["optimizer"],
        schedule=recipe["schedule"],
        epochs=r.protocol.epochs,
        label_smoothing=r.protocol.label_smoothing,
        artifacts=artifacts,
        mixup={**recipe["mixup"], "seed": r.request.seed} if recipe["mixup"] else None,
    )


def _build_teacher(r: ResolvedRun, datamodule, say, arch: str | None = None) -> tuple[FrozenTeacher, dict[str, Any]]:
    """The pair's teacher (or the teacher `arch`, an extra teacher of the method), frozen, with its summary."""
    request, protocol = r.request, r.protocol
    arch = arch or r.pair.teacher
    model, info = ensure_teacher(
        protocol,
        arch,
        data_fingerprint=datamodule.fingerprint(),
        root=request.teachers,
        accelerator=request.accelerator,
        progress=request.progress,
        data_root=request.data_root,
        say=say,
    )
    teacher = FrozenTeacher(
        model,
        info=info,
        input_stats=(protocol.input.mean, protocol.input.std),
        teacher_stats=(info["input"]["mean"], info["input"]["std"]),
    )
    summary = {
        "arch": arch,
        "checkpoint": info["checkpoint"],
        "checkpoint_sha256": info["sha256"],
        "top1": info.get("top1"),
        "top5": info.get("top5"),
        "params": cost.count_params(model),
        "flops": model_flops(protocol, model),
    }
    if protocol.task == "detection":
        summary["AP"] = info.get("AP")
    return teacher, summary


def build_model(protocol: Protocol, arch: str, num_classes: int):
    """A student (or stage) model of the protocol's task: a classifier on the input's channels, or a
    detector for the input's image size."""
    if protocol.task == "detection":
        return create_model(arch, num_classes=num_classes, image_size=protocol.input.size)
    return create_model(arch, num_classes=num_classes, in_chans=protocol.input.channels)


def model_flops(protocol: Protocol, model) -> int | None:
    """fvcore FLOPs of `model` for one image of the protocol's input."""
    shape = (protocol.input.channels, protocol.input.size, protocol.input.size)
    return cost.count_flops(model, shape, detector=protocol.task == "detection")


def _new_record(r: ResolvedRun, run_id: str, teacher_info: dict | None, student) -> dict[str, Any]:
    request, protocol, pair = r.request, r.protocol, r.pair
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "status": "running",
        "method": request.method,
        "variant": r.variant,
        "hparams": r.hparams,
        "protocol": protocol.name,
        "protocol_version": protocol.version,
        "protocol_hash": r.protocol_hash,
        "reference_hash": protocol.hash(protocol.reference_pair(pair)),  # the hash of this student's vanilla
        "protocol_source": protocol.source,
        "pair": r.pair_label,
        "teacher": teacher_info,
        "student": {"arch": pair.student, "params": cost.count_params(student)},
        "seed": request.seed,
        "metrics": {},
        "best_epoch_metrics": {},
        "val_selected_metrics": {},
        "history": [],
        "epochs": protocol.epochs,
        "world_size": request.devices * request.num_nodes,
        "sync_batchnorm": uses_sync_batchnorm(request.accelerator, request.devices * request.num_nodes),
        "precision": request.precision,
        "optimizer": protocol.optimizer_for(pair),
        "schedule": protocol.student_recipe(pair)["schedule"],
        **_recipe_extras(protocol.student_recipe(pair)),
        "train_time_s": None,
        "throughput_img_s": None,
        "overhead_vs_student": None,
        "peak_mem_mb": None,
        "git_commit": git_commit(),
        "versions": versions(),
        "hardware": hardware(resolve_accelerator(request.accelerator)),
        "wandb_run": None,
        "teacher_source": "live" if teacher_info else None,
        "started_at": now_iso(),
        "finished_at": None,
        "pid": os.getpid(),
        "host": platform.node(),
        "error": None,
        **({"task": "detection", "eval_split": "val2017"} if protocol.task == "detection" else {}),
    }


def _recipe_extras(recipe: dict[str, Any]) -> dict[str, Any]:
    """Record fields for the student-recipe parts a run uses (absent otherwise, as in older records)."""
    extras = {k: recipe[k] for k in ("mixup", "grad_clip") if recipe[k]}
    if recipe["ema_decay"]:
        extras["ema"] = StudentEMA.describe(recipe["ema_decay"])
    if recipe["augment"].get("auto_augment") or recipe["augment"].get("re_prob"):
        extras["augment"] = recipe["augment"]
    return extras


def _finish_record(
    record,
    trainer,
    history,
    throughput,
    module,
    datamodule,
    student,
    loggers,
    request: RunRequest,
    r: ResolvedRun,
    say,
) -> None:
    if not trainer.is_global_zero:
        return
    record["history"] = history.history
    record.update(throughput.summary())
    record["finished_at"] = now_iso()
    record["peak_mem_mb"] = cost.peak_memory_mb(trainer.strategy.root_device)
    rows = history.history
    if rows:
        primary = "AP" if r.protocol.task == "detection" else "top1"
        record["metrics"] = _split_metrics(rows[-1], "test")
        record["val_metrics"] = _split_metrics(rows[-1], "val")
        best = max(rows, key=lambda row: row.get(f"test/{primary}", -1))
        record["best_epoch_metrics"] = {"epoch": best["epoch"], **_split_metrics(best, "test")}
        if any(f"val/{primary}" in row for row in rows):  # detection evaluates val2017 alone: no selection
            chosen = max(rows, key=lambda row: row.get(f"val/{primary}", -1))
            record["val_selected_metrics"] = {"epoch": chosen["epoch"], **_split_metrics(chosen, "test")}
    if record["status"] == "finished":
        deployed = module.deployed_model() if module is not None else student
        if deployed is not student:  # e.g. KD³'s student runs through a projector and the teacher's classifier
            record["student"].update(params=cost.count_params(deployed), deployed=type(deployed).__name__)
        record["student"]["flops"] = model_flops(r.protocol, deployed)
        if module is not None and module.is_reference_student:
            record["overhead_vs_student"] = 1.0
        elif request.measure_overhead and module is not None:
            batch = move_data_to_device(next(iter(datamodule.train_dataloader())), trainer.strategy.root_device)
            record.update(cost.overhead_ratio(module, batch))
    wandb_logger = next((lg for lg in loggers if type(lg).__name__ == "WandbLogger"), None)
    if wandb_logger is not None:
        record["wandb_run"] = _finish_wandb(wandb_logger, record)
    save_record(r.path, record)
    say(f"record ({record['status']}) → {r.path}")


def _split_metrics(row: dict[str, Any], split: str) -> dict[str, float]:
    return {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith(f"{split}/") and "loss" not in k}


def _finish_wandb(logger, record: dict[str, Any]) -> dict[str, Any] | None:
    try:
        import wandb

        run = logger.experiment
        summary = {f"final/{k}": v for k, v in record["metrics"].items()}
        summary.update({f"best/{k}": v for k, v in record["best_epoch_metrics"].items()})
        for key in ("status", "throughput_img_s", "overhead_vs_student", "peak_mem_mb", "train_time_s"):
            summary[key] = record.get(key)
        summary.update({f"val_selected/{k}": v for k, v in record.get("val_selected_metrics", {}).items()})
        summary["student_params"] = record["student"]["params"]
        summary["student_flops"] = record["student"].get("flops")
        summary["adapter_params"] = record.get("adapter_params")
        summary["teacher_flops"] = (record.get("teacher") or {}).get("flops")
        run.summary.update(summary)
        info = {
            "id": run.id,
            "project": run.project,
            "group": run.group,
            "name": run.name,
            "mode": wandb.run.settings.mode if wandb.run else None,
            "dir": str(run.dir),
        }
        wandb.finish(exit_code=0 if record["status"] == "finished" else 1)
        return info
    except Exception as exc:  # logging must never cost us the record
        return {"error": f"{type(exc).__name__}: {exc}"}
