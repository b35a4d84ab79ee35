"""Adopt a state_dict saved by the reference implementations (RepDistiller / mdistiller / CRD teachers).

The zoo's networks create their layers in the same order as the reference definitions they follow
(`models/*.py` of RepDistiller, `mdistiller/models/{cifar,imagenet}/*.py`); only the module names differ
(`stages.0.1.conv1` for `layer1.1.conv1`). A reference state_dict therefore maps onto ours position by
position, and every tensor's shape must agree — a different architecture fails with the first mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..errors import BenchmarkError


class StateDictMismatchError(BenchmarkError):
    pass


def adopt_state_dict(model: nn.Module, foreign: Mapping[str, Tensor], arch: str = "model") -> dict[str, Tensor]:
    """`foreign`'s tensors re-keyed to `model.state_dict()`'s names, matched by position and shape.

    A leading `module.` (DataParallel/DDP) is ignored. Raises StateDictMismatchError when the number of
    entries or any shape differs, naming both keys.
    """
    ours = model.state_dict()
    theirs = [(k.removeprefix("module."), v) for k, v in foreign.items()]
    if len(theirs) != len(ours):
        raise StateDictMismatchError(
            f"checkpoint has {len(theirs)} tensors, {arch} has {len(ours)}: not the same architecture"
        )
    adopted = {}
    for (key, ref), (their_key, value) in zip(ours.items(), theirs, strict=True):
        if tuple(value.shape) != tuple(ref.shape):
            raise StateDictMismatchError(
                f"checkpoint tensor {their_key!r} {tuple(value.shape)} does not fit {arch}'s {key!r} "
                f"{tuple(ref.shape)}: not the same architecture, or not in the reference layer order"
            )
        adopted[key] = value
    return adopted
