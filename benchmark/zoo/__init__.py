"""The model zoo: `create_model(name, num_classes=..., in_chans=...)` builds any model by name.

The suite's CIFAR-scale networks are registered here; any other name is passed to
`timm.create_model`. Every model follows timm's feature contract (`forward_intermediates`,
`forward_head(pre_logits=True)`, `feature_info`, `get_classifier`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import timm
from torch import nn

from ..errors import BenchmarkError
from . import cifar_resnet, cifar_resnet50, detection, mae_vit, mobilenet, shufflenet, tiny_token, vgg, wrn
from .convert import StateDictMismatchError, adopt_state_dict

__all__ = [
    "StateDictMismatchError",
    "UnknownModelError",
    "adopt_state_dict",
    "create_model",
    "is_model",
    "list_models",
    "register_model",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    _MODELS[name] = factory


for _family in (cifar_resnet, cifar_resnet50, wrn, vgg, mobilenet, shufflenet, tiny_token, mae_vit, detection):
    _family.register_all(register_model)


class UnknownModelError(BenchmarkError):
    pass


def list_models() -> list[str]:
    return sorted(_MODELS)


def _zoo_name(name: str) -> str:
    """A zoo name with an optional `.tag` (a teacher kind such as `mae_vit_tiny_p2_8.mae`) → the zoo name."""
    base = name.rpartition(".")[0]
    return base if name not in _MODELS and base in _MODELS else name


def is_model(name: str) -> bool:
    return _zoo_name(name) in _MODELS or timm.is_model(name)


def create_model(
    name: str, num_classes: int = 1000, in_chans: int = 3, pretrained: bool = False, **kwargs
) -> nn.Module:
    name = _zoo_name(name)
    if name in _MODELS:
        if pretrained:
            raise BenchmarkError(f"{name!r} has no pretrained weights; import a checkpoint instead")
        return _MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    if timm.is_model(name):
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    close = difflib.get_close_matches(name, list(_MODELS) + timm.list_models(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: not in the distillbench zoo ({', '.join(list_models()[:12])}, ...) nor in timm.{hint}"
    )
