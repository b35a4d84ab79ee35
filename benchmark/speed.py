"""The fast path of a training step: opt-in `torch.compile` and channels-last teachers.

- `COMPILE=1` (`--compile`): `compile_module` compiles the student's and the frozen teacher's forward
  in place (`nn.Module.compile`: parameters and `state_dict` keys are unchanged, so checkpoints, records
  and resume work as in eager runs). A method that reaches into a network through another entry point
  (`forward_features`, `forward_intermediates`, hooks) runs that call eagerly; the loss terms, the
  optimizer and everything Lightning does stay eager too. `COMPILE=<backend>` picks a dynamo backend
  (default `inductor`; `aot_eager` traces and runs the same graphs without code generation).
- channels-last: a conv teacher on CUDA keeps its weights and inputs in NHWC (`FrozenTeacher.to_channels_last`),
  cuDNN's fast layout (above all in bf16); on CPU the contiguous layout stays (see leaderboards/performance.md).
- `PRECISION=bf16-mixed` needs nothing here: Lightning's autocast covers the whole training step, the
  teacher's forward included; every loss is computed in float32 (`classification_loss` and the methods
  upcast their logits).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def compile_backend(value: Any) -> str | None:
    """The dynamo backend an opt-in value asks for: None for off ("", 0, false, no), `inductor` for
    1/true/yes, else the backend named; an unknown name is an error."""
    text = str(value if value is not None else "").strip().lower()
    if text in ("", "0", "false", "no", "off", "none"):
        return None
    if text in ("1", "true", "yes", "on"):
        return "inductor"
    if text not in COMPILE_BACKENDS:
        raise ValueError(f"COMPILE={value!r}: expected 0/1 or a backend of {', '.join(COMPILE_BACKENDS)}")
    return text


def compile_module(module, backend: str = "inductor") -> None:
    """Compile `module.student`'s and its frozen teacher's forward in place (see the module docstring)."""
    module.student.compile(backend=backend)
    teacher = getattr(module, "teacher", None)
    if teacher is not None:
        teacher.model.compile(backend=backend)


def uses_channels_last(device: torch.device | str) -> bool:
    """Channels-last teachers on CUDA only (cuDNN's NHWC kernels); CPU keeps the contiguous layout."""
    return torch.device(device).type == "cuda"


PRECISIONS = ("32-true", "32", "bf16-mixed")


def autocast(precision: str, device: torch.device | str):
    """The autocast context Lightning's `precision` opens around a training step, for loops outside a
    Trainer (the cost and perf benchmarks): none for 32-true, bfloat16 autocast for bf16-mixed."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: the step benchmarks take one of {', '.join(PRECISIONS)}")
    if precision == "bf16-mixed":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
