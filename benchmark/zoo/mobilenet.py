"""MobileNets: the CIFAR MobileNetV2 of RepDistiller/mdistiller and mdistiller's ImageNet MobileNetV1.

`mobilenetv2` is RepDistiller's `mobile_half` (`models/mobilenetv2.py`), the network mdistiller's
CIFAR-100 pairs call "MobileNetV2" (Sandler et al. 2018, width 0.5, expansion 6): a stride-2 3×3 stem
of 16 channels, seven groups of inverted residuals with (expansion, width, repeats, stride) =
(1, 8, 1, 1), (6, 12, 2, 1), (6, 16, 3, 2), (6, 32, 4, 2), (6, 48, 3, 1), (6, 80, 3, 2),
(6, 160, 1, 1), a 1×1 conv to 1280 channels and a linear classifier. As in the reference, every
inverted residual has its 1×1 expansion conv, also when the expansion is 1. The four stages group the
residual groups as the reference's feature taps do: {0, 1}, {2}, {3, 4}, {5, 6}.

`mobilenetv1` is the ImageNet MobileNetV1 (Howard et al. 2017, width 1.0) that mdistiller's
ResNet50 → MobileNetV1 pair uses (`mdistiller/models/imagenet/mobilenetv1.py`): a stride-2 3×3 stem of
32 channels and 13 depthwise-separable blocks; stages end where mdistiller taps features
(128/256/512/1024 channels at strides 4/8/16/32).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import StagedNet, init_conv_bn


def conv_bn_act(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list:
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return [*layers, nn.ReLU(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            *conv_bn_act(c_in, hidden, 1),
            *conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            *conv_bn_act(hidden, c_out, 1, act=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion, width, repeats, stride) at width multiplier 1; `mobile_half` halves the widths
_MBV2_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
_MBV2_STAGES = [(0, 1), (2,), (3, 4), (5, 6)]


class CifarMobileNetV2(StagedNet):
    def __init__(self, width_mult: float = 0.5, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        c = int(32 * width_mult)
        self.stem = nn.Sequential(*conv_bn_act(in_chans, c, 3, 2))
        groups, reductions, r = [], [2], 2
        for t, width, n, s in _MBV2_SETTING:
            w = int(width * width_mult)
            groups.append(
                nn.Sequential(*[InvertedResidual(c if j == 0 else w, w, s if j == 0 else 1, t) for j in range(n)])
            )
            c, r = w, r * s
            reductions.append(r)
        self.stages = nn.ModuleList(nn.Sequential(*(groups[g] for g in stage)) for stage in _MBV2_STAGES)
        stage_chs = [stage[-1][-1].conv[-1].num_features for stage in self.stages]
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.final = nn.Sequential(*conv_bn_act(c, last, 1))
        self._finish_init(
            int(32 * width_mult), stage_chs, [2] + [reductions[s[-1] + 1] for s in _MBV2_STAGES], num_classes, last
        )
        init_conv_bn(self, linear_std=0.01)


# (output width, stride) of the 13 depthwise-separable blocks, grouped into mdistiller's four stages
_MBV1_STAGES = [
    [(64, 1), (128, 2), (128, 1)],
    [(256, 2), (256, 1)],
    [(512, 2)] + [(512, 1)] * 5,
    [(1024, 2), (1024, 1)],
]


class MobileNetV1(StagedNet):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_act(in_chans, 32, 3, 2))
        stages, c = [], 32
        for spec in _MBV1_STAGES:
            blocks = []
            for w, s in spec:
                blocks.append(nn.Sequential(*conv_bn_act(c, c, 3, s, groups=c), *conv_bn_act(c, w, 1)))
                c = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.final = nn.Identity()
        # PyTorch's default initialisation, as in mdistiller's definition
        self._finish_init(32, [spec[-1][0] for spec in _MBV1_STAGES], [2, 4, 8, 16, 32], num_classes)


def register_all(register) -> None:
    register("mobilenetv2", lambda **kw: CifarMobileNetV2(0.5, **kw))
    register("mobilenetv1", lambda **kw: MobileNetV1(**kw))
