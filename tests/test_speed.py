"""The fast path: inference-mode teachers, channels-last, bf16 autocast and torch.compile match fp32 eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distillbench.benchmark.cli import main
from distillbench.benchmark.speed import autocast, compile_backend, compile_module, uses_channels_last
from distillbench.methods import FrozenTeacher
from distillbench.methods.base import released
from torch import nn

# Tolerances the tests hold (README "Performance"):
BF16_LOSS_RTOL = 0.03  # bf16 autocast vs fp32: bf16 keeps 8 bits of mantissa (≈ 0.4 % per rounding)
COMPILE_LOSS_RTOL = 1e-4  # compiled vs eager, fp32: the same ops, possibly reordered reductions
COMPILE_GRAD_ATOL = 1e-4


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def test_released_turns_inference_tensors_into_ordinary_ones():
    with torch.inference_mode():
        a, b = torch.ones(2), torch.zeros(3)
    out = released({"x": (a, [b, 1]), "y": "keep"})
    assert not out["x"][0].is_inference() and not out["x"][1][0].is_inference()
    assert out["x"][1][1] == 1 and out["y"] == "keep"
    plain = torch.ones(2)
    assert released(plain) is plain  # no copy of what is not an inference tensor


def test_teacher_runs_in_inference_mode_and_its_outputs_can_enter_a_backward():
    teacher = FrozenTeacher(_conv_net())
    seen = []
    teacher.model.register_forward_hook(lambda m, i, o: seen.append(torch.is_inference_mode_enabled()))
    x = torch.randn(5, 1, 4, 4)
    z_t = teacher.logits(x)
    assert seen == [True] and not z_t.is_inference() and not z_t.requires_grad
    student = nn.Linear(16, 3)
    z_s = student(x.flatten(1))
    # a product saves z_t for the backward: an inference tensor here would raise
    (z_s * z_t).sum().backward()
    assert student.weight.grad is not None
    feats, logits = teacher.run(lambda m, v: (m[:3](v), m(v)), x)
    assert not feats.is_inference() and torch.equal(logits, z_t)


def test_channels_last_teacher_gives_the_same_logits():
    x = torch.randn(6, 1, 4, 4)
    plain = FrozenTeacher(_conv_net())
    nhwc = FrozenTeacher(_conv_net()).to_channels_last()
    assert nhwc.channels_last and not plain.channels_last
    assert nhwc.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc.logits(x), plain.logits(x), rtol=1e-5, atol=1e-6)
    mlp = FrozenTeacher(nn.Sequential(nn.Flatten(), nn.Linear(16, 3))).to_channels_last()
    assert not mlp.channels_last  # no convolution: nothing to gain
    assert uses_channels_last("cuda") and not uses_channels_last("cpu")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("0", None), ("false", None), ("1", "inductor"), ("aot_eager", "aot_eager")],
)
def test_compile_values(value, expected):
    assert compile_backend(value) == expected


def test_bad_compile_and_precision_values_are_refused(tiny_protocol_path, teacher_store):
    with pytest.raises(ValueError, match="COMPILE='fast'"):
        compile_backend("fast")
    with pytest.raises(ValueError, match="16-mixed"):
        autocast("16-mixed", "cpu")
    args = ["run", "--method", "kd", "--protocol", str(tiny_protocol_path), "--teachers", str(teacher_store)]
    assert main([*args, "--compile", "fast", "--no-wandb"]) == 2


def _modules(tiny_protocol_path, teacher_store, method: str, **request):
    from distillbench.benchmark.costbench import timed_module
    from distillbench.benchmark.runner import RunRequest

    common = {"protocol": str(tiny_protocol_path), "teachers": str(teacher_store), "wandb": False, "progress": False}
    return timed_module(RunRequest(method=method, **common, **request), say=lambda m: None)


def _batch(datamodule) -> dict:
    return next(iter(datamodule.train_dataloader()))


def _loss(module, batch, precision="32-true"):
    module.log = lambda *a, **k: None  # outside a Trainer
    with autocast(precision, "cpu"):
        terms = module.losses(batch)
    return torch.stack([t.float() for t in terms.values()]).sum()


@pytest.mark.parametrize("method", ["vanilla", "kd", "dkd", "ofa"])
def test_bf16_autocast_matches_fp32(tiny_protocol_path, teacher_store, method):
    """The whole step under bf16 autocast (Lightning's `bf16-mixed`), teacher included, against fp32 eager."""
    with _modules(tiny_protocol_path, teacher_store, method) as (module, datamodule, _, _):
        module.train()
        batch = _batch(datamodule)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        fp32 = _loss(module, batch)
        module.load_state_dict(state)  # the same BN statistics for the second pass
        bf16 = _loss(module, batch, "bf16-mixed")
        assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
        assert abs(bf16.item() - fp32.item()) <= BF16_LOSS_RTOL * abs(fp32.item())
        bf16.backward()
        assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_compiled_student_and_teacher_match_eager(tiny_protocol_path, teacher_store):
    """torch.compile (dynamo graphs through AOTAutograd; `aot_eager` skips only inductor's C++ code generation,
    minutes on this CI's CPUs) of student and teacher: the KD loss and its gradients match eager fp32."""
    import torch._dynamo

    with _modules(tiny_protocol_path, teacher_store, "kd") as (module, datamodule, _, _):
        module.train()
        batch = _batch(datamodule)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        eager = _loss(module, batch)
        eager.backward()
        eager_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        module.zero_grad(set_to_none=True)
        module.load_state_dict(state)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compile_module(module, "aot_eager")
        compiled = _loss(module, batch)
        compiled.backward()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # student and teacher were captured
        assert list(module.state_dict()) == list(state)  # checkpoint keys unchanged by compiling
        torch.testing.assert_close(compiled, eager, rtol=COMPILE_LOSS_RTOL, atol=1e-6)
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-3, atol=COMPILE_GRAD_ATOL)
        torch._dynamo.reset()


def test_teacher_kd_loss_through_inference_mode_trains_like_no_grad():
    """KD's gradient with an inference-mode teacher equals the one with a no_grad teacher (same values)."""
    net = _conv_net()
    teacher = FrozenTeacher(net)
    x = torch.randn(4, 1, 4, 4)
    with torch.no_grad():
        ref_t = net.eval()(x)
    z_t = teacher.logits(x)
    torch.testing.assert_close(z_t, ref_t)
    student = nn.Linear(16, 3)
    F.kl_div(F.log_softmax(student(x.flatten(1)), 1), F.softmax(z_t, 1), reduction="batchmean").backward()
    assert torch.isfinite(student.weight.grad).all()
