"""KD³'s pure functions (kd3.md §8) against hand-computed values and re-statements of the official code,
the projector / deployed model, the selection hook, and the web-pool KD baselines."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distillbench.benchmark.zoo import create_model
from distillbench.methods import FrozenTeacher, MethodError, get_method
from distillbench.methods.kd import kd_per_sample
from distillbench.methods.kd3 import (
    KD3Projector,
    MixDistribution,
    class_thresholds,
    mix_distribution,
    nt_xent,
    select_indices,
    selection_alpha,
    weighted_feature_mse,
)
from distillbench.methods.kd_pool import confident_kd_loss


# -- oracles: the official code's computations, restated step by step ---------------------------------
def official_time_d(epoch, max_epoch):  # helper/util.py::time_d with its constant 160
    if epoch < max_epoch:
        return 1 - np.exp(-5 * (((epoch + 1) / 160) - 1) ** 2)
    return 0.0


def official_mix(x, lam, perm, eps=1e-6):  # dataset/augmentation.py::MixDistribution.forward, λ and π given
    mu = x.mean(dim=[2, 3], keepdim=True)
    var = x.var(dim=[2, 3], keepdim=True)
    sig = (var + eps).sqrt()
    mu, sig = mu.detach(), sig.detach()
    x_normed = (x - mu) / sig
    lmda = lam.view(-1, 1, 1, 1)
    mu_mix = mu * lmda + mu[perm] * (1 - lmda)
    sig_mix = sig * lmda + sig[perm] * (1 - lmda)
    return x_normed * sig_mix + mu_mix


def official_contrast(x1, x2, t):  # distiller_zoo/relation.py::Contrastive_loss_bn
    x1, x2 = F.normalize(x1, dim=1), F.normalize(x2, dim=1)
    b = x1.size(0)
    out = torch.cat([x1, x2], dim=0)
    sim = torch.exp(out @ out.t() / t)
    mask = (torch.ones_like(sim) - torch.eye(2 * b)).bool()
    sim = sim.masked_select(mask).view(2 * b, -1)
    pos = torch.exp((x1 * x2).sum(-1) / t)
    pos = torch.cat([pos, pos])
    return (-torch.log(pos / sim.sum(-1))).mean()


def official_weighted_mse(h_s, f_t, logit_s, logit_t):  # loops.py: pdist → sigmoid → weight_mse_loss
    weights = torch.sigmoid(torch.nn.PairwiseDistance(p=2)(logit_s, logit_t)).detach()
    sq = (h_s - f_t) ** 2
    out = sq.clone()
    for i in range(h_s.size(0)):
        out[i] = sq[i] * weights[i]
    return out.mean()


def official_select(conf, labels, num_classes, p_cutoff):  # dataset/I32.py::train_loader_select
    counts = Counter(labels)
    top = max(counts.values())
    cut = [p_cutoff * (counts[c] / top) / (2.0 - counts[c] / top) for c in range(num_classes)]
    return [i for i in range(len(conf)) if conf[i] > cut[labels[i]]]


# -- 1. selection ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("epoch", "total", "expected"),
    [
        (1, 240, 0.9923709),
        (30, 240, 0.9612334),
        (60, 240, 0.8525488),
        (90, 240, 0.6054001),
        (119, 240, 0.2683844),
        (120, 240, 0.0),
        (9, 20, 0.2683844),
        (10, 20, 0.0),
    ],
)
def test_selection_alpha_values(epoch, total, expected):
    assert selection_alpha(epoch, total) == pytest.approx(expected, abs=1e-7)


def test_selection_alpha_is_the_official_schedule_at_240_epochs():
    for e in range(1, 241):
        assert selection_alpha(e, 240) == pytest.approx(official_time_d(e, 120), abs=1e-12)


def test_class_thresholds_by_hand_and_empty_pool():
    torch.testing.assert_close(class_thresholds(torch.tensor([0, 0, 0, 1]), 3, 0.95), torch.tensor([0.95, 0.19, 0.0]))
    with pytest.raises(MethodError, match="empty"):
        class_thresholds(torch.tensor([], dtype=torch.long), 3, 0.95)


def test_select_indices_strict_threshold_and_official_set():
    thresholds = torch.tensor([0.5, 0.2])
    conf = torch.tensor([0.5, 0.51, 0.2, 0.9, 0.21])
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert select_indices(conf, labels, thresholds, min_keep=1).tolist() == [1, 3, 4]  # 0.5 and 0.2 are not > τ
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(200, generator=g) * 0.6 + 0.4
    labels = torch.randint(0, 5, (200,), generator=g)
    thresholds = class_thresholds(labels, 5, 0.95)
    kept = select_indices(conf, labels, thresholds, min_keep=8)
    assert kept.tolist() == official_select(conf.tolist(), labels.tolist(), 5, 0.95)


def test_select_indices_fallback_keeps_the_most_confident_per_class():
    conf = torch.tensor([0.10, 0.30, 0.20, 0.15, 0.40, 0.05, 0.12])
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    nothing_passes = torch.ones(3)
    kept = select_indices(conf, labels, nothing_passes, min_keep=6)  # ⌈6/3⌉ = 2 per class
    assert kept.tolist() == [1, 2, 3, 4, 5, 6]
    kept = select_indices(conf, labels, nothing_passes, min_keep=3)
    assert kept.tolist() == [1, 4, 6]
    # classes with too few members: topped up from the most confident of the rest
    kept = select_indices(conf, torch.tensor([0, 0, 0, 0, 0, 0, 1]), nothing_passes, min_keep=6)
    assert len(kept) == 6 and 5 not in kept.tolist()  # the least confident image is the one left out
    assert len(select_indices(conf, labels, nothing_passes, min_keep=50)) == 7  # never more than the pool


# -- 3. MixDistribution and the contrast -------------------------------------------------------------
def test_mix_distribution_identity_swap_and_detached_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
    torch.testing.assert_close(mix_distribution(x, torch.ones(4), torch.randperm(4, generator=g)), x, atol=1e-5, rtol=0)
    x2 = x[:2].clone().requires_grad_(True)
    out = mix_distribution(x2, torch.zeros(2), torch.tensor([1, 0]))
    torch.testing.assert_close(out[0].mean(dim=(1, 2)), x2[1].mean(dim=(1, 2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0].flatten(1).std(dim=1), x2[1].flatten(1).std(dim=1), atol=1e-4, rtol=0)
    out[0].sum().backward()
    sig = (x2.detach().var(dim=(2, 3)) + 1e-6).sqrt()
    assert torch.all(x2.grad[1] == 0)  # no gradient through image 1's μ, σ
    torch.testing.assert_close(x2.grad[0], (sig[1] / sig[0]).view(3, 1, 1).expand(3, 5, 5))


def test_mix_distribution_matches_official_forward():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 8, 8, generator=g)
    lam = torch.distributions.Beta(0.1, 0.1).sample((6,))
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(mix_distribution(x, lam, perm), official_mix(x, lam, perm), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    mixed = MixDistribution(p=1.0, alpha=0.1)(x)
    assert mixed.shape == x.shape and not torch.allclose(mixed, x)


def test_nt_xent_by_hand_symmetry_scale_and_official():
    eye = torch.eye(2)
    assert float(nt_xent(eye, eye, 1.0)) == pytest.approx(math.log(math.e + 2) - 1, abs=1e-6)
    assert math.log(math.e + 2) - 1 == pytest.approx(0.5514447, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    torch.testing.assert_close(nt_xent(z1, z2, 0.3), nt_xent(z2, z1, 0.3))
    torch.testing.assert_close(nt_xent(3.0 * z1, 0.5 * z2, 0.3), nt_xent(z1, z2, 0.3))
    torch.testing.assert_close(nt_xent(z1, z2, 0.3), official_contrast(z1, z2, 0.3), atol=1e-6, rtol=0)


# -- 2. weighted feature loss and the projector --------------------------------------------------------
def test_weighted_feature_mse_by_hand_and_official():
    g = torch.Generator().manual_seed(0)
    h, f = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    z = torch.randn(3, 10, generator=g)
    # pairwise_distance adds ε = 1e-6 per coordinate: w = sigmoid(1e-6·√10) = 0.5 + 8e-7
    torch.testing.assert_close(weighted_feature_mse(h, f, z, z), 0.5 * ((h - f) ** 2).mean(), atol=0, rtol=2e-6)
    z_far = z[:1].clone()
    z_far[0, 0] += math.log(3)  # Euclidean distance ln 3 → sigmoid = 3/4
    torch.testing.assert_close(weighted_feature_mse(h[:1], f[:1], z_far, z[:1]), 0.75 * ((h[:1] - f[:1]) ** 2).mean())
    z_s = torch.randn(3, 10, generator=g, requires_grad=True)
    h.requires_grad_(True)
    loss = weighted_feature_mse(h, f, z_s, z)
    torch.testing.assert_close(loss, official_weighted_mse(h, f, z_s, z), atol=1e-5, rtol=0)
    loss.backward()
    assert z_s.grad is None or torch.all(z_s.grad == 0)  # the weights carry no gradient


def official_kddd_align(f_s, f_t):  # models/util.py::KDDD.forward, spatial part (reads the teacher map)
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        return F.adaptive_avg_pool2d(f_s, (t_h, t_h)), f_t
    return f_s, F.adaptive_avg_pool2d(f_t, (s_h, s_h))


def test_projector_alignment_matches_the_official_path():
    g = torch.Generator().manual_seed(0)
    proj = KD3Projector(16, 32, teacher_hw=4).eval()
    assert [m.out_channels for m in proj.transfer if isinstance(m, torch.nn.Conv2d)] == [16, 16, 32]
    for s_hw, t_hw in ((8, 4), (4, 8), (4, 4)):
        proj.teacher_hw = t_hw
        f_s, f_t = torch.randn(2, 16, s_hw, s_hw, generator=g), torch.randn(2, 32, t_hw, t_hw, generator=g)
        h, target = proj(f_s, f_t)
        src, ref_target = official_kddd_align(f_s, f_t)
        torch.testing.assert_close(h, proj.transfer(src))
        torch.testing.assert_close(target, ref_target)
        assert h.shape[2] == min(s_hw, t_hw)
    proj.teacher_hw = 4
    assert proj(torch.randn(2, 16, 8, 8, generator=g))[0].shape == (2, 32, 4, 4)  # test path: no teacher map


def _kd3(hparams=None, teacher_arch="resnet14"):
    teacher_model = create_model(teacher_arch, num_classes=10, in_chans=1)
    teacher = FrozenTeacher(teacher_model, info={"arch": teacher_arch, "input": {"size": 8, "channels": 1}})
    spec = get_method("kd3")
    module = spec.module_cls(
        create_model("resnet8", num_classes=10, in_chans=1),
        teacher,
        num_classes=10,
        hparams=spec.resolve_hparams(hparams),
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
        epochs=4,
    )
    return module, teacher


def test_training_step_keeps_teacher_classifier_and_trains_projector():
    module, teacher = _kd3()
    head_before = {k: v.clone() for k, v in module.teacher_head.state_dict().items()}
    assert torch.equal(module.teacher_head.weight, teacher.model.get_classifier().weight)
    proj_before = module.projector.transfer[0].weight.clone()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)
    batch = {"image": torch.randn(8, 1, 8, 8), "label": torch.full((8,), -1), "index": torch.arange(8)}
    terms = module.losses(batch)
    assert set(terms) == {"feat", "mix"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert module.projector.transfer[0].weight.grad.abs().sum() > 0
    assert module.student.get_classifier().weight.grad is None  # the student's own head is unused
    opt.step()
    assert all(torch.equal(head_before[k], v) for k, v in module.teacher_head.state_dict().items())
    assert not torch.equal(proj_before, module.projector.transfer[0].weight)
    assert set(module.losses(batch)) == {"feat", "mix"}
    no_mix, _ = _kd3({"mix_weight": 0.0})
    assert set(no_mix.losses(batch)) == {"feat"} and no_mix.embed_s is None and no_mix.mix is None


def test_deployed_model_and_parameter_count():
    module, _ = _kd3()
    deployed = module.deployed_model()
    x = torch.randn(3, 1, 8, 8)
    module.eval()
    torch.testing.assert_close(deployed(x), module(x))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    backbone = count(module.student) - count(module.student.get_classifier())
    expected = backbone + count(module.projector) + count(module.teacher_head)
    assert sum(p.numel() for p in deployed.parameters()) == expected
    assert module.teacher_head.weight.shape == (10, 64)


def test_kd3_needs_the_teacher_input_size():
    spec = get_method("kd3")
    teacher = FrozenTeacher(create_model("resnet14", num_classes=10, in_chans=1), info={"arch": "resnet14"})
    with pytest.raises(MethodError, match="input"):
        spec.module_cls(create_model("resnet8", num_classes=10, in_chans=1), teacher, num_classes=10, hparams={})


# -- the web-pool KD baselines ------------------------------------------------------------------------
def test_confident_kd_loss_by_hand():
    z_t = torch.tensor([[10.0, 0.0], [0.0, 0.0]])  # confident, then 50/50
    z_s = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    per = kd_per_sample(z_s, z_t, 4.0)
    torch.testing.assert_close(confident_kd_loss(z_s, z_t, 4.0, 0.0), per.mean())
    torch.testing.assert_close(confident_kd_loss(z_s, z_t, 4.0, 0.9), per[0] / 2)
    # by hand for sample 0: p = softmax(z/4)
    p_t = torch.softmax(z_t[0] / 4, 0)
    p_s = torch.softmax(z_s[0] / 4, 0)
    assert float(per[0]) == pytest.approx(16 * float((p_t * (p_t / p_s).log()).sum()), rel=1e-5)
