"""`python -m distillbench.benchmark cost`: where a method's training step spends its time.

The method's module is built as a run builds it (registry, the protocol's hyper-parameters, the stored
teacher, its pre-training stages), then `steps` real training steps on the protocol's training loader
are timed after `warmup` untimed ones and each is split into:

- data: the next batch from the loader, moved to the device;
- teacher forward: time inside the frozen teacher's calls (`FrozenTeacher.run`, which `logits` and
  `embedding_and_logits` go through);
- student forward + backward: the rest of `losses` plus the backward pass (student, adapters, loss terms);
- optimizer: the protocol's optimizer step and zero_grad.

The overhead ratio is then measured as in a run (`cost.overhead_ratio`). Nothing is recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..methods import StageContext
from ..methods.optim import build_optimizer
from . import cost
from .runner import (
    RunRequest,
    _build_teacher,
    build_module,
    make_datamodule,
    resolve,
    soft_label_source,
    speed_up,
    uses_store,
)
from .speed import autocast
from .trainer import resolve_accelerator
from .zoo import create_model

PARTS = ("data", "teacher_forward", "student_forward_backward", "optimizer")


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _timed_teacher(teacher, clock: _Clock, spent: list[float]) -> None:
    """Shadow `teacher.run` on the instance so every teacher call adds its duration to `spent[0]`."""
    inner = teacher.run

    def run(fn, x):
        start = clock()
        out = inner(fn, x)
        spent[0] += clock() - start
        return out

    teacher.run = run


def step_split(
    module, loader, device: torch.device, *, steps: int = 20, warmup: int = 3, precision: str = "32-true"
) -> dict[str, float]:
    """Mean milliseconds per training step for each part of `PARTS`, plus the total and img/s; the forward
    passes run under `precision`'s autocast, as in a Trainer."""
    clock = _Clock(device)
    teacher_time = [0.0]
    if module.teacher is not None:
        _timed_teacher(module.teacher, clock, teacher_time)
    optimizer = build_optimizer(module, module.optimizer_spec)
    module.train()
    module.log = lambda *args, **kwargs: None  # outside a Trainer loop Lightning refuses self.log
    totals = dict.fromkeys(PARTS, 0.0)
    images = 0
    batches = iter(loader)
    for i in range(warmup + steps):
        t0 = clock()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        t1 = clock()
        teacher_time[0] = 0.0
        with autocast(precision, device):
            loss = sum(t.float() for t in module.losses(batch).values())
        loss.backward()
        t2 = clock()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = clock()
        if i >= warmup:
            totals["data"] += t1 - t0
            totals["teacher_forward"] += teacher_time[0]
            totals["student_forward_backward"] += t2 - t1 - teacher_time[0]
            totals["optimizer"] += t3 - t2
            images += int(batch["image"].shape[0])
    del module.log
    if module.teacher is not None:
        del module.teacher.run  # back to the class's method
    out = {f"{k}_ms": round(1000 * v / steps, 3) for k, v in totals.items()}
    total = sum(totals.values())
    out["step_ms"] = round(1000 * total / steps, 3)
    out["throughput_img_s"] = round(images / total, 1)
    return out


@contextlib.contextmanager
def timed_module(request: RunRequest, *, say=print, device: torch.device | None = None):
    """Build the module of `request` as a run builds it (registry, the protocol's hyper-parameters, the stored
    teacher, its pre-training stages, `speed_up`) on `device`; yields (module, datamodule, resolved run,
    teacher). Stage work files live in a temporary folder, removed on exit."""
    r = resolve(request)
    protocol = r.protocol
    if device is None:
        device = torch.device("cuda" if resolve_accelerator(request.accelerator) in ("gpu", "cuda") else "cpu")
    datamodule = make_datamodule(protocol, seed=request.seed, data_root=request.data_root, pair=r.pair)
    teacher, teacher_info = _build_teacher(r, datamodule, say) if r.spec.needs_teacher else (None, None)
    torch.manual_seed(request.seed)
    num_classes = datamodule.num_classes
    student = create_model(r.pair.student, num_classes=num_classes, in_chans=protocol.input.channels)
    input_shape = (protocol.input.channels, protocol.input.size, protocol.input.size)
    with tempfile.TemporaryDirectory(prefix="distillbench-cost-") as work:
        context = StageContext(
            method=request.method,
            hparams=r.hparams,
            datamodule=datamodule,
            teacher=teacher,
            teacher_info=teacher_info or {},
            protocol=dataclasses.asdict(protocol),
            seed=request.seed,
            work_dir=Path(work),
            cache_dir=Path(teacher_info["checkpoint"]).parent if teacher_info else Path(work),
            student=student,
            student_arch=r.pair.student,
            teachers={key: _build_teacher(r, datamodule, say, arch)[0] for key, arch in r.extra_teachers.items()},
        )
        if uses_store(request, r.spec):
            context.soft_labels = soft_label_source(context, r, teacher, say)
        context.build_model = lambda name: create_model(name, num_classes=num_classes, in_chans=protocol.input.channels)
        context.count_flops = lambda model: cost.count_flops(model, input_shape)
        for stage in r.spec.stages:
            say(f"stage {stage.name!r} of {request.method} …")
            context.artifacts[stage.name] = stage.run(context)
        if request.teacher_cache and "soft_labels" not in context.artifacts:
            context.artifacts["soft_labels"] = context.soft_labels(require_logits=True)
        datamodule, student = context.datamodule, context.student  # a stage may replace either
        module = build_module(r, student, teacher, num_classes, context.artifacts).to(device)
        speed_up(module, request, device)
        yield module, datamodule, r, teacher


def measure(
    request: RunRequest, *, steps: int = 20, warmup: int = 3, say=print, precision: str | None = None
) -> dict[str, Any]:
    """Build the module of `request` (`timed_module`) and time its training steps."""
    with timed_module(request, say=say) as (module, datamodule, r, teacher):
        protocol, student = r.protocol, module.student
        device = next(student.parameters()).device
        input_shape = (protocol.input.channels, protocol.input.size, protocol.input.size)
        precision = precision or request.precision
        result: dict[str, Any] = {
            "method": request.method,
            "protocol": protocol.name,
            "pair": r.pair_label,
            "device": str(device),
            "precision": precision,
            "compile": request.compile,
            "batch_size": protocol.batch_size,
            "student_params": cost.count_params(student),
            "student_flops": cost.count_flops(student, input_shape),
            "adapter_params": cost.count_params(module.adapter_parameters()),
            "adapter_flops": cost.count_adapter_flops(module, input_shape),
        }
        if teacher is not None:
            result["teacher_flops"] = cost.count_flops(teacher.model, input_shape)
        with contextlib.redirect_stdout(sys.stderr):
            loader = datamodule.train_dataloader()
            result.update(step_split(module, loader, device, steps=steps, warmup=warmup, precision=precision))
            if not module.is_reference_student:
                batch = {k: v.to(device) for k, v in next(iter(loader)).items()}
                result.update(cost.overhead_ratio(module, batch))
            else:
                result["overhead_vs_student"] = 1.0
        if device.type == "cuda":
            result["peak_mem_mb"] = cost.peak_memory_mb(device)
    return result
