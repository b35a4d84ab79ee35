"""Tiny ViTs and MLP-Mixers for the small protocols: the non-CNN side of heterogeneous pairs.

They are timm's own `VisionTransformer` (class token, learned position embedding, token pooling) and
`MlpMixer` classes at micro sizes, so they carry timm's full feature contract (`forward_intermediates`,
`num_prefix_tokens`, `feature_info`) unchanged:

- `vit_micro_p4_28` / `mixer_micro_p4_28`: 28×28 inputs (fmnist), patch 4 → a 7×7 token grid,
  width 64, depth 6 (ViT: 4 heads, MLP ratio 2; Mixer: timm's MLP ratios 0.5/4).
- `vit_micro_p2_8` / `mixer_micro_p2_8`: 8×8 inputs (digits), patch 2 → a 4×4 grid, width 32, depth 4.
"""

from __future__ import annotations

from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer

_SIZES = {"p4_28": (28, 4, 64, 6), "p2_8": (8, 2, 32, 4)}  # img size, patch, width, depth


def _vit(img: int, patch: int, dim: int, depth: int, **kw) -> VisionTransformer:
    return VisionTransformer(
        img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=4, mlp_ratio=2.0, **kw
    )


def _mixer(img: int, patch: int, dim: int, depth: int, **kw) -> MlpMixer:
    return MlpMixer(img_size=img, patch_size=patch, embed_dim=dim, num_blocks=depth, **kw)


def register_all(register) -> None:
    for tag, size in _SIZES.items():
        register(f"vit_micro_{tag}", lambda s=size, **kw: _vit(*s, **kw))
        register(f"mixer_micro_{tag}", lambda s=size, **kw: _mixer(*s, **kw))
