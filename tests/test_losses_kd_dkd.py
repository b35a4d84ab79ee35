"""KD and DKD against independently computed values (baselines.md §7)."""

from __future__ import annotations

import math

import pytest
import torch
from distillbench.methods.dkd import dkd_loss, dkd_terms, warmup_factor
from distillbench.methods.kd import kd_loss, kd_per_sample


def _kd_by_hand(zs: list[float], zt: list[float], t: float) -> float:
    ps = [math.exp(z / t) for z in zs]
    pt = [math.exp(z / t) for z in zt]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    return t * t * sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))


@pytest.mark.parametrize(("t", "expected"), [(1, 0.1308120), (2, 0.1453631), (4, 0.1494579)])
def test_kd_hand_values_two_classes(t, expected):
    zs, zt = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])
    assert kd_loss(zs, zt, t).item() == pytest.approx(expected, abs=1e-6)
    assert _kd_by_hand([0, 0], [math.log(3), 0], t) == pytest.approx(expected, abs=1e-6)


def test_dkd_hand_values_three_classes():
    zs, zt, y = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0])
    tckd, nckd = dkd_terms(zs, zt, y, 1.0)
    assert tckd.item() == pytest.approx(0.7982504, abs=1e-6)
    assert nckd.item() == pytest.approx(0.0826077, abs=1e-6)
    # float32 KL at T = 4: the T² = 16 factor scales the rounding of Σ p·(log p − log q) (~1e-7 relative
    # per term, with cancellation) to ~1e-6 absolute; the float64 hand values are exact to 7 decimals.
    tckd, nckd = dkd_terms(zs, zt, y, 4.0)
    assert tckd.item() == pytest.approx(0.8181256, abs=2e-6)
    assert nckd.item() == pytest.approx(0.1214950, abs=2e-6)
    assert dkd_loss(zs, zt, y, 1.0, 8.0, 4.0).item() == pytest.approx(1.7900858, abs=2e-5)
    assert kd_loss(zs, zt, 4.0).item() == pytest.approx(0.8811785, abs=2e-6)


@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_equals_tckd_plus_weighted_nckd(k, t):
    g = torch.Generator().manual_seed(k)
    zs, zt = torch.randn(16, k, generator=g) * 3, torch.randn(16, k, generator=g) * 3
    y = torch.randint(0, k, (16,), generator=g)
    tckd, nckd = dkd_terms(zs, zt, y, t)
    p_target = torch.softmax(zt / t, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(kd_per_sample(zs, zt, t), tckd + (1 - p_target) * nckd, atol=1e-5, rtol=1e-5)
    one = dkd_loss(zs[:1], zt[:1], y[:1], 1.0, float(1 - p_target[0]), t)
    assert kd_loss(zs[:1], zt[:1], t).item() == pytest.approx(one.item(), abs=1e-5)


def test_two_classes_nckd_vanishes():
    g = torch.Generator().manual_seed(0)
    zs, zt, y = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g), torch.randint(0, 2, (8,), generator=g)
    _, nckd = dkd_terms(zs, zt, y, 4.0)
    assert torch.all(nckd.abs() < 1e-6)
    assert dkd_loss(zs, zt, y, 1.0, 123.0, 4.0).item() == pytest.approx(kd_loss(zs, zt, 4.0).item(), abs=1e-6)


def test_kd_invariants():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(12, 10, generator=g), torch.randn(12, 10, generator=g)
    assert kd_loss(zt, zt, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(zs, zt, 4.0).item() > 0
    shifted = kd_loss(zs + torch.randn(12, 1, generator=g), zt - 5.0, 4.0)
    assert shifted.item() == pytest.approx(kd_loss(zs, zt, 4.0).item(), rel=1e-5)
    perm = torch.randperm(12, generator=g)
    assert kd_loss(zs[perm], zt[perm], 4.0).item() == pytest.approx(kd_loss(zs, zt, 4.0).item(), rel=1e-6)
    assert kd_loss(zs, zt, 2.0).item() == pytest.approx(kd_per_sample(zs, zt, 2.0).mean().item(), rel=1e-7)


def test_kd_high_temperature_limit():
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64)
    centred = lambda z: z - z.mean(1, keepdim=True)  # noqa: E731
    limit = ((centred(zs) - centred(zt)) ** 2).sum(1).mean() / (2 * 10)
    # the loss upcasts to float32, which bounds the attainable agreement
    assert kd_loss(zs, zt, 100.0).item() == pytest.approx(limit.item(), rel=1e-3)


def test_kd_teacher_zero_probabilities_are_finite():
    zs = torch.tensor([[0.0, 1.0, 2.0]])
    zt = torch.tensor([[0.0, -1e4, 1e4]])  # p_T underflows to exact zeros
    assert torch.isfinite(kd_loss(zs, zt, 1.0))


def test_warmup_factor():
    assert warmup_factor(0, 20) == pytest.approx(0.05)
    assert warmup_factor(19, 20) == 1.0
    assert warmup_factor(50, 20) == 1.0
    assert warmup_factor(0, 1) == 1.0


def test_losses_upcast_half_inputs():
    g = torch.Generator().manual_seed(3)
    zs, zt, y = (
        torch.randn(4, 10, generator=g),
        torch.randn(4, 10, generator=g),
        torch.randint(0, 10, (4,), generator=g),
    )
    assert kd_loss(zs.bfloat16(), zt.bfloat16(), 4.0).dtype == torch.float32
    assert dkd_loss(zs.half(), zt.half(), y, 1.0, 8.0, 4.0).dtype == torch.float32
