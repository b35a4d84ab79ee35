"""The model zoo: published parameter counts and timm's feature contract."""

from __future__ import annotations

import pytest
import torch
from distillbench.benchmark.zoo import UnknownModelError, create_model, is_model

# RepDistiller / mdistiller CIFAR-100 parameter counts (100 classes, 3 input channels)
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
}


@pytest.mark.parametrize(("name", "count"), sorted(PARAMS.items()))
def test_parameter_counts(name, count):
    model = create_model(name, num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == count


def test_depth_space_contains_resnet20():
    a, b = create_model("resnet_depth_333", num_classes=100), create_model("resnet20", num_classes=100)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert is_model("resnet_depth_157") and not is_model("resnet_depth_222")


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "wrn_16_1", "wrn_40_2"])
def test_timm_feature_contract(name):
    model = create_model(name, num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == len(model.feature_info)
    for feat, info in zip(inter, model.feature_info, strict=True):
        assert feat.shape[1] == info["num_chs"]
        assert feat.shape[-1] == -(-28 // info["reduction"])
    emb = model.forward_head(final, pre_logits=True)
    assert emb.shape == (2, model.num_features)
    torch.testing.assert_close(model.get_classifier()(emb), model(x))
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    assert len(model.forward_intermediates(x, indices=[-1], intermediates_only=True)) == 1
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_timm_names_pass_through():
    model = create_model("resnet10t", num_classes=7).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_model_suggests_names():
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet9x4'.*Did you mean"):
        create_model("resnet9x4")
