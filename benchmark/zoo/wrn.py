"""Wide ResNets (Zagoruyko & Komodakis 2016) as defined by RepDistiller/mdistiller (`models/wrn.py`):
pre-activation BasicBlocks, widths 16·k/32·k/64·k, depth = 6n + 4, 1×1-conv shortcuts without BN,
final BN + ReLU. Names wrn_{depth}_{k}: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import StagedNet, init_conv_bn


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(StagedNet):
    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages, c = [], widths[0]
        for i, w in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(*[PreActBlock(c if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)])
            )
            c = w
        self.stages = nn.ModuleList(stages)
        self.final = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True))
        self._finish_init(widths[0], widths[1:], [1, 1, 2, 4], num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)


def register_all(register) -> None:
    for depth, widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
        register(f"wrn_{depth}_{widen}", lambda d=depth, k=widen, **kw: WideResNet(d, k, **kw))
