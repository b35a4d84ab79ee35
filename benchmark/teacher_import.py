"""Adopt an existing teacher checkpoint into the teacher store, with the accuracy we measure ourselves.

    python -m distillbench.benchmark teachers import --protocol cifar100 --arch resnet32x4 \
        --checkpoint ckpt_epoch_240.pth [--format auto|mdistiller|state_dict|timm]

Formats:
- `mdistiller`: the CRD/RepDistiller/mdistiller CIFAR teachers, a dict holding the weights under
  `model` (RepDistiller's `{'epoch', 'model', 'best_acc', 'optimizer'}`) or `net`; the reference module
  names differ from the zoo's, so the weights are matched by layer order and shape (`zoo.adopt_state_dict`);
- `state_dict`: a plain {name: tensor} mapping (a `module.` prefix from DataParallel is removed);
- `timm`: `--checkpoint` is a pinned timm pretrained tag such as `resnet34.tv_in1k`, fetched by timm
  (online only) — for protocols whose teachers are ImageNet-pretrained;
- `auto` (default): `mdistiller` when the file holds `model`/`net`/`state_dict`, else `state_dict`.

Files are read with `torch.load(weights_only=True)`. The weights must load strictly into the named
architecture (missing and unexpected keys are listed); the model is then evaluated on the protocol's
test split, and the store gets a plain state_dict plus a sidecar with its sha256, the original file's
sha256 and format, the measured top-1/top-5 and the protocol's teacher key. Tables show this measured
accuracy, never a claimed one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .protocol import Protocol
from .results import git_commit, now_iso, write_json_atomic
from .teacher_kinds import adopt_mae_checkpoint, split_kind
from .teachers import TeacherError, save_checkpoint_atomic, sha256_file, sidecar_identity, teacher_paths
from .trainer import resolve_accelerator
from .zoo import StateDictMismatchError, adopt_state_dict, create_model

FORMATS = ("auto", "mdistiller", "state_dict", "timm", "mae")
WRAPPER_KEYS = ("model", "net", "state_dict")


def read_checkpoint(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint file of format `mdistiller`, `state_dict` or `auto`."""
    if not path.is_file():
        raise TeacherError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TeacherError(
            f"{path}: not a loadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it is truncated, corrupt, or pickles objects other than tensors (only weights_only files are read)"
        ) from None
    if not isinstance(data, dict):
        raise TeacherError(f"{path}: expected a dict, found {type(data).__name__}")
    wrapper = next((k for k in WRAPPER_KEYS if isinstance(data.get(k), dict)), None)
    if fmt == "mdistiller" and wrapper is None:
        raise TeacherError(
            f"{path}: an mdistiller/RepDistiller checkpoint holds its weights under 'model' or 'net'; "
            f"found keys {sorted(map(str, data))[:8]} — use --format state_dict for a plain state_dict"
        )
    if fmt == "mae" and not isinstance(data.get("model"), dict):
        raise TeacherError(
            f"{path}: an official MAE checkpoint holds its weights under 'model'; found {sorted(map(str, data))[:8]}"
        )
    state = data[wrapper] if wrapper is not None and fmt in ("mdistiller", "auto", "mae") else data
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TeacherError(f"{path}: not a state_dict — non-tensor entries {bad[:5]} (format {fmt!r})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], arch: str, origin: str, note: str = "") -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TeacherError(
            f"{origin} does not fit architecture {arch!r}: {len(missing)} missing key(s) {missing[:6]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:6]}{note}"
        )
    shapes = [
        f"{k}: {tuple(v.shape)} ≠ {tuple(expected[k].shape)}" for k, v in state.items() if v.shape != expected[k].shape
    ]
    if shapes:
        raise TeacherError(f"{origin} does not fit architecture {arch!r}: shape mismatch {shapes[:4]}")
    model.load_state_dict(state, strict=True)


def timm_weights(tag: str, arch: str, num_classes: int, in_chans: int) -> dict[str, torch.Tensor]:
    """Weights of a pinned timm pretrained tag (`<arch>.<tag>`), fetched by timm (network needed)."""
    import timm

    if "." not in tag or tag.split(".", 1)[0] != arch:
        raise TeacherError(
            f"--format timm needs a pinned tag '<arch>.<tag>' for arch {arch!r} (e.g. {arch}.tv_in1k), got {tag!r}"
        )
    if not timm.is_model(tag):
        raise TeacherError(f"timm has no model {tag!r}")
    try:
        model = timm.create_model(tag, pretrained=True, num_classes=num_classes, in_chans=in_chans)
    except Exception as exc:
        raise TeacherError(
            f"could not fetch timm weights {tag!r} ({type(exc).__name__}: {str(exc)[:200]}); offline? Download them "
            "on a machine with network access and import the file with --format state_dict"
        ) from None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 (%) of `model` over a loader of {'image', 'label'} batches."""
    model.eval().to(device)
    n = top1 = top5 = 0
    for batch in loader:
        logits = model(batch["image"].to(device))
        labels = batch["label"].to(device)
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels[:, None]).any(dim=1).sum())
        n += len(labels)
    if n == 0:
        raise TeacherError("the protocol's test split is empty")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "n": n}


def import_teacher(
    protocol: Protocol,
    arch: str,
    checkpoint: str,
    *,
    fmt: str = "auto",
    root: str | Path | None = None,
    data_root: str | None = None,
    accelerator: str = "auto",
    force: bool = False,
) -> dict[str, Any]:
    """Check, evaluate and store `checkpoint` as the protocol's teacher `arch`; returns the sidecar."""
    from .runner import make_datamodule

    if fmt not in FORMATS:
        raise TeacherError(f"unknown checkpoint format {fmt!r}; valid: {', '.join(FORMATS)}")
    teachers = {p.teacher for p in protocol.pairs}
    if arch not in teachers:
        raise TeacherError(
            f"{arch!r} is not a teacher of protocol {protocol.name!r}; its teachers: {', '.join(sorted(teachers))}"
        )
    ckpt, sidecar = teacher_paths(root, protocol, arch)
    if (ckpt.exists() or sidecar.exists()) and not force:
        raise TeacherError(f"a teacher {arch!r} is already stored at {ckpt}; pass --force to replace it")
    datamodule = make_datamodule(protocol, seed=0, data_root=data_root)
    num_classes, in_chans = datamodule.num_classes, protocol.input.channels
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans)
    if fmt == "timm":
        state, origin = timm_weights(checkpoint, arch, num_classes, in_chans), {"timm_tag": checkpoint}
    else:
        path = Path(checkpoint)
        state, origin = read_checkpoint(path, fmt), {"file": str(path.resolve()), "file_sha256": sha256_file(path)}
    note, mim = "", {}
    if hasattr(model, "mim_parameters"):  # a zoo MAE-ViT: official MAE key names, strict by role
        mim = adopt_mae_checkpoint(model, state, arch, checkpoint)
        state = model.state_dict()
    elif fmt in ("auto", "mdistiller") and set(state) != set(model.state_dict()):
        try:  # reference module names differ from the zoo's; the zoo keeps the reference layer order
            state = adopt_state_dict(model, state, arch)
        except StateDictMismatchError as exc:
            note = f"; matched by reference layer order instead: {exc}"
    load_strict(model, state, arch, checkpoint, note)
    device = torch.device("cuda" if resolve_accelerator(accelerator) in ("gpu", "cuda") else "cpu")
    start = time.perf_counter()
    if split_kind(arch)[1] == "mae":  # a pre-trained MAE has no classifier to evaluate
        measured = {"top1": None, "top5": None, "n": 0}
    else:
        measured = evaluate(model, datamodule.test_dataloader(), device)
    fingerprint = datamodule.fingerprint()
    digest = save_checkpoint_atomic({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, ckpt)
    info = {
        **sidecar_identity(protocol, arch, fingerprint, num_classes, in_chans),
        "sha256": digest,
        "top1": None if measured["top1"] is None else round(measured["top1"], 4),
        "top5": None if measured["top5"] is None else round(measured["top5"], 4),
        "test_images": measured["n"],
        "source": "imported",
        "imported_from": {"format": fmt, **origin},
        "eval_time_s": round(time.perf_counter() - start, 1),
        "imported_at": now_iso(),
        "git_commit": git_commit(),
    }
    if mim:
        info.update(kind=split_kind(arch)[1], has_decoder=mim["has_decoder"], not_in_checkpoint=mim["missing"])
    write_json_atomic(sidecar, info)
    return info
