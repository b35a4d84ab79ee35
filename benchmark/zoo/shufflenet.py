"""CIFAR ShuffleNets as RepDistiller/mdistiller define them (`models/ShuffleNetv1.py`,
`models/ShuffleNetv2.py`; mdistiller's "ShuffleV1"/"ShuffleV2").

Both use a 1×1 stem of 24 channels (BN + ReLU, no stride, no max-pool) and three stages that each
halve the resolution, then global average pooling and a linear classifier.

- `shufflenet_v1` (Zhang et al. 2018, g = 3): stages of 4/8/4 bottlenecks reaching 240/480/960
  channels. A bottleneck is grouped 1×1 (ungrouped when its input is the 24-channel stem) → channel
  shuffle → depthwise 3×3 → grouped 1×1 at a quarter of the output width; the first block of a stage
  has stride 2 and concatenates a 3×3 average-pooled shortcut, the others add the identity.
- `shufflenet_v2` (Ma et al. 2018, 1×): each stage is a down-sampling unit followed by 3/7/3 basic
  units (116/232/464 channels), then a 1×1 conv to 1024 channels. A basic unit splits the channels in
  half and transforms the second half (1×1 → depthwise 3×3 → 1×1), a down-sampling unit runs two
  stride-2 branches on the whole input; both concatenate and shuffle with 2 groups. The reference
  uses no ReLU after the basic unit's depthwise conv, but does after its final 1×1 conv; likewise
  here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StagedNet


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _stem(in_chans: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chans, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))


class ShuffleV1Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        branch_out = c_out - c_in if stride == 2 else c_out  # a stride-2 block concatenates its input
        mid = branch_out // 4
        self.first_groups = 1 if c_in == 24 else groups
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class CifarShuffleNetV1(StagedNet):
    def __init__(
        self,
        widths: tuple[int, ...] = (240, 480, 960),
        blocks: tuple[int, ...] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
    ):
        super().__init__()
        self.stem = _stem(in_chans)
        stages, c = [], 24
        for w, n in zip(widths, blocks, strict=True):
            stages.append(
                nn.Sequential(*[ShuffleV1Block(c if j == 0 else w, w, 2 if j == 0 else 1, groups) for j in range(n)])
            )
            c = w
        self.stages = nn.ModuleList(stages)
        self.final = nn.Identity()
        self._finish_init(24, list(widths), [1, 2, 4, 8], num_classes)


class ShuffleV2Unit(nn.Module):
    """Basic unit: transform the second half of the channels, keep the first, concatenate, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        keep, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return channel_shuffle(torch.cat([keep, out], 1), 2)


class ShuffleV2Down(nn.Module):
    """Down-sampling unit: two stride-2 branches over the whole input, concatenated and shuffled."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        # left: depthwise 3×3 (stride 2) → 1×1
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: 1×1 → depthwise 3×3 (stride 2) → 1×1
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class CifarShuffleNetV2(StagedNet):
    def __init__(
        self,
        widths: tuple[int, ...] = (116, 232, 464),
        blocks: tuple[int, ...] = (3, 7, 3),
        last: int = 1024,
        num_classes: int = 100,
        in_chans: int = 3,
    ):
        super().__init__()
        self.stem = _stem(in_chans)
        stages, c = [], 24
        for w, n in zip(widths, blocks, strict=True):
            stages.append(nn.Sequential(ShuffleV2Down(c, w), *[ShuffleV2Unit(w) for _ in range(n)]))
            c = w
        self.stages = nn.ModuleList(stages)
        self.final = nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True))
        self._finish_init(24, list(widths), [1, 2, 4, 8], num_classes, last)


def register_all(register) -> None:
    register("shufflenet_v1", lambda **kw: CifarShuffleNetV1(**kw))
    register("shufflenet_v2", lambda **kw: CifarShuffleNetV2(**kw))
