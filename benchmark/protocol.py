"""Protocols: versioned YAML recipes (`benchmark/protocols/<name>.yaml`) loaded into validated dataclasses.

A protocol fixes the dataset and its splits, input size and normalisation, augmentation, the GLOBAL
batch size (per-device batch = global / world size), epochs, optimizer, schedule, criterion, the
teachers' training recipe, the teacher/student pairs with per-pair overrides, per-method
hyper-parameters, seeds, and the selection rule (the reported number is the last epoch's test
metric). Unknown keys are errors.

`Protocol.hash(pair)` is a content hash of everything that changes a run's number except the method
hyper-parameters, which every run record stores in full: the recipe, the teachers' recipe and the
pair's own overrides. Runs with different hashes never share a leaderboard cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import BenchmarkError
from .teacher_kinds import kind_recipe, split_kind, validate_kinds

OPTIMIZER_KEYS = {"name", "lr", "momentum", "nesterov", "weight_decay", "betas", "eps", "no_decay_bias_norm"}
SCHEDULE_KEYS = {"name", "interval", "milestones", "gamma", "warmup_epochs", "warmup_lr", "min_lr"}
AUGMENT_KEYS = {"kind", "pad", "flip", "scale", "ratio", "crop_pct", "auto_augment", "re_prob"}
MIXUP_KEYS = {"mixup_alpha", "cutmix_alpha", "prob", "switch_prob"}
#: a pair's student recipe beyond the optimizer: these replace the protocol's (ViT/MLP students of OFA)
PAIR_RECIPE_KEYS = ("schedule", "augment", "mixup", "ema_decay", "grad_clip")
#: a pair's own length and global batch (OFA's ImageNet ViT students: 300 epochs at 1024), folded into the
#: protocol by `Protocol.for_pair`
PAIR_SCALE_KEYS = ("epochs", "batch_size")
TEACHER_SOURCES = ("train", "import")
SOFT_LABEL_KEYS = {"num_crops", "k", "temperature", "scale", "ratio", "flip", "seed", "store_logits"}
SOFT_LABEL_KEYS |= {"store_embeddings", "label_dtype", "kind", "pad"}


class ProtocolError(BenchmarkError):
    pass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    val_size: float = 0.1  # a fraction of train, or a count when ≥ 1
    split_seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the datamodule


@dataclass(frozen=True)
class InputSpec:
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class TeacherRecipe:
    """How a protocol's teachers are obtained: trained with this recipe (`source: train`, what
    `make teachers` does) or only adopted with `teachers import` (`source: import`: ImageNet-pretrained
    or fine-tuned checkpoints; then epochs/optimizer/schedule are not used)."""

    epochs: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    source: str = "train"

    def identity(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["source"] == "train":  # the key predates `source`: stored teachers and hashes stay valid
            del data["source"]
        return data


@dataclass(frozen=True)
class PairSpec:
    teacher: str
    student: str
    optimizer: dict[str, Any] = field(default_factory=dict)  # overrides of the protocol's optimizer
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method hparam overrides
    note: str = ""
    # the student recipe of this pair where it is not the protocol's (each replaces the protocol's value)
    schedule: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] = field(default_factory=dict)
    mixup: dict[str, Any] = field(default_factory=dict)
    ema_decay: float | None = None
    grad_clip: float | None = None
    epochs: int | None = None
    batch_size: int | None = None

    def recipe_overrides(self) -> dict[str, Any]:
        """The pair's own student recipe (only what it sets, so pairs without any keep their hash)."""
        keys = (*PAIR_RECIPE_KEYS, *PAIR_SCALE_KEYS)
        return {k: getattr(self, k) for k in keys if getattr(self, k) not in (None, {})}

    @property
    def name(self) -> str:
        return f"{self.teacher}__{self.student}"


@dataclass(frozen=True)
class Protocol:
    name: str
    version: int
    description: str
    dataset: DatasetSpec
    input: InputSpec
    batch_size: int
    epochs: int
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    teacher: TeacherRecipe
    pairs: tuple[PairSpec, ...]
    augment: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    label_smoothing: float = 0.0
    num_workers: int = 0
    default_pair: str = ""
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: tuple[str, ...] = ("top1", "top5")
    selection: str = "last"
    #: FKD soft-label store settings (ferkd.md §1, §4): N crops, top-k, T_gen, the RandomResizedCrop
    soft_labels: dict[str, Any] = field(default_factory=dict)
    #: set by `with_store_augment`: train on the store's crops (replayed or drawn live), not `augment`
    store_augment: bool = False
    #: timm's Mixup/CutMix on every training batch (mixup_alpha, cutmix_alpha, prob, switch_prob; label
    #: smoothing is `label_smoothing`); an EMA of the student's weights (timm ModelEmaV3, evaluated beside
    #: them); gradient-norm clipping. Unset (the default) they are absent from the hash.
    mixup: dict[str, Any] = field(default_factory=dict)
    ema_decay: float | None = None
    grad_clip: float | None = None
    #: recipes of MIM teacher kinds (`benchmark.teacher_kinds`): a pair teacher `<arch>.<kind>` trains with
    #: `teacher_kinds[kind]`; hashed only into the pairs and teachers of that kind
    teacher_kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per-architecture teacher recipes ({arch: {epochs, optimizer, schedule}}, each key replacing the
    #: `teacher` recipe's): a tiny ViT teacher wants AdamW with warm-up where the CNN teachers take SGD.
    #: Hashed only into that arch's teacher key and the pairs it teaches, so other hashes stay valid.
    teacher_archs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per-method default pair (e.g. MIM methods run on an MAE-ViT pair when PAIR is not given); not hashed
    method_pairs: dict[str, str] = field(default_factory=dict)
    #: `classification` (the default, absent from the hash) or `detection` (COCO-format data, Faster R-CNN
    #: detectors, COCOeval AP: benchmark/detection.py runs it, methods register their detection modules)
    task: str = "classification"
    source: str = ""  # the YAML file it came from (not hashed)

    # -- lookups -----------------------------------------------------------------------
    def pair(self, name: str | None = None) -> PairSpec:
        name = name or self.default_pair or self.pairs[0].name
        for pair in self.pairs:
            if pair.name == name:
                return pair
        raise ProtocolError(f"protocol {self.name!r} has no pair {name!r}; valid pairs: {', '.join(self.pair_names())}")

    def pair_for(self, method: str, name: str | None = None) -> PairSpec:
        """The pair a run of `method` uses: `name`, else the method's default pair, else the protocol's."""
        return self.pair(name or self.method_pairs.get(method))

    def pair_names(self) -> list[str]:
        return [p.name for p in self.pairs]

    def reference_pair(self, pair: PairSpec) -> PairSpec:
        """The pair whose teacher-less run (`vanilla`) serves `pair`: the first listed pair with the same
        student and the same student recipe. A run without a teacher does not depend on the teacher, so
        every pair of one student shares one vanilla record (`none__<student>`) and one protocol hash."""
        own = self.recipe(pair)["pair"]
        for other in self.pairs:
            theirs = self.recipe(other)["pair"]
            if {**theirs, "teacher": own["teacher"]} == own:
                return other
        return pair

    def teacher_recipe_for(self, arch: str) -> TeacherRecipe:
        """The supervised recipe that trains teacher `arch`: `teacher`, with the arch's own keys over it."""
        return dataclasses.replace(self.teacher, **self.teacher_archs.get(arch, {}))

    def optimizer_for(self, pair: PairSpec) -> dict[str, Any]:
        return {**self.optimizer, **pair.optimizer}

    def for_pair(self, pair: PairSpec) -> Protocol:
        """The protocol with the pair's own epochs and global batch (the same protocol when it sets none)."""
        epochs, batch = pair.epochs or self.epochs, pair.batch_size or self.batch_size
        if (epochs, batch) == (self.epochs, self.batch_size):
            return self
        return dataclasses.replace(
            self, epochs=epochs, batch_size=batch, schedule=_cut_milestones(self.schedule, epochs)
        )

    def student_recipe(self, pair: PairSpec) -> dict[str, Any]:
        """The student's training recipe for `pair`: optimizer (the pair's keys over the protocol's),
        schedule, augment, mixup, ema_decay, grad_clip (the pair's value where it sets one)."""
        recipe = {k: getattr(self, k) for k in PAIR_RECIPE_KEYS}
        recipe.update(pair.recipe_overrides())
        if self.store_augment:  # the soft-label store's crops win over any augmentation
            recipe["augment"] = self.train_augment
        recipe["augment"] = dict(recipe["augment"])
        recipe["optimizer"] = self.optimizer_for(pair)
        return recipe

    def with_epochs(self, epochs: int) -> Protocol:
        """The same protocol with another epoch count (a different hash). Milestones past the end drop."""
        if epochs < 1:
            raise ProtocolError(f"epochs must be ≥ 1, got {epochs}")
        pairs = tuple(
            dataclasses.replace(p, schedule=_cut_milestones(p.schedule, epochs), epochs=p.epochs and epochs)
            for p in self.pairs
        )
        return dataclasses.replace(self, epochs=epochs, schedule=_cut_milestones(self.schedule, epochs), pairs=pairs)

    def with_teacher_epochs(self, epochs: int) -> Protocol:
        """The same protocol with a shorter/longer teacher recipe (another teacher key and hash): for smoke
        runs on generated data, where the full teacher recipe would take hours on a CPU."""
        if epochs < 1:
            raise ProtocolError(f"teacher epochs must be ≥ 1, got {epochs}")
        if self.teacher.source != "train":
            raise ProtocolError(f"the teachers of {self.name!r} are imported, not trained: no teacher epochs to set")
        recipe = dataclasses.replace(
            self.teacher, epochs=epochs, schedule=_cut_milestones(self.teacher.schedule, epochs)
        )
        kinds = {kind: {**r, "epochs": epochs} for kind, r in self.teacher_kinds.items()}
        archs = {arch: {**r, "epochs": epochs} for arch, r in self.teacher_archs.items()}
        for r in archs.values():
            if "schedule" in r:
                r["schedule"] = _cut_milestones(r["schedule"], epochs)
        return dataclasses.replace(self, teacher=recipe, teacher_kinds=kinds, teacher_archs=archs)

    def with_store_augment(self, num_crops: int | None = None) -> Protocol:
        """Train with the soft-label store's RandomResizedCrop instead of `augment` (a different hash)."""
        if not self.soft_labels:
            raise ProtocolError(f"protocol {self.name!r} has no soft_labels section (needed by the soft-label store)")
        settings = dict(self.soft_labels)
        if num_crops is not None:
            if num_crops < 1:
                raise ProtocolError(f"the store needs ≥ 1 crop per image, got {num_crops}")
            if settings.get("kind") == "padcrop" and num_crops != settings["num_crops"]:
                raise ProtocolError(
                    f"protocol {self.name!r} stores all {settings['num_crops']} pad-crop views; CROPS cannot change it"
                )
            settings["num_crops"] = num_crops
        return dataclasses.replace(self, soft_labels=settings, store_augment=True)

    @property
    def train_augment(self) -> dict[str, Any]:
        """The student's training augmentation: `augment`, or the store's RandomResizedCrop (evaluated on
        the whole image, crop_pct 1, like the protocol's other runs)."""
        if not self.store_augment:
            return dict(self.augment)
        s = self.soft_labels
        if s.get("kind") == "padcrop":  # the exhaustive store of the live RandomCrop(pad) + flip
            return {"kind": "padcrop", "pad": int(s["pad"]), "flip": bool(s["flip"])}
        return {
            "kind": "rrc",
            "scale": list(s["scale"]),
            "ratio": list(s["ratio"]),
            "flip": bool(s["flip"]),
            "crop_pct": 1.0,
        }

    # -- identity ----------------------------------------------------------------------
    def recipe(self, pair: PairSpec | None = None, extra_teachers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """What determines a run's number apart from method hyper-parameters. `extra_teachers` ({role: arch},
        a method's `teacher_hparams`) adds each extra teacher's arch and kind recipe (absent when there is
        none, so other runs keep their hash)."""
        if pair is not None and (folded := self.for_pair(pair)) is not self:
            return folded.recipe(pair, extra_teachers)
        data = dataclasses.asdict(self)
        data["dataset"] = self._dataset_identity()
        for key in ("description", "pairs", "default_pair", "seeds", "methods", "source", "num_workers"):
            data.pop(key)
        data.pop("teacher_kinds"), data.pop("method_pairs"), data.pop("teacher_archs")
        if data["task"] == "classification":  # absent by default, so classification hashes stay valid
            data.pop("task")
        data["teacher"] = self.teacher_recipe_for(pair.teacher if pair else "").identity()
        # absent unless a run trains on the store's crops, so older records keep their hash
        if data.pop("store_augment"):
            data["augment"] = self.train_augment
        else:
            data.pop("soft_labels")
        for key in ("mixup", "ema_decay", "grad_clip"):  # absent unless set, so older hashes stay valid
            if data[key] in (None, {}):
                data.pop(key)
        if pair is not None:
            data["pair"] = {"teacher": pair.teacher, "student": pair.student, "optimizer": pair.optimizer}
            data["pair"].update(pair.recipe_overrides())
            kind = kind_recipe(self, pair.teacher)
            if kind is not None:
                data["teacher_kind"] = kind
        if extra_teachers:
            data["extra_teachers"] = {
                role: {"arch": arch, **({"kind": k} if (k := kind_recipe(self, arch)) is not None else {})}
                for role, arch in sorted(extra_teachers.items())
            }
        return data

    def hash(self, pair: PairSpec | None = None, extra_teachers: Mapping[str, str] | None = None) -> str:
        return content_hash(self.recipe(pair, extra_teachers))

    def _dataset_identity(self) -> dict[str, Any]:
        """The dataset spec as hashed; empty `options` are left out so older hashes stay valid."""
        data = dataclasses.asdict(self.dataset)
        if not data["options"]:
            data.pop("options")
        return data

    def teacher_key(self, arch: str, data_fingerprint: str) -> str:
        """Identity of a teacher trained under this protocol: the training data's fingerprint, splits,
        input, augmentation, teacher recipe and architecture — not the student's recipe."""
        identity = {
            "data": data_fingerprint,
            "dataset": self._dataset_identity(),
            "input": dataclasses.asdict(self.input),
            "augment": self.augment,
            "batch_size": self.batch_size,
            "label_smoothing": self.label_smoothing,
            "teacher": self.teacher_recipe_for(arch).identity(),
            "arch": arch,
        }
        kind = kind_recipe(self, arch)
        if kind is not None:
            identity["teacher_kind"] = kind
        if self.task != "classification":
            identity["task"] = self.task
        return content_hash(identity)


def _cut_milestones(schedule: dict[str, Any], epochs: int) -> dict[str, Any]:
    schedule = dict(schedule)
    if "milestones" in schedule:
        schedule["milestones"] = [m for m in schedule["milestones"] if m < epochs]
    return schedule


def content_hash(data: Any) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# -- loading and validation ------------------------------------------------------------------
def _check_keys(data: Any, allowed: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        raise ProtocolError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(allowed))}"
        )


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: {value!r} does not match {annotation}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # Protocol.source: the file; Protocol.store_augment: set by with_store_augment
    _check_keys(data, set(fields) - ({"source", "store_augment"} if cls is Protocol else set()), where)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: missing required key {name!r}")
    return cls(**kwargs)


TASKS = ("classification", "detection")


def _validate(p: Protocol, where: str) -> None:
    if p.task not in TASKS:
        raise ProtocolError(f"{where}: task must be one of {', '.join(TASKS)}, got {p.task!r}")
    if p.task == "detection" and p.input.channels != 3:
        raise ProtocolError(f"{where}: detection protocols take RGB images (input.channels 3)")
    if p.teacher.source not in TEACHER_SOURCES:
        raise ProtocolError(f"{where}: teacher.source must be one of {', '.join(TEACHER_SOURCES)}")
    trained = p.teacher.source == "train"
    if p.batch_size < 1 or p.epochs < 1 or (trained and p.teacher.epochs < 1):
        raise ProtocolError(f"{where}: batch_size, epochs and teacher.epochs must be ≥ 1")
    if len(p.input.mean) != p.input.channels or len(p.input.std) != p.input.channels:
        raise ProtocolError(f"{where}: input.mean/std need one value per channel ({p.input.channels})")
    for key, spec, allowed in (
        ("optimizer", p.optimizer, OPTIMIZER_KEYS),
        ("schedule", p.schedule, SCHEDULE_KEYS),
        ("teacher.optimizer", p.teacher.optimizer, OPTIMIZER_KEYS),
        ("teacher.schedule", p.teacher.schedule, SCHEDULE_KEYS),
        ("augment", p.augment, AUGMENT_KEYS),
        ("soft_labels", p.soft_labels, SOFT_LABEL_KEYS),
    ):
        _check_keys(spec, allowed, f"{where}: {key}")
    for key, spec, epochs in (
        ("schedule", p.schedule, p.epochs),
        ("teacher.schedule", p.teacher.schedule, p.teacher.epochs),
    ):
        _check_schedule(spec, epochs if key == "schedule" or trained else 0, f"{where}: {key}")
    if "lr" not in p.optimizer or (trained and "lr" not in p.teacher.optimizer):
        raise ProtocolError(f"{where}: optimizer and teacher.optimizer need an 'lr'")
    if not p.pairs:
        raise ProtocolError(f"{where}: at least one teacher/student pair is required")
    _check_student_recipe(p.mixup, p.ema_decay, p.grad_clip, where)
    for i, pair in enumerate(p.pairs):
        at = f"{where}: pairs[{i}]"
        _check_keys(pair.optimizer, OPTIMIZER_KEYS, f"{at}.optimizer")
        if pair.schedule:
            _check_keys(pair.schedule, SCHEDULE_KEYS, f"{at}.schedule")
            _check_schedule(pair.schedule, pair.epochs or p.epochs, f"{at}.schedule")
        if pair.augment:
            _check_keys(pair.augment, AUGMENT_KEYS, f"{at}.augment")
        _check_student_recipe(pair.mixup, pair.ema_decay, pair.grad_clip, at)
        if (pair.epochs is not None and pair.epochs < 1) or (pair.batch_size is not None and pair.batch_size < 1):
            raise ProtocolError(f"{at}: epochs and batch_size must be ≥ 1")
    names = p.pair_names()
    if len(set(names)) != len(names):
        raise ProtocolError(f"{where}: duplicate pairs")
    if p.default_pair and p.default_pair not in names:
        raise ProtocolError(f"{where}: default_pair {p.default_pair!r} is not one of {', '.join(names)}")
    kind = p.soft_labels.get("kind", "rrc")
    if kind not in ("rrc", "padcrop"):
        raise ProtocolError(f"{where}: soft_labels.kind must be rrc or padcrop, got {kind!r}")
    needed = {"num_crops", "k", "flip"} | ({"pad"} if kind == "padcrop" else {"scale", "ratio"})
    missing = needed - set(p.soft_labels)
    if p.soft_labels and missing:
        raise ProtocolError(f"{where}: soft_labels needs {', '.join(sorted(missing))}")
    if kind == "padcrop":
        views = (2 * int(p.soft_labels["pad"]) + 1) ** 2 * (2 if p.soft_labels["flip"] else 1)
        if p.soft_labels["num_crops"] != views:
            raise ProtocolError(f"{where}: a padcrop store holds every view: num_crops must be {views}")
    if p.soft_labels.get("label_dtype", "float32") not in ("float32", "float16"):
        raise ProtocolError(f"{where}: soft_labels.label_dtype must be float32 or float16")
    validate_kinds(p.teacher_kinds, where)
    for arch, own in p.teacher_archs.items():
        at = f"{where}: teacher_archs.{arch}"
        if not isinstance(own, dict):
            raise ProtocolError(f"{at} must be a mapping of epochs / optimizer / schedule")
        _check_keys(own, {"epochs", "optimizer", "schedule"}, at)
        arch_recipe = p.teacher_recipe_for(arch)
        if "optimizer" in own:
            _check_keys(own["optimizer"], OPTIMIZER_KEYS, f"{at}.optimizer")
            if "lr" not in own["optimizer"]:
                raise ProtocolError(f"{at}.optimizer needs an 'lr'")
        if int(arch_recipe.epochs) < 1:
            raise ProtocolError(f"{at}.epochs must be ≥ 1")
        _check_keys(arch_recipe.schedule, SCHEDULE_KEYS, f"{at}.schedule")
        _check_schedule(arch_recipe.schedule, arch_recipe.epochs, f"{at}.schedule")
    for method, pair_name in p.method_pairs.items():
        if pair_name not in names:
            raise ProtocolError(f"{where}: method_pairs.{method}: {pair_name!r} is not one of {', '.join(names)}")
    for pair in p.pairs:
        if split_kind(pair.teacher)[1] is not None and p.teacher.source == "train":
            kind_recipe(p, pair.teacher)  # the kind's recipe must exist
    if p.selection != "last":
        raise ProtocolError(f"{where}: selection must be 'last' (the reported number is the last epoch's)")


def _check_student_recipe(mixup: dict[str, Any], ema_decay: float | None, grad_clip: float | None, where: str) -> None:
    _check_keys(mixup, MIXUP_KEYS, f"{where}.mixup")
    if mixup and not (mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0):
        raise ProtocolError(f"{where}.mixup: set mixup_alpha and/or cutmix_alpha > 0 (or leave mixup out)")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ProtocolError(f"{where}.ema_decay must be in (0, 1), got {ema_decay}")
    if grad_clip is not None and grad_clip <= 0:
        raise ProtocolError(f"{where}.grad_clip must be > 0 (a gradient-norm bound), got {grad_clip}")


def _check_schedule(spec: dict[str, Any], epochs: int, where: str) -> None:
    from ..methods.optim import SCHEDULES

    name = spec.get("name", "constant")
    if name not in SCHEDULES:
        raise ProtocolError(f"{where}: unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    warmup = spec.get("warmup_epochs", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0 or (epochs and warmup >= epochs):
        raise ProtocolError(f"{where}: warmup_epochs must be an integer in 0..{max(epochs - 1, 0)}, got {warmup!r}")


def protocol_dir() -> Path:
    return Path(str(resources.files("distillbench.benchmark") / "protocols"))


def list_protocols() -> list[str]:
    return sorted(p.stem for p in protocol_dir().glob("*.yaml"))


def load_protocol(name_or_path: str | Path) -> Protocol:
    """By name (a file in benchmark/protocols/) or by path to a YAML file."""
    text = str(name_or_path)
    path = Path(text) if text.endswith((".yaml", ".yml")) else protocol_dir() / f"{text}.yaml"
    if not path.is_file():
        if text.endswith((".yaml", ".yml")):
            raise ProtocolError(f"protocol file {path} does not exist")
        raise ProtocolError(f"unknown protocol {text!r}; available: {', '.join(list_protocols())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProtocolError(f"{path}: malformed YAML: {exc}") from None
    protocol = _build(Protocol, data, str(path))
    _validate(protocol, str(path))
    return dataclasses.replace(protocol, source=str(path))
