"""distillbench.methods — one module per distillation method, registered by name.

Importing this package registers every built-in method. A user method is one file:
subclass `DistillModule`, implement `losses(batch)`, decorate with `@register("name", defaults=...)`.
"""

from . import detection, diswot, dkd, dmae, ferkd, fkd, g2sd, hybrid, kd, kd3, kd_pool, mae, nd, ofa, vanilla  # noqa: F401  (registration side effects)
from .base import DistillModule, FrozenTeacher
from .errors import MethodError, NonFiniteLossError
from .registry import MethodSpec, Stage, StageContext, get_method, list_methods, register

__all__ = [
    "DistillModule",
    "FrozenTeacher",
    "MethodError",
    "MethodSpec",
    "NonFiniteLossError",
    "Stage",
    "StageContext",
    "get_method",
    "list_methods",
    "register",
]
