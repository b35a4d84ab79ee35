"""MAE pre-training and the shared MAE fine-tuner (He et al., "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022; spec shared/methods/dmae.md §1), for the zoo's `MaeViT` models.

- `MAEPretrain`: masked reconstruction, L = `masked_pixel_loss(pred, patchify(x), mask, norm_pix)` with
  one fresh U(0, 1) noise tensor per batch. It trains the teachers of kind `mae` (`make teachers`).
- `MAEFinetune` (registered `mae_ft`): MAE's fine-tuning recipe — AdamW over BEiT layer-wise lr-decay
  groups (cls/pos/patch-embed = layer 0, block i = layer i + 1, the rest on top; timm's
  `param_groups_layer_decay`, no decay on 1-D parameters), drop path, optional mixup/cutmix (timm
  `Mixup` + soft-target CE), label smoothing, head weight trunc-normal std 2e-5, global-pool + fc-norm
  or CLS head. It starts from an encoder checkpoint (`init_checkpoint`, or the `distill` stage's artifact
  of a MIM distillation method that subclasses it) or from scratch (the scratch-student arm).
  `probe=True` is MAE's linear probe instead: frozen encoder, mean of the final-normed patch tokens,
  BatchNorm without affine, a linear head.

DistillModule's teacher-free path (`needs_teacher = False`) runs both; a MIM method subclasses
`MAEFinetune` for its last stage and keeps its teacher for its own earlier stages.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from timm.data import Mixup
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn

from .base import DistillModule
from .errors import MethodError
from .mae_utils import masked_pixel_loss, patchify
from .optim import build_scheduler
from .registry import Stage, StageContext, register

#: official MAE checkpoint wrappers (`{"model": state_dict, ...}`)
WRAPPER_KEYS = ("model", "state_dict")
CLASSIFIER_PREFIXES = ("head.", "fc_norm.")


def check_mae_model(model: nn.Module, method: str) -> None:
    for attr in ("forward_masked", "forward_decoder", "mim_parameters"):
        if not hasattr(model, attr):
            raise MethodError(
                f"method {method!r} needs an MAE-ViT from the zoo (mae_vit_*), got {type(model).__name__} "
                f"without {attr}(); pick a pair whose models are MAE-ViTs "
                "(e.g. PAIR=mae_vit_tiny_p2_8.mae__mae_vit_micro_p2_8)"
            )


def read_encoder_state(path: str | Path) -> dict[str, Tensor]:
    """A state_dict from an encoder checkpoint (ours, or MAE's `{"model": ...}`), read with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise MethodError(f"encoder checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MethodError(f"{path}: not a loadable weights-only checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict):
        data = next((data[k] for k in WRAPPER_KEYS if isinstance(data.get(k), dict)), data)
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise MethodError(f"{path}: expected a state_dict of tensors")
    return dict(data)


def load_encoder(model: nn.Module, state: Mapping[str, Tensor], origin: str) -> list[str]:
    """Load every encoder weight strictly (any missing or mis-shaped encoder key is an error); the classifier
    (`head`, `fc_norm`) keeps its initialisation, the decoder is loaded where present. Returns the names of
    the model's keys that the checkpoint did not provide."""
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise MethodError(f"{origin}: {len(unexpected)} key(s) the model does not have: {unexpected[:6]}")
    shapes = [f"{k}: {tuple(v.shape)} ≠ {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if shapes:
        raise MethodError(f"{origin}: shape mismatch {shapes[:4]}")
    missing = sorted(set(own) - set(state))
    encoder_missing = [k for k in missing if not k.startswith(("decoder_", "mask_token", *CLASSIFIER_PREFIXES))]
    if encoder_missing:
        raise MethodError(f"{origin}: missing encoder weight(s) {encoder_missing[:6]}")
    model.load_state_dict({**own, **state}, strict=True)
    return missing


class MAEPretrain(DistillModule):
    """MAE pre-training: masked-patch reconstruction (pixels of the removed patches)."""

    needs_teacher = False

    def __init__(self, student: nn.Module, *args, mask_ratio: float = 0.75, norm_pix: bool = True, **kwargs):
        super().__init__(student, *args, **kwargs)
        check_mae_model(student, "mae")
        self.mask_ratio, self.norm_pix = float(mask_ratio), bool(norm_pix)
        student.requires_grad_(True)
        for p in (*student.classifier_parameters(), student.pos_embed, student.decoder_pos_embed):
            p.requires_grad_(False)

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        latent, mask, ids_restore, _ = self.student.forward_encoder(x, self.mask_ratio)
        pred, _ = self.student.forward_decoder(latent, ids_restore)
        return {"pix": masked_pixel_loss(pred, patchify(x, self.student.patch_size), mask, self.norm_pix)}

    def configure_optimizers(self):
        spec = {"betas": (0.9, 0.95), "weight_decay": 0.05, **self.optimizer_spec}
        groups = param_groups_weight_decay(self.student, weight_decay=float(spec["weight_decay"]))
        optimizer = torch.optim.AdamW(groups, lr=float(spec["lr"]), betas=tuple(spec["betas"]))
        return self._with_scheduler(optimizer)

    def _with_scheduler(self, optimizer):
        if self.schedule_spec.get("name", "constant") == "constant":
            return optimizer
        interval = self.schedule_spec.get("interval", "epoch")
        steps = max(1, self.trainer.estimated_stepping_batches // max(self.trainer.max_epochs, 1))
        scheduler = build_scheduler(optimizer, self.schedule_spec, self.epochs, steps)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


class LinearProbe(nn.Module):
    """MAE's linear probe: frozen encoder, mean of the final-normed patch tokens, BatchNorm1d(affine=False,
    eps 1e-6), linear head (weight trunc-normal std 0.01, zero bias)."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.bn = nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout/drop-path, as in MAE's linprobe
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            tokens, _ = self.encoder.forward_masked(x, None)
        return self.head(self.bn(tokens[:, 1:].mean(dim=1)))


SUBSET_SEED = 0  # one subset for every run seed and method: arms differ only in the method


def run_subset(ctx: StageContext) -> dict[str, Any] | None:
    """`train_subset: N` (> 0): train on a fixed stratified N-image subset of the protocol's training split
    (both stages; validation and test splits unchanged) — the small protocols' documented way to fit a MIM
    run's budget. The subset depends only on the data and N (seed 0), not on the run seed."""
    n = int(ctx.hparams.get("train_subset") or 0)
    return subset_train_split(ctx.datamodule, n) if n > 0 else None


def subset_train_split(dm, n: int) -> dict[str, Any]:
    """Replace `dm`'s training split by its fixed stratified n-image subset (seed `SUBSET_SEED`)."""
    dm.setup()
    full = dm.train_set
    if n >= len(full):
        raise MethodError(f"train_subset={n} is not smaller than the training split ({len(full)} images)")
    idx = np.arange(len(full))
    _, chosen = train_test_split(idx, test_size=n, random_state=SUBSET_SEED, stratify=full.labels.numpy())
    chosen = torch.from_numpy(np.sort(chosen))
    subset = copy.copy(full)
    subset.images, subset.labels = full.images[chosen], full.labels[chosen]
    dm.train_set = subset
    digest = hashlib.sha256(chosen.numpy().tobytes()).hexdigest()[:16]
    return {"record": {"train_images": n, "of": len(full), "indices_sha256": digest, "seed": SUBSET_SEED}}


def pretraining_schedule(hp: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """A MIM pre-training stage's schedule: per-step cosine with linear warm-up, from the method's
    `<stage>_warmup_epochs` and `<stage>_min_lr` hyper-parameters."""
    return {
        "name": "cosine",
        "interval": "step",
        "warmup_epochs": int(hp[f"{stage}_warmup_epochs"]),
        "min_lr": float(hp[f"{stage}_min_lr"]),
    }


def fit_encoder_stage(
    ctx: StageContext, module: DistillModule, stage: str, epochs: int
) -> tuple[Path, list[dict[str, Any]]]:
    """Train `module` for `epochs` under `<work dir>/<stage>` with the run's trainer factory and save the
    student's weights as `<stage>/encoder.pt` (rank 0: the file the fine-tuning stage initialises from).
    Returns the encoder path and the per-epoch history (empty when the trainer keeps none)."""
    if ctx.make_trainer is None:
        raise MethodError(f"{ctx.method}'s {stage} stage needs a trainer factory (StageContext.make_trainer)")
    out = Path(ctx.work_dir) / stage
    trainer = ctx.make_trainer(out, epochs)
    trainer.fit(module, ctx.datamodule)
    encoder = out / "encoder.pt"
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in ctx.student.state_dict().items()}
        torch.save(state, encoder)
    history = getattr(trainer, "epoch_history", None)
    return encoder, list(history.history) if history is not None else []


FINETUNE_DEFAULTS: dict[str, Any] = {
    "layer_decay": 0.75,
    "drop_path": 0.1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "smoothing": None,  # None: the protocol's label smoothing
    "global_pool": "avg",  # avg (+ fc_norm) | token
    "head_init_std": 2.0e-5,
    "init_checkpoint": "",  # "" = the distill stage's encoder, or scratch when there is none
    "probe": False,
    "train_subset": 0,  # > 0: a fixed stratified subset of the training split (`run_subset`)
}


@register("mae_ft", defaults=FINETUNE_DEFAULTS, stages=(Stage("subset", run_subset),), needs_teacher=False)
class MAEFinetune(DistillModule):
    """MAE fine-tuning (or linear probing) of an MAE-ViT: scratch, from a checkpoint or from a distill stage."""

    needs_teacher = False
    init_stage = "distill"  # the stage whose artifact {"encoder": path} initialises the encoder

    def __init__(self, student: nn.Module, *args, **kwargs):
        super().__init__(student, *args, **kwargs)
        check_mae_model(student, self.method_name or "mae_ft")
        hp = {**FINETUNE_DEFAULTS, **vars(self.hp)}
        self.hp.__dict__.update(hp)
        self.init_source = self._initialise(student, hp)
        if hp["global_pool"] not in ("avg", "token"):
            raise MethodError(f"global_pool must be 'avg' or 'token', got {hp['global_pool']!r}")
        if hp["global_pool"] != student.global_pool:
            student.global_pool = hp["global_pool"]
            student.fc_norm = (
                type(student.norm)(student.embed_dim, eps=1e-6) if hp["global_pool"] == "avg" else nn.Identity()
            )
        if hp["head_init_std"]:
            nn.init.trunc_normal_(student.head.weight, std=float(hp["head_init_std"]))
            nn.init.zeros_(student.head.bias)
        smoothing = self.label_smoothing if hp["smoothing"] is None else float(hp["smoothing"])
        self.label_smoothing = smoothing
        self.mixup = None
        if hp["mixup"] > 0 or hp["cutmix"] > 0:
            self.mixup = Mixup(
                mixup_alpha=float(hp["mixup"]),
                cutmix_alpha=float(hp["cutmix"]),
                label_smoothing=smoothing,
                num_classes=self.num_classes,
            )
        if hp["probe"]:
            self.student = LinearProbe(student, self.num_classes)
        else:
            student.set_drop_path(float(hp["drop_path"]))
            student.requires_grad_(True)
            for p in student.mim_parameters():
                p.requires_grad_(False)

    def _initialise(self, student: nn.Module, hp: Mapping[str, Any]) -> str:
        path = hp["init_checkpoint"] or (self.artifacts.get(self.init_stage) or {}).get("encoder")
        if not path:
            return "scratch"
        load_encoder(student, read_encoder_state(path), str(path))
        return str(path)

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise MethodError("mixup/cutmix needs an even batch size")
            x, soft = self.mixup(x, y)
            logits = self.student(x).float()
            return {"ce": torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()}
        return {"ce": self.classification_loss(self.student(x), y)}

    def configure_optimizers(self):
        spec = self.optimizer_spec
        if spec.get("name", "adamw") not in ("adamw", "adam"):
            raise MethodError(f"the MAE fine-tuner uses AdamW; the protocol's optimizer is {spec.get('name')!r}")
        wd = float(spec.get("weight_decay", 0.05))
        if self.hp.probe:
            groups = param_groups_weight_decay(self.student, weight_decay=wd)
        else:
            groups = param_groups_layer_decay(
                self.student,
                weight_decay=wd,
                layer_decay=float(self.hp.layer_decay),
                no_weight_decay_list=self.student.no_weight_decay(),
            )
        lr = float(spec["lr"])
        for group in groups:  # the scale applies from the first step even without a scheduler
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(spec.get("betas", (0.9, 0.999))))
        return MAEPretrain._with_scheduler(self, optimizer)
