"""Teacher kinds: how a protocol's MIM teachers are trained, named `<zoo arch>.<kind>` in its pairs.

A pair's teacher `mae_vit_tiny_p2_8.mae` is the zoo's `mae_vit_tiny_p2_8` trained with the protocol's
`teacher_kinds.mae` recipe instead of the supervised `teacher` recipe (stored as
`<teachers>/<protocol>/mae_vit_tiny_p2_8.mae.pt`). Kinds:

- `mae`: MAE pre-training (`methods.mae.MAEPretrain`; norm-pix loss, mask ratio from the recipe);
  no classifier is trained, so the sidecar's top-1 is null.
- `vit`: supervised training with the MAE fine-tuning recipe from scratch (`methods.mae.MAEFinetune`).
- `ft`: the protocol's `<arch>.mae` teacher fine-tuned with labels by the MAE fine-tuner (G2SD's specific-stage
  teacher, g2sd.md §7: "a copy of it fine-tuned with labels"); the `.mae` teacher is trained first when it
  is not stored, and its recipe is part of this kind's (so of the teacher key).

A kind's recipe keys: `epochs`, `optimizer`, `schedule`, `seed`, `train_subset` (a fixed stratified subset
of the training split, `methods.mae.subset_train_split`), plus `mask_ratio`/`norm_pix` (mae) or the
fine-tuner's hyper-parameters (vit: layer_decay, drop_path, mixup, cutmix, smoothing, global_pool).
Only pairs whose teacher has a kind hash that kind's recipe, so adding kinds to a protocol keeps the
hashes of its other pairs and teachers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..methods.mae import FINETUNE_DEFAULTS, MAEFinetune, MAEPretrain
from .errors import BenchmarkError

KINDS = ("mae", "vit", "ft")
RECIPE_KEYS = {"epochs", "optimizer", "schedule", "seed"}
KIND_KEYS = {
    "mae": RECIPE_KEYS | {"mask_ratio", "norm_pix", "train_subset"},
    "vit": RECIPE_KEYS | set(FINETUNE_DEFAULTS) | {"train_subset"},
    # the starting encoder is the `.mae` teacher, never a file named in the recipe
    "ft": RECIPE_KEYS | (set(FINETUNE_DEFAULTS) - {"init_checkpoint", "probe"}) | {"train_subset"},
}
#: the kind whose stored teacher a kind starts from (`ft` fine-tunes the `.mae` teacher of the same arch)
PARENT_KIND = {"ft": "mae"}


class TeacherKindError(BenchmarkError):
    pass


def split_kind(arch: str) -> tuple[str, str | None]:
    """`mae_vit_tiny_p2_8.mae` → (`mae_vit_tiny_p2_8`, `mae`); a name without a known kind → (arch, None)."""
    base, _, tag = arch.rpartition(".")
    return (base, tag) if base and tag in KINDS else (arch, None)


def validate_kinds(kinds: Mapping[str, Any], where: str) -> None:
    for kind, recipe in kinds.items():
        if kind not in KINDS:
            raise TeacherKindError(f"{where}: unknown teacher kind {kind!r}; valid: {', '.join(KINDS)}")
        if not isinstance(recipe, Mapping):
            raise TeacherKindError(f"{where}: teacher_kinds.{kind} must be a mapping")
        unknown = set(recipe) - KIND_KEYS[kind]
        if unknown:
            raise TeacherKindError(
                f"{where}: teacher_kinds.{kind} has unknown key(s) {', '.join(sorted(unknown))}; "
                f"valid: {', '.join(sorted(KIND_KEYS[kind]))}"
            )
        if int(recipe.get("epochs", 0)) < 1 or "lr" not in recipe.get("optimizer", {}):
            raise TeacherKindError(f"{where}: teacher_kinds.{kind} needs epochs ≥ 1 and optimizer.lr")


def kind_recipe(protocol, arch: str) -> dict[str, Any] | None:
    """The recipe that trains teacher `arch` under `protocol`, or None for a plain (supervised) teacher."""
    _, kind = split_kind(arch)
    if kind is None:
        return None
    if kind not in protocol.teacher_kinds and protocol.teacher.source != "train":
        return {"kind": kind}  # imported teachers: the kind names how the checkpoint was made
    if kind not in protocol.teacher_kinds:
        raise TeacherKindError(
            f"teacher {arch!r}: protocol {protocol.name!r} has no `teacher_kinds.{kind}` recipe "
            f"(it defines: {', '.join(sorted(protocol.teacher_kinds)) or 'none'})"
        )
    recipe = dict(protocol.teacher_kinds[kind])
    if kind in PARENT_KIND:  # the teacher it starts from is part of its identity
        recipe["from"] = kind_recipe(protocol, parent_arch(arch))
    return recipe


def teacher_epochs(protocol, arch: str) -> int:
    """The epochs teacher `arch` trains for: its kind's recipe, else the protocol's teacher recipe."""
    recipe = kind_recipe(protocol, arch) if protocol.teacher.source == "train" else None
    return int(recipe["epochs"]) if recipe else protocol.teacher_recipe_for(arch).epochs


def parent_arch(arch: str) -> str:
    """`mae_vit_tiny_p2_8.ft` → `mae_vit_tiny_p2_8.mae`: the stored teacher a derived kind starts from."""
    base, kind = split_kind(arch)
    if kind not in PARENT_KIND:
        raise TeacherKindError(f"teacher {arch!r} does not start from another teacher")
    return f"{base}.{PARENT_KIND[kind]}"


def build_kind_module(
    arch: str,
    recipe: Mapping[str, Any],
    model,
    *,
    num_classes: int,
    label_smoothing: float,
    init_checkpoint: str = "",
):
    """The LightningModule that trains `model` as a teacher of `arch`'s kind with `recipe` (`ft`: from the
    encoder in `init_checkpoint`, the stored parent teacher)."""
    _, kind = split_kind(arch)
    common = dict(
        num_classes=num_classes,
        optimizer=recipe["optimizer"],
        schedule=recipe.get("schedule", {"name": "constant"}),
        epochs=int(recipe["epochs"]),
        label_smoothing=label_smoothing,
    )
    if kind == "mae":
        return MAEPretrain(
            model,
            mask_ratio=float(recipe.get("mask_ratio", 0.75)),
            norm_pix=bool(recipe.get("norm_pix", True)),
            **common,
        )
    hparams = {k: v for k, v in recipe.items() if k in FINETUNE_DEFAULTS}
    if kind == "ft":
        if not init_checkpoint:
            raise TeacherKindError(f"teacher {arch!r} fine-tunes {parent_arch(arch)!r}: its checkpoint is needed")
        hparams["init_checkpoint"] = str(init_checkpoint)
    return MAEFinetune(model, hparams=hparams, **common)


def adopt_mae_checkpoint(model, state: Mapping[str, Any], arch: str, origin: str) -> dict[str, Any]:
    """Load an official-format MAE checkpoint (`{"model": ...}` already unwrapped) into a zoo MAE-ViT.

    Strict by role: every encoder key must be present for any kind; a `.mae` teacher (pre-trained) may lack
    the classifier (`head`, `fc_norm`: MAE's pre-training checkpoints have none) and the whole decoder (its
    encoder-only releases: `has_decoder` is then False and methods that read the decoder refuse it), but a
    partial decoder is an error; a plain (fine-tuned) teacher needs its classifier and may lack the decoder,
    the mask token and, with a pooled head, the unused final `norm` (MAE's fine-tuned checkpoints drop it).
    Unexpected or mis-shaped keys are errors. Returns {"has_decoder", "missing"}.
    """
    from .teachers import TeacherError

    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise TeacherError(f"{origin} does not fit {arch!r}: {len(unexpected)} unexpected key(s) {unexpected[:6]}")
    shapes = [f"{k}: {tuple(v.shape)} ≠ {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if shapes:
        raise TeacherError(f"{origin} does not fit {arch!r}: shape mismatch {shapes[:4]}")
    missing = sorted(set(own) - set(state))
    decoder = [k for k in own if k.startswith("decoder_") or k == "mask_token"]
    decoder_missing = [k for k in decoder if k in missing]
    if decoder_missing and len(decoder_missing) != len(decoder):
        raise TeacherError(f"{origin}: the decoder is incomplete, missing {decoder_missing[:6]}")
    optional = set(decoder)
    if split_kind(arch)[1] == "mae":
        optional |= {k for k in own if k.startswith(("head.", "fc_norm."))}
    elif model.global_pool == "avg":
        optional |= {k for k in own if k.startswith("norm.")}
    required_missing = [k for k in missing if k not in optional]
    if required_missing:
        raise TeacherError(
            f"{origin} does not fit {arch!r}: {len(required_missing)} missing key(s) {required_missing[:6]}"
        )
    model.load_state_dict({**own, **state}, strict=True)
    return {"has_decoder": not decoder_missing, "missing": missing}
