"""The timm model contract for the suite's own CIFAR-scale networks.

`StagedNet` gives a network built as stem → stages → final (norm/act) → pool → classifier the
methods every distillation method relies on: `forward_intermediates` (final features and the stem
and stage outputs in one pass; index 0 is the stem, as in timm's ResNet), `forward_features`,
`forward_head(pre_logits=True)` (the penultimate embedding), `feature_info`, `get_classifier`,
`reset_classifier`.
"""

from __future__ import annotations

from timm.models._features import feature_take_indices
from torch import Tensor, nn


class StagedNet(nn.Module):
    stem: nn.Module
    stages: nn.ModuleList
    final: nn.Module
    fc: nn.Module

    def _finish_init(
        self,
        stem_chs: int,
        stage_chs: list[int],
        reductions: list[int],
        num_classes: int,
        num_features: int | None = None,
    ) -> None:
        """`num_features` is the width after `final` (the last stage's width unless `final` changes it)."""
        self.num_classes = num_classes
        self.num_features = num_features or stage_chs[-1]
        self.feature_info = [dict(num_chs=stem_chs, reduction=reductions[0], module="stem")] + [
            dict(num_chs=c, reduction=r, module=f"stages.{i}")
            for i, (c, r) in enumerate(zip(stage_chs, reductions[1:], strict=True))
        ]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's contract: index 0 = stem output, i = output of stage i (before the final norm)."""
        if output_fmt != "NCHW":
            raise ValueError("only NCHW output is supported")
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return self.final(x), intermediates

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.final(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def init_conv_bn(module: nn.Module, linear_std: float | None = None) -> None:
    """Kaiming-normal (fan_out, relu) convolutions, unit BN scale, zero bias — RepDistiller's init.

    With `linear_std`, linear layers get N(0, linear_std²) weights and zero bias (RepDistiller's VGG and
    MobileNetV2 use 0.01); conv biases, where present, start at zero.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
