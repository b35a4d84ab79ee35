"""Cost columns: parameters, FLOPs (fvcore), the distillation overhead ratio and peak memory.

FLOPs follow fvcore's convention (one fused multiply-add counts as one FLOP; element-wise ops such as
activations, residual adds and softmax are not counted) for one image at the protocol's input size.
fvcore has no handler for fused attention (`aten::scaled_dot_product_attention` and its kernels), so
without `sdpa_flop_jit` a ViT's Q·Kᵀ and attention·V products would count as zero.

The overhead ratio is measured in-process right after training, on the same hardware and batch:
mean time of the method's full training step divided by the mean time of the same student's plain
cross-entropy step (`vanilla` is 1 by definition).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def count_params(module: nn.Module | list[nn.Parameter]) -> int:
    params = module.parameters() if isinstance(module, nn.Module) else module
    return sum(p.numel() for p in params)


# fvcore has no handler for fused attention, so a timm ViT's attention matmuls count as zero
SDPA_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """FLOPs of softmax(Q Kᵀ / √d) V in fvcore's convention (one multiply-add = one FLOP).

    Q: (…, L, E), K: (…, S, E), V: (…, S, Ev) → Q Kᵀ costs L·S·E and the product with V L·S·Ev per
    leading index (batch × heads). The softmax and scaling are element-wise, which fvcore does not
    count for any op. A causal mask is counted in full, as fvcore counts any masked matmul.
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    *lead, length, e = q
    source, ev = k[-2], v[-1]
    return math.prod(lead) * length * source * (e + ev)


def flop_analysis(model: nn.Module, example: Tensor):
    """`fvcore.nn.FlopCountAnalysis` with our extra handlers, warnings off."""
    from fvcore.nn import FlopCountAnalysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    analysis = FlopCountAnalysis(model, example)
    analysis.set_op_handle(**{op: sdpa_flop_jit for op in SDPA_OPS})
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


def count_flops(model: nn.Module, input_shape: tuple[int, ...], *, detector: bool = False) -> int | None:
    """fvcore FLOPs (with the attention handler) for one image of shape (C, H, W); None if tracing fails.

    A `detector` (torchvision's list-of-images interface) is traced in eval mode on one blank image, so its
    box head counts the proposals that image yields (as detection FLOP tables do)."""
    model = copy.deepcopy(model).cpu().float().eval()
    example = [torch.zeros(*input_shape)] if detector else torch.zeros(1, *input_shape)
    try:
        with warnings.catch_warnings():  # tracing warns about shape-dependent Python code (detectors do)
            warnings.simplefilter("ignore")
            return int(flop_analysis(model, example).total())
    except Exception:
        return None


def count_adapter_flops(module, input_shape: tuple[int, ...]) -> int | None:
    """fvcore FLOPs of a method's training-only adapters (e.g. OFA's branch heads) for one image of shape
    (C, H, W), apart from the student's: 0 without adapters, None when the method does not say what its
    adapters read (`DistillModule.adapter_inputs`) or tracing fails."""
    if not count_params(module.adapter_parameters()):
        return 0
    was_training = module.training
    module.eval()  # no BN statistics move
    try:
        device = next(module.student.parameters()).device
        with torch.no_grad():
            inputs = module.adapter_inputs(torch.zeros(1, *input_shape, device=device))
        if not inputs:
            return None
        counts = [count_flops(adapter, tuple(x.shape[1:])) for adapter, x in inputs]
    finally:
        module.train(was_training)
    return None if any(c is None for c in counts) else sum(counts)


def _time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def overhead_ratio(module, batch: Any, steps: int = 8, rounds: int = 3) -> dict[str, float]:
    """Step time of `module.losses` + backward + SGD step over the student-only step
    (`module.reference_loss`: CE for a classifier, the detector's own losses for a detector), same batch.

    The two are timed in alternating rounds and compared by their medians, so a background load
    affects both alike. The module's weights and BN statistics are restored afterwards; the SGD has lr 0.
    """
    state = copy.deepcopy(module.state_dict())
    device = next(module.student.parameters()).device
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)

    def method_step() -> None:
        opt.zero_grad(set_to_none=True)
        sum(module.losses(batch).values()).backward()
        opt.step()

    def vanilla_step() -> None:
        opt.zero_grad(set_to_none=True)
        module.reference_loss(batch).backward()
        opt.step()

    was_training = module.training
    module.train()
    module.log = lambda *args, **kwargs: None  # outside a loop Lightning refuses self.log
    try:
        with contextlib.redirect_stdout(sys.stderr):
            t_method, t_vanilla = [], []
            for _ in range(rounds):
                t_method.append(_time_steps(method_step, device, steps, warmup=2))
                t_vanilla.append(_time_steps(vanilla_step, device, steps, warmup=2))
    finally:
        del module.log
        module.load_state_dict(state)
        module.train(was_training)
        opt.zero_grad(set_to_none=True)
    m, v = statistics.median(t_method), statistics.median(t_vanilla)
    return {
        "overhead_vs_student": round(m / v, 4),
        "method_step_ms": round(1000 * m, 3),
        "student_step_ms": round(1000 * v, 3),
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    # ru_maxrss is KiB on Linux: the process's peak resident set, the CPU analogue
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
