"""CIFAR VGGs (Simonyan & Zisserman 2015) with BatchNorm, as RepDistiller/mdistiller define them
(`models/vgg.py`, the `vgg*_bn` constructors that their `vgg8`…`vgg19` names resolve to).

Five blocks of 3×3 conv (with bias) + BN + ReLU; max-pool 2×2 between blocks 0→1, 1→2 and 2→3 only
(the reference adds a fourth pool only for 64-px inputs), global average pool, one linear classifier on
512 features — no VGG fully-connected head. Block widths per configuration:

    vgg8  (S): 64 | 128 | 256 | 512 | 512                      (one conv per block)
    vgg11 (A): 64 | 128 | 256×2 | 512×2 | 512×2
    vgg13 (B): 64×2 | 128×2 | 256×2 | 512×2 | 512×2
    vgg16 (D): 64×2 | 128×2 | 256×3 | 512×3 | 512×3
    vgg19 (E): 64×2 | 128×2 | 256×4 | 512×4 | 512×4

Block 0 is the stem; stage i is (pool →) block i, so the stage outputs are the reference's f1…f4.
These names shadow timm's ImageNet `vgg11`…`vgg19` (timm's `vgg*_bn` stay reachable).
"""

from __future__ import annotations

from torch import nn

from .base import StagedNet, init_conv_bn

CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(c_in: int, widths: list[int], pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if pool else []
    for w in widths:
        layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c_in = w
    return nn.Sequential(*layers)


class CifarVGG(StagedNet):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        self.stem = _block(in_chans, cfg[0], pool=False)
        stages, c = [], cfg[0][-1]
        for i, widths in enumerate(cfg[1:]):
            stages.append(_block(c, widths, pool=i < 3))
            c = widths[-1]
        self.stages = nn.ModuleList(stages)
        self.final = nn.Identity()
        self._finish_init(cfg[0][-1], [w[-1] for w in cfg[1:]], [1, 2, 4, 8, 8], num_classes)
        init_conv_bn(self, linear_std=0.01)


def register_all(register) -> None:
    for name, cfg in CONFIGS.items():
        register(name, lambda c=cfg, **kw: CifarVGG(c, **kw))
