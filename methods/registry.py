"""The method registry: one obvious way to find a distillation method by name.

A method module registers its LightningModule with default hyper-parameters and, for multi-stage
methods, the stages that run before training (e.g. ND's class means, FerKD's soft labels). The
runner looks methods up here and never names one itself.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import MethodError


@dataclass
class StageContext:
    """What a pre-training stage may use. Built by the runner; methods never import the runner.

    `artifacts` collects the return value of every stage already run, keyed by stage name; the
    training module receives the same mapping.
    """

    method: str
    hparams: Mapping[str, Any]
    datamodule: Any
    teacher: Any  # FrozenTeacher or None
    teacher_info: Mapping[str, Any]
    protocol: Mapping[str, Any]
    seed: int
    work_dir: Any  # pathlib.Path of this run's artifacts
    cache_dir: Any  # pathlib.Path beside the teacher checkpoint, for teacher-keyed caches
    artifacts: dict[str, Any] = field(default_factory=dict)
    make_trainer: Callable[..., Any] | None = None
    #: set by the runner for runs that train on the soft-label store: `soft_labels(crops_per_image=n,
    #: recover_mode=...)` opens or makes the store, replaces `datamodule` by stored-crop replay, returns it
    soft_labels: Callable[..., Any] | None = None
    #: zoo access for search stages: `build_model(name)` at the protocol's classes/channels, and
    #: `count_flops(model)` at its input size (fvcore)
    build_model: Callable[[str], Any] | None = None
    count_flops: Callable[[Any], int | None] | None = None
    #: the student to train; a search stage may replace it (and name it in `student_arch`)
    student: Any = None
    student_arch: str = ""
    #: extra frozen teachers (FrozenTeacher) of a method with `teacher_hparams`, keyed by the hyper-parameter
    #: that names each (e.g. Hybrid Distill's `tc`); the pair's own teacher stays `teacher`
    teachers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A named step that runs before training and returns an artifact (stored in the context)."""

    name: str
    run: Callable[[StageContext], Any]


@dataclass(frozen=True)
class Extension:
    """A loss term any method that declares it can attach through configuration.

    `hparams[key] = {...}` (e.g. `nd: {weight: 1.0}`) adds the extension's stages and mixes
    `mixin` into the method's module class (`class _(mixin, module_cls)`); the mixin's `losses`
    calls `super().losses(batch)` and adds its own term.
    """

    key: str
    defaults: Mapping[str, Any]
    stages: tuple[Stage, ...]
    mixin: type


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module_cls: type
    defaults: Mapping[str, Any]
    stages: tuple[Stage, ...] = ()
    needs_teacher: bool = True
    summary: str = ""
    extensions: tuple[str, ...] = ()
    #: hyper-parameters whose value names an extra teacher of the protocol (an arch as in its pairs, e.g.
    #: `mae_vit_tiny_p2_8.vit`); the runner loads each (training it when missing, like the pair's teacher),
    #: hashes its identity into the run's protocol hash and hands it to the stages as `StageContext.teachers`
    teacher_hparams: tuple[str, ...] = ()

    def resolve_hparams(self, *overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults, then each override mapping in order; unknown keys are an error."""
        resolved = dict(self.defaults)
        for layer in overrides:
            for key, value in (layer or {}).items():
                if key in self.extensions and key not in self.defaults:
                    resolved[key] = _resolve_extension(self.name, key, resolved.get(key), value)
                    continue
                if key not in self.defaults:
                    valid = sorted([*self.defaults, *self.extensions])
                    raise MethodError(
                        f"method {self.name!r} has no hyper-parameter {key!r}; valid: {', '.join(valid) or '(none)'}"
                    )
                resolved[key] = value
        return resolved

    def extra_teachers(self, hparams: Mapping[str, Any]) -> dict[str, str]:
        """{hyper-parameter: teacher arch} of the extra teachers these resolved `hparams` name (empty values
        name none)."""
        out = {}
        for key in self.teacher_hparams:
            value = hparams.get(key)
            if value in (None, ""):
                continue
            if not isinstance(value, str):
                raise MethodError(f"method {self.name!r}: {key} names a teacher architecture, got {value!r}")
            out[key] = value
        return out

    def plan(self, hparams: Mapping[str, Any]) -> tuple[type, tuple[Stage, ...]]:
        """(module class, stages) for resolved `hparams`: the method's own, plus any attached extension."""
        cls, stages = self.module_cls, list(self.stages)
        for key in self.extensions:
            if hparams.get(key) is None:
                continue
            ext = get_extension(key)
            cls = type(f"{cls.__name__}With{key.upper()}", (ext.mixin, cls), {"__module__": cls.__module__})
            stages += [s for s in ext.stages if s.name not in {t.name for t in stages}]
        return cls, tuple(stages)


def _resolve_extension(method: str, key: str, current: Any, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise MethodError(f"method {method!r}: {key!r} takes a mapping of its settings, got {value!r}")
    defaults = get_extension(key).defaults
    unknown = set(value) - set(defaults)
    if unknown:
        raise MethodError(
            f"method {method!r}: {key!r} has no setting(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **(current or {}), **value}


_EXTENSIONS: dict[str, Extension] = {}


def register_extension(key: str, *, defaults: Mapping[str, Any], stages: tuple[Stage, ...], mixin: type) -> None:
    _EXTENSIONS[key] = Extension(key, dict(defaults), tuple(stages), mixin)


def get_extension(key: str) -> Extension:
    try:
        return _EXTENSIONS[key]
    except KeyError:
        raise MethodError(f"unknown extension {key!r}; registered: {', '.join(sorted(_EXTENSIONS))}") from None


_REGISTRY: dict[str, MethodSpec] = {}
#: methods of other tasks (`task: detection` protocols), by task then name: the same method name (kd, kd++)
#: names the task's own module, built on the same base contract
_TASK_REGISTRY: dict[str, dict[str, MethodSpec]] = {}
TASKS = ("classification", "detection")


def register(
    name: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    stages: tuple[Stage, ...] = (),
    needs_teacher: bool = True,
    extensions: tuple[str, ...] = (),
    teacher_hparams: tuple[str, ...] = (),
    task: str = "classification",
) -> Callable[[type], type]:
    """Class decorator: `@register("kd", defaults={"temperature": 4.0, ...})`.

    `task="detection"` registers the method's detection module (looked up by `get_method(name, task=...)`
    for protocols with `task: detection`), beside any classification module of the same name.

    `extensions` names the attachable terms (e.g. `("nd",)` for a logit method) that a
    configuration may add with `<key>: {...}`. `teacher_hparams` names the hyper-parameters whose values
    are extra teachers (see `MethodSpec.teacher_hparams`); each must have a default.
    """
    missing = [k for k in teacher_hparams if k not in (defaults or {})]
    if missing:
        raise MethodError(f"method {name!r}: teacher hyper-parameter(s) {missing} need a default")

    if task not in TASKS:
        raise MethodError(f"method {name!r}: unknown task {task!r}; valid: {', '.join(TASKS)}")
    registry = _REGISTRY if task == "classification" else _TASK_REGISTRY.setdefault(task, {})

    def wrap(cls: type) -> type:
        if name in registry and registry[name].module_cls is not cls:
            raise MethodError(f"method {name!r} is registered twice")
        doc = (cls.__doc__ or "").strip().splitlines()
        registry[name] = MethodSpec(
            name=name,
            module_cls=cls,
            defaults=dict(defaults or {}),
            stages=tuple(stages),
            needs_teacher=needs_teacher,
            summary=doc[0] if doc else "",
            extensions=tuple(extensions),
            teacher_hparams=tuple(teacher_hparams),
        )
        cls.method_name = name
        return cls

    return wrap


def get_method(name: str, task: str = "classification") -> MethodSpec:
    registry = _REGISTRY if task == "classification" else _TASK_REGISTRY.get(task, {})
    try:
        return registry[name]
    except KeyError:
        close = difflib.get_close_matches(name, registry, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        what = "registered methods" if task == "classification" else f"methods registered for {task}"
        names = ", ".join(list_methods(task)) or "(none)"
        raise MethodError(f"unknown method {name!r}{hint}; {what}: {names}") from None


def list_methods(task: str = "classification") -> list[str]:
    return sorted(_REGISTRY if task == "classification" else _TASK_REGISTRY.get(task, {}))
