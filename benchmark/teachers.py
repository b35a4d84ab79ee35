"""The teacher store: teachers trained (or imported) under a protocol, with a JSON sidecar.

Layout: `<teachers>/<protocol>/<arch>.pt` (a plain state_dict, loaded with weights_only=True) and
`<arch>.json` (sha256 of the checkpoint, measured test top-1/top-5, the protocol's teacher key,
provenance). A checkpoint whose sha256 differs from its sidecar, or whose sidecar was made under a
different teacher recipe, is refused. The store lives in `$DISTILLBENCH_TEACHERS` (default
`./teachers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..methods.mae import subset_train_split
from ..methods.vanilla import Vanilla
from .checkpointing import torch_save_atomic
from .errors import CheckpointProblem
from .protocol import Protocol
from .results import git_commit, now_iso, write_json_atomic
from .teacher_kinds import PARENT_KIND, build_kind_module, kind_recipe, parent_arch, split_kind, teacher_epochs
from .zoo import create_model

SIDECAR_SCHEMA = 1


class TeacherError(CheckpointProblem):
    pass


def teachers_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get("DISTILLBENCH_TEACHERS") or "teachers")


def teacher_paths(root: str | Path | None, protocol: Protocol, arch: str) -> tuple[Path, Path]:
    folder = teachers_root(root) / protocol.name
    return folder / f"{arch}.pt", folder / f"{arch}.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint_atomic(state_dict: dict[str, torch.Tensor], path: Path) -> str:
    """Save atomically (`checkpointing.torch_save_atomic`); returns the sha256 of the bytes written."""
    torch_save_atomic(state_dict, path)
    return sha256_file(path)


def load_state_dict_checked(path: Path, model: torch.nn.Module, arch: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TeacherError(
            f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc}); "
            "delete it and retrain with `make teachers`"
        ) from None
    if not isinstance(state, dict):
        raise TeacherError(f"{path}: expected a state_dict, found {type(state).__name__}")
    missing, unexpected = _key_mismatch(model.state_dict(), state)
    if missing or unexpected:
        raise TeacherError(
            f"{path} does not fit architecture {arch!r}: {len(missing)} missing key(s) "
            f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise TeacherError(f"{path} does not fit architecture {arch!r}: {first[0].strip()}") from None


def _key_mismatch(expected: dict, found: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(found)), sorted(set(found) - set(expected))


def _import_hint(protocol: Protocol, arch: str, ckpt: Path) -> str:
    return (
        f"no teacher {arch!r} for protocol {protocol.name!r} at {ckpt}: this protocol's teachers are imported, "
        f"not trained — `python -m distillbench.benchmark teachers import --protocol {protocol.name} --arch {arch} "
        "--checkpoint FILE_OR_TIMM_TAG [--format mdistiller|state_dict|timm]`"
    )


def load_teacher(
    protocol: Protocol, arch: str, root: str | Path | None = None, *, data_fingerprint: str
) -> tuple[torch.nn.Module, dict]:
    """Load a stored teacher after checking its sidecar, sha256, training data and recipe."""
    ckpt, sidecar = teacher_paths(root, protocol, arch)
    if not ckpt.is_file() or not sidecar.is_file():
        raise TeacherError(
            f"no teacher {arch!r} for protocol {protocol.name!r} at {ckpt} (+ {sidecar.name}); "
            f"train it with `make teachers PROTOCOL={protocol.name}`"
        )
    try:
        info = json.loads(sidecar.read_text())
    except ValueError as exc:
        raise TeacherError(f"{sidecar}: malformed sidecar JSON ({exc})") from None
    actual = sha256_file(ckpt)
    if actual != info.get("sha256"):
        raise TeacherError(
            f"{ckpt}: sha256 {actual[:12]}… does not match its sidecar ({str(info.get('sha256'))[:12]}…); the "
            f"checkpoint was changed or corrupted — retrain with `make teachers PROTOCOL={protocol.name} FORCE=1`"
        )
    if info.get("data_fingerprint") != data_fingerprint:
        raise TeacherError(
            f"{ckpt} was trained on other data (fingerprint {info.get('data_fingerprint')} ≠ {data_fingerprint}: "
            f"another DATA_ROOT or a generated tree?); use another teacher store (DISTILLBENCH_TEACHERS) or "
            f"retrain with `make teachers PROTOCOL={protocol.name} FORCE=1`"
        )
    if info.get("teacher_key") != protocol.teacher_key(arch, data_fingerprint):
        raise TeacherError(
            f"{ckpt} was trained under a different teacher recipe of {protocol.name!r}; retrain with "
            f"`make teachers PROTOCOL={protocol.name} FORCE=1`"
        )
    size = {"image_size": protocol.input.size} if protocol.task == "detection" else {}
    model = create_model(arch, num_classes=info["num_classes"], in_chans=protocol.input.channels, **size)
    load_state_dict_checked(ckpt, model, arch)
    info["checkpoint"] = str(ckpt)
    return model.eval(), info


def sidecar_identity(
    protocol: Protocol, arch: str, fingerprint: str, num_classes: int, channels: int
) -> dict[str, Any]:
    """The sidecar keys that say which teacher a checkpoint is (trained or imported): schema, arch, protocol,
    teacher key, data fingerprint, classes and the input it expects."""
    return {
        "schema_version": SIDECAR_SCHEMA,
        "arch": arch,
        "protocol": protocol.name,
        "protocol_version": protocol.version,
        "teacher_key": protocol.teacher_key(arch, fingerprint),
        "data_fingerprint": fingerprint,
        "num_classes": num_classes,
        "input": {
            "size": protocol.input.size,
            "channels": channels,
            "mean": list(protocol.input.mean),
            "std": list(protocol.input.std),
        },
    }


def store_trained(
    protocol: Protocol,
    arch: str,
    model: torch.nn.Module,
    ckpt: Path,
    *,
    fingerprint: str,
    num_classes: int,
    metrics: dict[str, Any],
    epochs: int,
    seed: int,
    train_time_s: float,
) -> dict[str, Any]:
    """Save a freshly trained teacher's weights (atomically) and return its sidecar, for the caller to extend
    and write: identity (teacher key, data fingerprint, input), sha256, `metrics`, provenance."""
    digest = save_checkpoint_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, ckpt)
    return {
        **sidecar_identity(protocol, arch, fingerprint, num_classes, protocol.input.channels),
        "sha256": digest,
        **metrics,
        "epochs": epochs,
        "seed": seed,
        "source": "trained",
        "train_time_s": round(train_time_s, 1),
        "trained_at": now_iso(),
        "git_commit": git_commit(),
    }


def train_teacher(
    protocol: Protocol,
    arch: str,
    *,
    root: str | Path | None = None,
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    progress: bool = True,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Train `arch` on the protocol's training split with its teacher recipe and store it."""
    from .runner import make_datamodule  # the runner builds data the same way for every run
    from .trainer import build_trainer

    ckpt, sidecar = teacher_paths(root, protocol, arch)
    recipe = protocol.teacher_recipe_for(arch)
    if recipe.source != "train":
        raise TeacherError(_import_hint(protocol, arch, ckpt))
    if protocol.task == "detection":  # detectors train with their own loop and metrics
        from .detection import train_detection_teacher

        return train_detection_teacher(
            protocol, arch, root=root, accelerator=accelerator, progress=progress, data_root=data_root
        )
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    datamodule = make_datamodule(protocol, seed=recipe.seed, data_root=data_root)
    fingerprint = datamodule.fingerprint()
    kind = kind_recipe(protocol, arch)
    epochs = int(kind["epochs"]) if kind else recipe.epochs
    parent = None
    if split_kind(arch)[1] in PARENT_KIND:  # e.g. `.ft` fine-tunes the stored `.mae` teacher (trained first if missing)
        _, parent = ensure_teacher(
            protocol,
            parent_arch(arch),
            data_fingerprint=fingerprint,
            root=root,
            accelerator=accelerator,
            progress=progress,
            data_root=data_root,
        )
    if kind is not None:  # a MIM teacher kind (benchmark.teacher_kinds): its own recipe, seed and data subset
        L.seed_everything(int(kind.get("seed", recipe.seed)), workers=True, verbose=False)
        if int(kind.get("train_subset") or 0) > 0:
            subset_train_split(datamodule, int(kind["train_subset"]))
    model = create_model(arch, num_classes=datamodule.num_classes, in_chans=protocol.input.channels)
    if kind is not None:
        module = build_kind_module(
            arch,
            kind,
            model,
            num_classes=datamodule.num_classes,
            label_smoothing=protocol.label_smoothing,
            init_checkpoint=parent["checkpoint"] if parent else "",
        )
    else:
        module = Vanilla(
            model,
            num_classes=datamodule.num_classes,
            optimizer=recipe.optimizer,
            schedule=recipe.schedule,
            epochs=recipe.epochs,
            label_smoothing=protocol.label_smoothing,
        )
    log_dir = ckpt.parent / f"{arch}.logs"
    trainer, history, _ = build_trainer(
        log_dir,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        epochs=epochs,
        progress=progress,
        checkpoint=False,
    )
    if split_kind(arch)[1] == "mae":
        trainer.limit_val_batches = 0  # no classifier is trained: nothing to evaluate
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    if not trainer.is_global_zero:
        return {}
    last = history.history[-1]
    mae = split_kind(arch)[1] == "mae"  # an MAE-pretrained teacher has no trained classifier: no accuracy
    info = store_trained(
        protocol,
        arch,
        model,
        ckpt,
        fingerprint=fingerprint,
        num_classes=datamodule.num_classes,
        metrics={
            "top1": None if mae else last.get("test/top1"),
            "top5": None if mae else last.get("test/top5"),
            "val_top1": None if mae else last.get("val/top1"),
        },
        epochs=epochs,
        seed=int(kind.get("seed", recipe.seed)) if kind else recipe.seed,
        train_time_s=time.perf_counter() - start,
    )
    if kind is not None:
        info.update(kind=split_kind(arch)[1], has_decoder=True, final_train_loss=last.get("train/loss"))
        info["train_images"] = len(datamodule.train_set)
    if parent is not None:
        info["from"] = {"arch": parent["arch"], "sha256": parent["sha256"], "teacher_key": parent["teacher_key"]}
    write_json_atomic(sidecar, info)
    return info


def ensure_teacher(
    protocol: Protocol,
    arch: str,
    *,
    data_fingerprint: str,
    root=None,
    accelerator="auto",
    progress=True,
    data_root=None,
    say=print,
) -> tuple[torch.nn.Module, dict]:
    """Load the stored teacher, training it first (and saying so) when none is stored."""
    ckpt, sidecar = teacher_paths(root, protocol, arch)
    if not ckpt.exists() and not sidecar.exists() and protocol.teacher.source != "train":
        raise TeacherError(_import_hint(protocol, arch, ckpt))
    if not ckpt.exists() and not sidecar.exists():
        if any(os.environ.get(v, "0") != "0" for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID")):
            raise TeacherError(f"teacher {arch!r} missing on a DDP worker; run `make teachers` first")
        say(
            f"teacher {arch!r} for protocol {protocol.name!r} is not stored yet: training it first "
            f"({teacher_epochs(protocol, arch)} epochs) → {ckpt}"
        )
        train_teacher(protocol, arch, root=root, accelerator=accelerator, progress=progress, data_root=data_root)
    return load_teacher(protocol, arch, root, data_fingerprint=data_fingerprint)
