"""MAE-style ViTs (He et al., CVPR 2022; spec shared/methods/dmae.md §1): one model for masked pre-training,
distillation and fine-tuning.

`MaeViT` is timm's `VisionTransformer` (so it keeps timm's contract: `forward_intermediates`,
`forward_head(pre_logits=True)`, `feature_info`, `group_matcher` for layer-wise lr decay) with MAE's fixed
2-D sin-cos positional embedding, MAE's initialisation, and MAE's decoder. Parameter names are the official
MAE ones (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.i.*`, `norm`, `mask_token`,
`decoder_embed`, `decoder_pos_embed`, `decoder_blocks.i.*`, `decoder_norm`, `decoder_pred`, and the
fine-tuned model's `fc_norm`, `head`), so official checkpoints load by name.

Classification (`forward`) sees the whole image: with `global_pool="avg"` (MAE's fine-tuning default) the
patch tokens are averaged before the final norm and `fc_norm` normalises the pooled vector; with
`global_pool="token"` the CLS token after `norm` is classified. MIM paths:

- `forward_masked(x, ids_keep, indices)` → (final-normed tokens, [block outputs at `indices`]), on CLS +
  the visible patches `ids_keep` (B, n) (None: all patches); `stop_early=True` stops after the last
  requested block and returns None as the first element (DMAE's truncated teacher).
- `forward_encoder(x, mask_ratio, indices, noise)` → (latent, mask, ids_restore, features): MAE's
  `random_masking` then `forward_masked`.
- `forward_decoder(latent, ids_restore, indices, depth)` → (pixel predictions (B, L, p²·C) without CLS,
  [decoder block outputs at `indices`, (B, 1 + L, D_dec), before `decoder_norm`]); `depth` runs only the
  first `depth` decoder blocks and returns None for the predictions (G2SD's truncated teacher decoder).

timm's `forward_intermediates` is inherited unchanged (its final output is after `norm`, also with average
pooling, where `forward_features` stops before `norm` as MAE's fine-tuned model has none).

`mim_parameters()` / `classifier_parameters()` name the parts that only one of the two uses; the MAE
pre-training and fine-tuning modules freeze the other part so DDP never sees an unused parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import DropPath
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ...methods.mae_utils import gather_tokens, random_masking, sincos_2d, unshuffle

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)

#: name → (img size, patch, width, depth, heads, decoder width, decoder depth, decoder heads, mlp ratio)
MAE_SIZES: dict[str, tuple[int, int, int, int, int, int, int, int, float]] = {
    # digits (8×8, patch 2 → 16 patches): student 64-d × 4, teacher 128-d × 6 (dmae.md §7)
    "mae_vit_micro_p2_8": (8, 2, 64, 4, 4, 64, 2, 4, 4.0),
    "mae_vit_tiny_p2_8": (8, 2, 128, 6, 4, 64, 2, 4, 4.0),
    # fmnist (28×28, patch 4 → 49 patches): student 96-d × 4, teacher 192-d × 8 (dmae.md §7)
    "mae_vit_micro_p4_28": (28, 4, 96, 4, 4, 96, 2, 4, 4.0),
    "mae_vit_tiny_p4_28": (28, 4, 192, 8, 4, 96, 2, 4, 4.0),
    # ImageNet (224, patch 16): ViT-S/B/L with the official MAE decoder (512-d × 8 blocks, 16 heads)
    "mae_vit_small_patch16_dec512d8b": (224, 16, 384, 12, 6, 512, 8, 16, 4.0),
    "mae_vit_base_patch16_dec512d8b": (224, 16, 768, 12, 12, 512, 8, 16, 4.0),
    "mae_vit_large_patch16_dec512d8b": (224, 16, 1024, 24, 16, 512, 8, 16, 4.0),
    # G2SD's generic-stage student (g2sd.md §1, official `mae_vit_small_patch16_dec256d4b`): a light decoder
    "mae_vit_small_patch16_dec256d4b": (224, 16, 384, 12, 6, 256, 4, 8, 4.0),
}


class MaeViT(VisionTransformer):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        global_pool: str = "avg",
        drop_path_rate: float = 0.0,
    ):
        if global_pool not in ("avg", "token"):
            raise ValueError(f"MaeViT: global_pool must be 'avg' or 'token', got {global_pool!r}")
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            fc_norm=False,
            norm_layer=LayerNorm6,
            drop_path_rate=drop_path_rate,
            weight_init="skip",
        )
        # MAE keeps the encoder's final norm (the decoder's input) and, for average pooling, adds fc_norm
        self.fc_norm = LayerNorm6(embed_dim) if global_pool == "avg" else nn.Identity()
        self.patch_size = patch_size
        self.in_chans = in_chans
        grid = img_size // patch_size
        self.grid_size = grid
        self.pos_embed.requires_grad_(False)  # fixed during MIM; the fine-tuner may unfreeze it
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm6)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = LayerNorm6(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.initialize_mae_weights()

    # -- initialisation (MAE's `initialize_weights`) -----------------------------------------------
    def initialize_mae_weights(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size)[None])
            self.decoder_pos_embed.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], self.grid_size)[None])
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_mae_module)

    # -- parameter roles -----------------------------------------------------------------------------
    def mim_parameters(self) -> list[nn.Parameter]:
        """Parameters only the MIM paths use: the decoder, the mask token, and `norm` when the head pools."""
        names = ("mask_token", "decoder_")
        params = [p for n, p in self.named_parameters() if n.startswith(names)]
        if self.global_pool == "avg":
            params += list(self.norm.parameters())
        return params

    def classifier_parameters(self) -> list[nn.Parameter]:
        """Parameters only classification uses: `fc_norm` and `head`."""
        return [*self.fc_norm.parameters(), *self.head.parameters()]

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly to `rate` over the encoder blocks (MAE's fine-tuning)."""
        rates = torch.linspace(0, rate, len(self.blocks)).tolist()
        for block, r in zip(self.blocks, rates, strict=True):
            block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
            block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()

    # -- classification ------------------------------------------------------------------------------
    def forward_features(self, x: Tensor, **kwargs) -> Tensor:
        """Whole-image tokens (B, 1 + L, D): after `norm` for a CLS head, before it for average pooling."""
        x = self.blocks(self._pos_embed(self.patch_embed(x)))
        return x if self.global_pool == "avg" else self.norm(x)

    # -- masked image modelling ----------------------------------------------------------------------
    def forward_masked(
        self,
        x: Tensor,
        ids_keep: Tensor | None,
        indices: Sequence[int] | int | None = None,
        stop_early: bool = False,
    ) -> tuple[Tensor | None, list[Tensor]]:
        """Encoder on CLS + the patches `ids_keep`: (final-normed tokens, [pre-norm block outputs at `indices`]).

        `indices` are 0-based block indices (timm style: an int n means the last n blocks); each output is
        (B, 1 + n_visible, D). With `stop_early` no block after the last requested one runs and the first
        element is None."""
        empty = indices is None or (not isinstance(indices, int) and len(indices) == 0)
        take, max_index = ([], -1) if empty else feature_take_indices(len(self.blocks), indices)
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        blocks = self.blocks[: max_index + 1] if stop_early and take else self.blocks
        feats = []
        for i, block in enumerate(blocks):
            tokens = block(tokens)
            if i in take:
                feats.append(tokens)
        if stop_early:
            return None, feats
        return self.norm(tokens), feats

    def forward_encoder(
        self,
        x: Tensor,
        mask_ratio: float,
        indices: Sequence[int] | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """MAE's encoder: (latent (B, 1 + n, D), mask (B, L), ids_restore (B, L), [block outputs])."""
        if noise is None:
            noise = torch.rand(x.shape[0], self.patch_embed.num_patches, device=x.device)
        ids_keep, ids_restore, mask = random_masking(noise, mask_ratio)
        latent, feats = self.forward_masked(x, ids_keep, indices)
        return latent, mask, ids_restore, feats

    def forward_decoder(
        self,
        latent: Tensor,
        ids_restore: Tensor,
        indices: Sequence[int] | None = None,
        depth: int | None = None,
    ) -> tuple[Tensor | None, list[Tensor]]:
        """MAE's decoder on the encoder's final-normed tokens: (pixels (B, L, p²·C), [block outputs]).

        Mask tokens fill the removed positions, ids_restore unshuffles (CLS stays first), the decoder's
        positional embedding is added; block outputs at `indices` are (B, 1 + L, D_dec) before
        `decoder_norm`. `depth` < decoder depth runs only that many blocks and returns None for pixels."""
        full = len(self.decoder_blocks)
        depth = full if depth is None else depth
        if not 0 <= depth <= full:
            raise ValueError(f"decoder depth {depth} is outside 0..{full}")
        take = set(indices or [])
        x = self.decoder_embed(latent)
        x = torch.cat([x[:, :1], unshuffle(x[:, 1:], self.mask_token, ids_restore)], dim=1)
        x = x + self.decoder_pos_embed
        feats = []
        for i, block in enumerate(self.decoder_blocks[:depth]):
            x = block(x)
            if i in take:
                feats.append(x)
        if depth < full:
            return None, feats
        return self.decoder_pred(self.decoder_norm(x))[:, 1:], feats


def _init_mae_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def create_mae_vit(name: str, *, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> MaeViT:
    img, patch, dim, depth, heads, ddim, ddepth, dheads, mlp = MAE_SIZES[name]
    return MaeViT(
        img_size=kwargs.pop("img_size", img),
        patch_size=patch,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp,
        decoder_embed_dim=ddim,
        decoder_depth=ddepth,
        decoder_num_heads=dheads,
        **kwargs,
    )


def register_mae_size(register, name: str, size: tuple) -> None:
    """Add an MAE-ViT size (same tuple layout as `MAE_SIZES`) to the zoo under `name`."""
    MAE_SIZES[name] = tuple(size)
    register(name, partial(create_mae_vit, name))


def register_all(register) -> None:
    for name in list(MAE_SIZES):
        register(name, partial(create_mae_vit, name))
