"""OFA-KD (ofa.md §7): the loss against hand values and a float64 second formulation, branch heads
and stage taps for every student family, the training module's objective, and a digits run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from distillbench.benchmark.cost import count_params, overhead_ratio
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.results import validate_record
from distillbench.benchmark.runner import RunRequest, run
from distillbench.benchmark.zoo import create_model
from distillbench.methods import FrozenTeacher, MethodError, get_method
from distillbench.methods.ofa import (
    OFA,
    StageInfo,
    build_branch_head,
    isotropic_taps,
    ofa_loss,
    plan_taps,
    stage_infos,
    target_mask,
)
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from tests.conftest import TINY_PROTOCOL, write_protocol


def _mask(y, k):
    return target_mask(torch.tensor(y), k)


# -- the loss ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("eps", "expected"), [(1.0, 0.6931472), (1.5, 0.9981544), (2.0, 1.4729378)])
def test_hand_values_two_classes(eps, expected):
    # p_S = [1/2, 1/2], p_T = [3/4, 1/4], y = 0: w = [(7/4)^ε − 1, (1/4)^ε], loss = ln 2 · Σ w
    by_hand = math.log(2) * ((7 / 4) ** eps - 1 + (1 / 4) ** eps)
    assert by_hand == pytest.approx(expected, abs=1e-7)
    loss = ofa_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]]), _mask([0], 2), eps)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("eps", "expected"), [(1.0, 1.3354208), (1.5, 2.1529683)])
def test_hand_values_three_classes(eps, expected):
    loss = ofa_loss(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 1.0, 0.0]]), _mask([0], 3), eps)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_eps_one_is_soft_target_cross_entropy(t):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3
    y = torch.randint(0, 7, (6,), generator=g)
    soft_ce = F.cross_entropy(zs / t, F.softmax(zt / t, dim=1))  # no T² factor
    assert ofa_loss(zs, zt, target_mask(y, 7), 1.0, t).item() == pytest.approx(soft_ce.item(), abs=1e-6)


@pytest.mark.parametrize("eps", [1.0, 1.5])
def test_closed_form_weighting_float64(eps):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(5, 4, generator=g) * 2, torch.randn(5, 4, generator=g) * 2
    y = torch.randint(0, 4, (5,), generator=g)
    a, b = zs.double().numpy(), zt.double().numpy()
    total = 0.0
    for i in range(5):  # element by element: target (1 + p_T,y)^ε − 1, others p_T,c^ε
        p_s = np.exp(a[i]) / np.exp(a[i]).sum()
        p_t = np.exp(b[i]) / np.exp(b[i]).sum()
        w = [(1 + p_t[c]) ** eps - 1 if c == y[i] else p_t[c] ** eps for c in range(4)]
        total += -sum(w[c] * math.log(p_s[c]) for c in range(4))
    assert ofa_loss(zs, zt, target_mask(y, 4), eps).item() == pytest.approx(total / 5, abs=1e-6)


def test_extreme_logits_stay_finite():
    zs = torch.tensor([[200.0, 0.0, 0.0]])
    zt = torch.tensor([[0.0, 1.0, 0.0]])
    loss = ofa_loss(zs, zt, _mask([1], 3), 1.5)
    assert math.isfinite(loss.item())
    p_t = np.exp([0.0, 1.0, 0.0]) / np.exp([0.0, 1.0, 0.0]).sum()
    log_p_s = np.array([0.0, -200.0, -200.0])  # log_softmax of [200, 0, 0] to float precision
    w = np.array([p_t[0] ** 1.5, (1 + p_t[1]) ** 1.5 - 1, p_t[2] ** 1.5])
    assert loss.item() == pytest.approx(float(-(w * log_p_s).sum()), rel=1e-6)


def test_target_mask_uses_argmax_for_mixed_labels():
    soft = torch.tensor([[0.2, 0.7, 0.1], [0.6, 0.0, 0.4]])
    assert torch.equal(target_mask(soft, 3), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(target_mask(torch.tensor([2, 0]), 3), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(MethodError, match="labels must be"):
        target_mask(torch.zeros(2, 3, 4), 3)


# -- heads and taps at the official 224-px sizes ------------------------------------------------------
def _head_params(student, teacher_dim: int) -> int:
    taps = plan_taps(student)
    infos = stage_infos(student, taps)
    heads = [
        build_branch_head(i, s, len(infos), student.num_features, teacher_dim, 100, taps.token, taps.num_prefix_tokens)
        for s, i in enumerate(infos, start=1)
    ]
    return sum(count_params(h) for h in heads)


def test_head_parameter_counts_equal_the_official_modules():
    resnet18 = timm.create_model("resnet18", num_classes=100)
    assert _head_params(resnet18, 192) == 1_194_384  # ← deit_tiny
    assert _head_params(resnet18, 768) == 1_626_256  # ← swin_tiny, mixer_b16
    assert round(_head_params(timm.create_model("deit_tiny_patch16_224", num_classes=100), 768) / 1e6, 2) == 3.78
    assert round(_head_params(timm.create_model("mobilenetv2_100", num_classes=100), 384) / 1e6, 2) == 2.53


def test_stage_taps_at_224():
    x = torch.zeros(1, 3, 224, 224)
    expected = {
        "resnet18": [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
        "mobilenetv2_100": [(24, 56, 56), (32, 28, 28), (96, 14, 14), (1280, 7, 7)],
        "deit_tiny_patch16_224": [(197, 192)] * 4,
    }
    for name, shapes in expected.items():
        model = timm.create_model(name, num_classes=10).eval()
        taps = plan_taps(model)
        with torch.no_grad():
            _, feats = taps.run(model, x)
        assert [tuple(f.shape[1:]) for f in feats] == shapes, name
    deit = timm.create_model("deit_tiny_patch16_224", num_classes=10)
    taps = plan_taps(deit)
    assert taps.indices == (1, 3, 9, 11) and taps.num_prefix_tokens == 1  # blocks 2, 4, 10, 12
    assert stage_infos(deit, taps)[0] == StageInfo(192, 0, 14)
    head = build_branch_head(StageInfo(192, 0, 14), 1, 4, 192, 768, 10, True, 1)
    assert len(head.merge) == 1 and len(head.blocks) == 3


def test_downsample_rule_generalises_the_official_one():
    for name in ("resnet18", "mobilenetv2_100"):
        model = timm.create_model(name, num_classes=10)
        assert [i.downsamples for i in stage_infos(model, plan_taps(model))] == [3, 2, 1, 0]  # 4 − s
    resnet20 = create_model("resnet20", num_classes=10)
    infos = stage_infos(resnet20, plan_taps(resnet20))
    assert [i.downsamples for i in infos] == [2, 1, 0]
    heads = [build_branch_head(i, s, 3, 64, 64, 10, False) for s, i in enumerate(infos, start=1)]
    assert [len(h.body) for h in heads[:2]] == [2, 1]
    assert isinstance(heads[2].body[0], torch.nn.Conv2d) and heads[2].body[0].bias is not None


def test_isotropic_tap_rule():
    assert isotropic_taps(12) == [2, 4, 10, 12]
    assert isotropic_taps(6) == [1, 2, 5, 6]
    assert isotropic_taps(4) == [1, 3, 4]


# -- every student family, tiny -----------------------------------------------------------------------
def _families():
    return {
        "timm_resnet": (lambda: timm.create_model("resnet10t", num_classes=5), (3, 32, 32)),
        "timm_mobilenetv2": (lambda: timm.create_model("mobilenetv2_050", num_classes=5), (3, 32, 32)),
        "vit": (
            lambda: VisionTransformer(img_size=16, patch_size=2, embed_dim=16, depth=6, num_heads=2, num_classes=5),
            (3, 16, 16),
        ),
        "swin": (
            lambda: SwinTransformer(
                img_size=56,
                patch_size=2,
                embed_dim=8,
                depths=(1, 1, 1),
                num_heads=(1, 1, 1),
                window_size=7,
                num_classes=5,
            ),
            (3, 56, 56),
        ),
        "mixer": (lambda: MlpMixer(img_size=16, patch_size=2, embed_dim=16, num_blocks=4, num_classes=5), (3, 16, 16)),
        "resmlp": (
            lambda: MlpMixer(
                img_size=16,
                patch_size=2,
                embed_dim=16,
                num_blocks=4,
                mlp_ratio=4,
                block_layer=ResBlock,
                norm_layer=Affine,
                num_classes=5,
            ),
            (3, 16, 16),
        ),
        "convnext": (
            lambda: timm.create_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5),
            (3, 32, 32),
        ),
        "cifar_resnet": (lambda: create_model("resnet8", num_classes=5), (3, 32, 32)),
        "cifar_mobilenetv2": (lambda: create_model("mobilenetv2", num_classes=5), (3, 32, 32)),
        "zoo_vit": (lambda: create_model("vit_micro_p2_8", num_classes=5, in_chans=1), (1, 8, 8)),
        "zoo_mixer": (lambda: create_model("mixer_micro_p4_28", num_classes=5, in_chans=1), (1, 28, 28)),
    }


HPARAMS = get_method("ofa").resolve_hparams()


def _module(student, shape, **hp):
    teacher = FrozenTeacher(create_model("resnet8", num_classes=5, in_chans=shape[0]))
    return OFA(student, teacher, num_classes=5, hparams={**HPARAMS, **hp})


@pytest.mark.parametrize("family", list(_families()))
def test_every_family_heads_give_b_by_k_and_stay_out_of_the_student(family):
    torch.manual_seed(0)
    make, shape = _families()[family]
    student = make()
    fresh = copy.deepcopy(student)
    module = _module(student, shape)
    x = torch.randn(3, *shape)
    student.eval()
    with torch.no_grad():
        final, feats = module.taps.run(student, x)
        assert torch.allclose(student.forward_head(final), student(x), atol=1e-5)  # one pass, same logits
    assert len(feats) == len(module.heads) >= 3
    for feat, head in zip(feats, module.heads.values(), strict=True):
        assert tuple(head(feat).shape) == (3, 5)
    assert not any(k.startswith("heads") for k in module.student.state_dict())
    assert module.student.state_dict().keys() == fresh.state_dict().keys()
    assert count_params(module.student) == count_params(fresh)
    assert count_params(module.adapter_parameters()) == count_params(module.heads) > 0


def test_module_sums_branch_terms_and_ofa_weight_zero_drops_them():
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=5)
    module = _module(student, (3, 32, 32), eps=[1.0, 1.5, 1.0, 1.5], ofa_weight=0.5)
    module.teacher.model.forward_intermediates = None  # the teacher signal is its logits only
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3])}
    module.eval()  # BN in eval: repeated passes give the same numbers
    with torch.no_grad():
        terms = module.losses(batch)
        final, feats = module.taps.run(student, batch["image"])
        z_t = module.teacher.logits(batch["image"])
        mask = target_mask(batch["label"], 5)
        branch = [
            ofa_loss(module.heads[str(s)](feats[s - 1]), z_t, mask, e)
            for s, e in zip((1, 2, 3), (1.0, 1.5, 1.0), strict=True)
        ]
        assert terms["ofa"].item() == pytest.approx(0.5 * sum(b.item() for b in branch), rel=1e-5)
        assert terms["kd"].item() == pytest.approx(
            ofa_loss(student.forward_head(final), z_t, mask, 1.5).item(), rel=1e-5
        )
        zero = _module(student, (3, 32, 32), ofa_weight=0.0).losses(batch)
        assert zero["ofa"].item() == 0.0 and set(zero) == {"gt", "kd", "ofa"}
    module.train()
    assert overhead_ratio(module, batch, steps=1, rounds=1)["overhead_vs_student"] > 0  # the runner's timing path
    with pytest.raises(MethodError, match="eps needs 1 or 4 values"):
        _module(student, (3, 32, 32), eps=[1.0, 1.5])
    with pytest.raises(MethodError, match=r"stages must be in 1\.\.3"):
        _module(student, (3, 32, 32), stages=[4])


# token students train with AdamW, as the fmnist CNN -> ViT pairs do (SGD leaves a ViT near chance after 1 epoch)
TOKEN_OPT = {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.05}


def test_ofa_runs_on_a_heterogeneous_digits_pair(teacher_store, tmp_path):
    data = {
        **TINY_PROTOCOL,
        "pairs": [
            *TINY_PROTOCOL["pairs"],
            {"teacher": "resnet14", "student": "vit_micro_p2_8", "optimizer": TOKEN_OPT},
        ],
    }
    path = write_protocol(tmp_path / "tinydigits.yaml", data)
    assert load_protocol(path).hash(load_protocol(path).pairs[0]) == load_protocol(
        write_protocol(tmp_path / "orig.yaml", TINY_PROTOCOL)
    ).hash(load_protocol(path).pairs[0])  # adding a pair keeps the other pairs' records valid
    request = RunRequest(
        protocol=str(path),
        teachers=str(teacher_store),
        results=str(tmp_path / "results"),
        progress=False,
        wandb=False,
        method="ofa",
        pair="resnet14__vit_micro_p2_8",
        epochs=1,
        measure_overhead=False,  # timed below on one step, to keep the test short
    )
    record = run(request, say=lambda m: None)
    assert validate_record(record) == []
    assert record["status"] == "finished"
    assert record["student"]["params"] == count_params(create_model("vit_micro_p2_8", num_classes=10, in_chans=1))
    assert record["adapter_params"] > 0 and record["adapter_flops"] > 0
    assert record["metrics"]["top1"] > 10  # one epoch: above chance


def test_protocol_settings_follow_the_spec():
    """ofa.md §4: CNN students on cifar100-hetero use ofa_w 0.1; imagenet ε 1.5; small protocols all 1."""
    for name, eps, ofa_w in (("cifar100-hetero", 1.0, 0.1), ("imagenet", 1.5, 1.0), ("fmnist", 1.0, 1.0)):
        protocol = load_protocol(name)
        for pair in protocol.pairs:
            hp = get_method("ofa").resolve_hparams(protocol.methods.get("ofa"), pair.methods.get("ofa"))
            assert (hp["eps"], hp["temperature"], hp["gt_weight"], hp["kd_weight"]) == (eps, 1.0, 1.0, 1.0)
            token_student = pair.student.startswith(("deit_", "resmlp_"))  # ViT/MLP students: code defaults
            assert hp["ofa_weight"] == (1.0 if token_student else ofa_w), (name, pair.name)
    for name in ("digits", "fmnist"):
        students = {p.student for p in load_protocol(name).pairs}
        teachers = {p.teacher for p in load_protocol(name).pairs}
        assert any(s.startswith(("vit_", "mixer_")) for s in students)  # CNN → ViT / MLP
        assert any(t.startswith("vit_") for t in teachers)  # ViT → CNN
