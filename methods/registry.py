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


@dataclass(frozen=True)
class Stage:
    """A named step that runs before training and returns an artifact (stored in the context)."""

    name: str
    run: Callable[[StageContext], Any]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module_cls: type
    defaults: Mapping[str, Any]
    stages: tuple[Stage, ...] = ()
    needs_teacher: bool = True
    summary: str = ""

    def resolve_hparams(self, *overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults, then each override mapping in order; unknown keys are an error."""
        resolved = dict(self.defaults)
        for layer in overrides:
            for key, value in (layer or {}).items():
                if key not in self.defaults:
                    raise MethodError(
                        f"method {self.name!r} has no hyper-parameter {key!r}; "
                        f"valid: {', '.join(sorted(self.defaults)) or '(none)'}"
                    )
                resolved[key] = value
        return resolved


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    stages: tuple[Stage, ...] = (),
    needs_teacher: bool = True,
) -> Callable[[type], type]:
    """Class decorator: `@register("kd", defaults={"temperature": 4.0, ...})`."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].module_cls is not cls:
            raise MethodError(f"method {name!r} is registered twice")
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = MethodSpec(
            name=name,
            module_cls=cls,
            defaults=dict(defaults or {}),
            stages=tuple(stages),
            needs_teacher=needs_teacher,
            summary=doc[0] if doc else "",
        )
        cls.method_name = name
        return cls

    return wrap


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MethodError(f"unknown method {name!r}{hint}; registered methods: {', '.join(list_methods())}") from None


def list_methods() -> list[str]:
    return sorted(_REGISTRY)
