"""The model zoo: published parameter counts, timm's feature contract, FLOP counting, name resolution."""

from __future__ import annotations

import itertools

import pytest
import torch
from distillbench.benchmark.cost import count_flops
from distillbench.benchmark.zoo import (
    StateDictMismatchError,
    UnknownModelError,
    adopt_state_dict,
    create_model,
    is_model,
    list_models,
)
from distillbench.benchmark.zoo.shufflenet import channel_shuffle
from torch import nn

# Exact parameter counts at 100 classes, 3 input channels. The architectures follow the official
# definitions in HobbitLong/RepDistiller `models/` (resnet.py, wrn.py, vgg.py [the *_bn variants],
# mobilenetv2.py [mobile_half], ShuffleNetv1.py, ShuffleNetv2.py, resnetv2.py [ResNet50]) at commit
# eedab9d (mobilenetv2.py: b13aecc), identical to megvii-research/mdistiller
# `mdistiller/models/cifar/`. Rounded, they are the figures the KD literature quotes (CRD, DKD):
# resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2 2.26M, wrn_16_2 0.70M, wrn_40_1 0.57M, resnet56 0.86M,
# resnet110 1.74M, resnet20 0.28M, vgg13 9.46M, MobileNetV2 0.81M, ShuffleV1 0.95M, ShuffleV2 1.36M,
# ResNet50 23.71M; vgg8 is 3,965,028 (quoted truncated as 3.96M; the sum of its layers is checked by
# hand in test_vgg8_count_by_hand).
PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflenet_v1": 949_258,
    "shufflenet_v2": 1_355_528,
    "resnet50_cifar": 23_705_252,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "count"), sorted(PARAMS.items()))
def test_parameter_counts(name, count):
    assert n_params(create_model(name, num_classes=100)) == count


def test_vgg8_count_by_hand():
    # conv3×3 (+bias) + BN (γ, β) per block, widths 3→64→128→256→512→512, then a 512→100 linear
    widths = [3, 64, 128, 256, 512, 512]
    convs = sum(9 * a * b + b + 2 * b for a, b in itertools.pairwise(widths))
    assert convs + 512 * 100 + 100 == PARAMS["vgg8"]


def test_imagenet_counts_match_second_definitions():
    # mdistiller's ImageNet MobileNetV1 (mdistiller/models/imagenet/mobilenetv1.py) has the layers of
    # timm's mobilenetv1_100 (4.23M at 1000 classes); the CIFAR ResNet-50 differs from timm's
    # ImageNet resnet50 only in the stem conv (3×3 instead of 7×7, 64 filters on 3 channels)
    import timm

    assert n_params(create_model("mobilenetv1")) == n_params(timm.create_model("mobilenetv1_100")) == 4_231_976
    stem_diff = 64 * 3 * (7 * 7 - 3 * 3)
    assert PARAMS["resnet50_cifar"] + stem_diff == n_params(timm.create_model("resnet50", num_classes=100))


def test_depth_space_contains_resnet20():
    a, b = create_model("resnet_depth_333", num_classes=100), create_model("resnet20", num_classes=100)
    assert n_params(a) == n_params(b) == PARAMS["resnet20"]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape for k in sa)


def test_diswot_search_spaces():
    # S1 = {1,3,5,7}^3 (64) and the small space {1,2,3}^3 at widths 1.0 and 0.5 (54), overlapping in
    # {1,3}^3 (8): 64 + 27 - 8 + 27 names (../shared/methods/diswot.md §2)
    names = [n for n in list_models() if n.startswith("resnet_depth_")]
    assert len(names) == 64 + 27 - 8 + 27
    assert is_model("resnet_depth_157") and is_model("resnet_depth_222_w50")
    assert not is_model("resnet_depth_227") and not is_model("resnet_depth_555_w50")
    for name, blocks, widths in [
        ("resnet_depth_157", [1, 5, 7], [16, 32, 64]),
        ("resnet_depth_213_w50", [2, 1, 3], [8, 16, 64]),
    ]:
        model = create_model(name, num_classes=10)
        assert [len(s) for s in model.stages] == blocks
        assert [i["num_chs"] for i in model.feature_info[1:]] == widths and model.num_features == 64
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) + 1 == 2 * sum(blocks) + 2  # depth: 3×3 convs + the classifier


# (name, in_chans, input size): one or two per family; 28 px checks odd maps on the residual nets
CONTRACT_CASES = [
    ("resnet8", 1, 28),
    ("resnet_depth_135", 3, 32),
    ("resnet8x4", 3, 32),
    ("wrn_16_1", 1, 28),
    ("vgg8", 3, 32),
    ("mobilenetv2", 3, 32),
    ("shufflenet_v1", 1, 32),
    ("shufflenet_v2", 3, 32),
    ("resnet50_cifar", 3, 16),
    ("mobilenetv1", 3, 64),
]


@pytest.mark.parametrize(("name", "in_chans", "size"), CONTRACT_CASES)
def test_timm_feature_contract(name, in_chans, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=in_chans).eval()
    assert model.num_classes == 10
    x = torch.randn(2, in_chans, size, size)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == len(model.feature_info)
    for feat, info in zip(inter, model.feature_info, strict=True):
        assert feat.shape[1] == info["num_chs"]
        assert feat.shape[-1] == -(-size // info["reduction"])
        assert isinstance(model.get_submodule(info["module"]), nn.Module)
    assert final.shape[1] == model.num_features
    emb = model.forward_head(final, pre_logits=True)
    assert emb.shape == (2, model.num_features)
    logits = model(x)
    torch.testing.assert_close(model.forward_head(final), logits)
    torch.testing.assert_close(model.get_classifier()(emb), logits)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
    last = model.forward_intermediates(x, indices=[-1], intermediates_only=True)
    assert len(last) == 1 and last[0].shape == inter[-1].shape
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)


def _fvcore_convention(model: nn.Module, x: torch.Tensor) -> int:
    """fvcore's count from layer shapes (a second formulation): one per multiply-add of conv and linear
    layers, two per element of an inference BatchNorm, one per input element of global average pooling."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * k * module.in_channels // module.groups
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.BatchNorm2d):
            total += 2 * output.numel()
        else:
            total += inputs[0].numel()

    kinds = nn.Conv2d | nn.Linear | nn.BatchNorm2d | nn.AdaptiveAvgPool2d
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["vgg8", "mobilenetv2", "shufflenet_v2"])
def test_fvcore_flops(name):
    # grouped/depthwise convs and the channel shuffle's view/transpose must trace through fvcore
    model = create_model(name, num_classes=100)
    assert count_flops(model, (3, 32, 32)) == _fvcore_convention(model, torch.zeros(1, 3, 32, 32))


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]


def test_timm_names_pass_through():
    model = create_model("resnet10t", num_classes=7).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    # the CIFAR ResNet-50 is resnet50_cifar; plain resnet50 stays timm's ImageNet network (7×7 stem)
    assert create_model("resnet50", num_classes=10).conv1.kernel_size == (7, 7)


def test_unknown_model_suggests_names():
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet9x4'.*Did you mean"):
        create_model("resnet9x4")
    with pytest.raises(UnknownModelError, match=r"shufflenet_v2"):
        create_model("shufflenet_v3")


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _repdistiller_resnet8x4_keys() -> list[str]:
    """Key names of RepDistiller's `resnet8x4` (models/resnet.py: conv1, bn1, layer1-3 of one BasicBlock
    each, every one with a 1×1 downsample since the widths go 32 → 64 → 128 → 256, then fc)."""
    keys = ["conv1.weight", *_bn("bn1")]
    for layer in (1, 2, 3):
        b = f"layer{layer}.0"
        keys += [f"{b}.conv1.weight", *_bn(f"{b}.bn1"), f"{b}.conv2.weight", *_bn(f"{b}.bn2")]
        keys += [f"{b}.downsample.0.weight", *_bn(f"{b}.downsample.1")]
    return [*keys, "fc.weight", "fc.bias"]


def test_adopt_reference_state_dict():
    torch.manual_seed(0)
    source = create_model("resnet8x4", num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref_keys = _repdistiller_resnet8x4_keys()
    foreign = {f"module.{k}": v for k, v in zip(ref_keys, source.state_dict().values(), strict=True)}
    target = create_model("resnet8x4", num_classes=100).eval()
    target.load_state_dict(adopt_state_dict(target, foreign, "resnet8x4"))
    torch.testing.assert_close(target(x), source(x))

    with pytest.raises(StateDictMismatchError, match="24 tensors, resnet20 has"):
        adopt_state_dict(create_model("resnet20", num_classes=100), dict(list(foreign.items())[:24]), "resnet20")
    with pytest.raises(StateDictMismatchError, match=r"'fc.weight' \(100, 256\) does not fit resnet8x4's 'fc.weight'"):
        adopt_state_dict(create_model("resnet8x4", num_classes=10), foreign, "resnet8x4")


def test_every_protocol_pair_resolves():
    from distillbench.benchmark.protocol import list_protocols, load_protocol

    for name in list_protocols():
        for pair in load_protocol(name).pairs:
            assert is_model(pair.teacher) and is_model(pair.student), f"{name}: {pair.name}"
