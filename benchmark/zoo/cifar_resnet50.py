"""The CIFAR ResNet-50 of RepDistiller/mdistiller (`models/resnetv2.py`, mdistiller's "ResNet50"): He et
al. 2016's bottleneck ResNet-50 (3/4/6/3 bottlenecks, widths 64/128/256/512 × expansion 4) with a CIFAR
stem — one 3×3 stride-1 conv of 64 channels, no max-pool — so 32-px inputs end at 4×4 with 2048
channels. Projection shortcuts are 1×1 conv + BN.

Registered as `resnet50_cifar`: the plain name `resnet50` stays timm's ImageNet ResNet-50.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import StagedNet, init_conv_bn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarBottleneckResNet(StagedNet):
    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        stages, c = [], 64
        for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    *[Bottleneck(c if j == 0 else 4 * planes, planes, stride if j == 0 else 1) for j in range(n)]
                )
            )
            c = 4 * planes
        self.stages = nn.ModuleList(stages)
        self.final = nn.Identity()
        self._finish_init(64, [256, 512, 1024, 2048], [1, 1, 2, 4, 8], num_classes)
        init_conv_bn(self)


def register_all(register) -> None:
    register("resnet50_cifar", lambda **kw: CifarBottleneckResNet((3, 4, 6, 3), **kw))
