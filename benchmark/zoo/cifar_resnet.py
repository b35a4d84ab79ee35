"""CIFAR ResNets of He et al. 2016 (§4.2) as defined by RepDistiller/mdistiller (`models/resnet.py`):
3×3 stem, three stages of BasicBlocks at strides 1, 2, 2, 1×1-conv+BN projection shortcuts.

Names: resnet{8,14,20,32,44,56,110} (widths 16/16/32/64), resnet8x4 and resnet32x4 (32/64/128/256),
and DisWOT's search spaces (../shared/methods/diswot.md §2): resnet_depth_XYZ with X, Y, Z BasicBlocks
per stage and widths 16/16/32/64, for X, Y, Z ∈ {1, 3, 5, 7} (the paper's S1; resnet_depth_333 is
resnet20) or X, Y, Z ∈ {1, 2, 3} (distillbench's small space), and for the latter also
resnet_depth_XYZ_w50, at half width in the stem and first two stages (8/8/16/64), so every candidate
ends in 64 channels.
"""

from __future__ import annotations

from itertools import product

import torch.nn.functional as F
from torch import Tensor, nn

from .base import StagedNet, init_conv_bn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(StagedNet):
    def __init__(
        self, blocks: tuple[int, int, int], widths: tuple[int, int, int, int], num_classes: int = 100, in_chans: int = 3
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, c = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths[1:], strict=True)):
            layers = [BasicBlock(c if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*layers))
            c = w
        self.stages = nn.ModuleList(stages)
        self.final = nn.Identity()
        self._finish_init(widths[0], list(widths[1:]), [1, 1, 2, 4], num_classes)
        init_conv_bn(self)


def _depth_to_blocks(depth: int) -> tuple[int, int, int]:
    n = (depth - 2) // 6
    return (n, n, n)


def register_all(register) -> None:
    for depth in (8, 14, 20, 32, 44, 56, 110):
        register(f"resnet{depth}", lambda d=depth, **kw: CifarResNet(_depth_to_blocks(d), (16, 16, 32, 64), **kw))
    register("resnet8x4", lambda **kw: CifarResNet(_depth_to_blocks(8), (32, 64, 128, 256), **kw))
    register("resnet32x4", lambda **kw: CifarResNet(_depth_to_blocks(32), (32, 64, 128, 256), **kw))
    for blocks in sorted(set(product((1, 3, 5, 7), repeat=3)) | set(product((1, 2, 3), repeat=3))):
        name = "resnet_depth_" + "".join(map(str, blocks))
        register(name, lambda b=blocks, **kw: CifarResNet(b, (16, 16, 32, 64), **kw))
        if max(blocks) <= 3:
            register(f"{name}_w50", lambda b=blocks, **kw: CifarResNet(b, (8, 8, 16, 64), **kw))
