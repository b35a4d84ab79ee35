"""MAE machinery (dmae.md §1, §6 tests 3–4) and the zoo's MAE-ViTs."""

from __future__ import annotations

import math

import pytest
import torch
from distillbench.benchmark.zoo import create_model
from distillbench.methods.errors import MethodError
from distillbench.methods.mae_utils import (
    aligned_block,
    masked_pixel_loss,
    normalize_pixels,
    patchify,
    random_masking,
    sincos_2d,
    unpatchify,
    unshuffle,
)


def test_patchify_layout_matches_mae_on_a_2x2_patch_example():
    # 2 channels, 4×4 image, patch 2 → 4 patches of 2·2·2 values, channels fastest inside a patch
    img = torch.arange(32.0).reshape(1, 2, 4, 4)
    x = patchify(img, 2)
    assert x.shape == (1, 4, 8)
    c0, c1 = img[0, 0], img[0, 1]
    # patch 1 = rows 0–1, columns 2–3; pixel order (0,2), (0,3), (1,2), (1,3), each as (c0, c1)
    expected = [c0[0, 2], c1[0, 2], c0[0, 3], c1[0, 3], c0[1, 2], c1[1, 2], c0[1, 3], c1[1, 3]]
    assert x[0, 1].tolist() == [float(v) for v in expected]
    assert x[0, 2, :2].tolist() == [float(c0[2, 0]), float(c1[2, 0])]  # patch 2 starts at row 2, column 0


def test_patchify_unpatchify_round_trip():
    img = torch.randn(3, 3, 12, 12)
    assert torch.equal(unpatchify(patchify(img, 4), 4, 3), img)
    x = torch.randn(2, 9, 4 * 4 * 3)
    assert torch.equal(patchify(unpatchify(x, 4, 3), 4), x)
    with pytest.raises(MethodError):
        patchify(img, 5)


def test_random_masking_counts_and_restore():
    torch.manual_seed(0)
    noise = torch.rand(4, 10)
    ids_keep, ids_restore, mask = random_masking(noise, 0.75)
    keep = math.floor(10 * 0.25)
    assert ids_keep.shape == (4, keep)
    assert mask.sum(dim=1).tolist() == [10.0 - keep] * 4
    # kept patches are those with the smallest noise, and exactly those have mask 0
    for b in range(4):
        assert set(ids_keep[b].tolist()) == set(torch.argsort(noise[b])[:keep].tolist())
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(ids_keep[b].tolist())
    # gather the kept tokens, pad with fill tokens, unshuffle: kept tokens return to their own positions
    tokens = torch.arange(10.0)[None, :, None].expand(4, 10, 1)
    visible = torch.gather(tokens, 1, ids_keep[..., None])
    restored = unshuffle(visible, torch.full((1, 1, 1), -1.0), ids_restore)[..., 0]
    assert torch.equal(restored == -1, mask.bool())
    assert torch.equal(restored[~mask.bool()], tokens[..., 0][~mask.bool()])
    # ids_restore inverts the shuffle
    assert torch.equal(torch.gather(torch.argsort(noise, 1), 1, ids_restore), torch.arange(10).expand(4, 10))
    # fixed noise → fixed output
    again = random_masking(noise.clone(), 0.75)
    assert all(torch.equal(a, b) for a, b in zip(again, (ids_keep, ids_restore, mask), strict=True))
    with pytest.raises(MethodError):
        random_masking(noise, 1.0)


def test_aligned_block():
    assert [aligned_block(d) for d in (12, 24, 4, 6, 8)] == [8, 17, 2, 4, 5]


def test_sincos_2d_by_hand_on_a_2x2_grid():
    emb = sincos_2d(4, 2)  # width 4: 2 channels for the column, 2 for the row; ω = [1]
    assert emb.shape == (5, 4)
    assert emb[0].tolist() == [0.0, 0.0, 0.0, 0.0]  # CLS
    s1, c1 = math.sin(1.0), math.cos(1.0)
    # tokens (row, col) = (0,0), (0,1), (1,0), (1,1): [sin col, cos col, sin row, cos row]
    expected = [[0, 1, 0, 1], [s1, c1, 0, 1], [0, 1, s1, c1], [s1, c1, s1, c1]]
    assert torch.allclose(emb[1:], torch.tensor(expected, dtype=torch.float32))
    wide = sincos_2d(8, 3, cls_token=False)  # ω = [1, 1/100] per half
    assert torch.allclose(
        wide[5],
        torch.tensor(
            [
                math.sin(2),
                math.sin(0.02),
                math.cos(2),
                math.cos(0.02),
                math.sin(1),
                math.sin(0.01),
                math.cos(1),
                math.cos(0.01),
            ]
        ),
    )


def test_masked_pixel_loss_hand_values():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    assert masked_pixel_loss(pred, target, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(4.0)
    assert masked_pixel_loss(pred, target, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(2.5)
    normed = normalize_pixels(torch.tensor([[[1.0, 3.0]]]))
    assert torch.allclose(normed, torch.tensor([[[-0.7071066, 0.7071066]]]), atol=1e-7)


@pytest.mark.parametrize("name", ["mae_vit_micro_p2_8", "mae_vit_tiny_p4_28"])
def test_mae_vit_paths(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1).eval()
    size = 8 if name.endswith("_8") else 28
    x = torch.randn(2, 1, size, size)
    assert model(x).shape == (2, 10)
    num = model.patch_embed.num_patches
    noise = torch.rand(2, num)
    latent, mask, ids_restore, feats = model.forward_encoder(x, 0.75, indices=[0, 2], noise=noise)
    keep = int(num * 0.25)
    assert latent.shape == (2, 1 + keep, model.embed_dim) and len(feats) == 2
    assert mask.sum().item() == 2 * (num - keep)
    pred, dfeats = model.forward_decoder(latent, ids_restore, indices=[0])
    assert pred.shape == (2, num, model.patch_size**2) and dfeats[0].shape[1] == 1 + num
    # truncated runs give the same features as full ones
    _, early = model.forward_masked(x, random_masking(noise, 0.75)[0], [2], stop_early=True)
    assert torch.equal(early[0], feats[1])
    none, cut = model.forward_decoder(latent, ids_restore, indices=[0], depth=1)
    assert none is None and torch.equal(cut[0], dfeats[0])
    # the positional embeddings are MAE's fixed sin-cos, and the visible tokens carry their own
    assert torch.equal(model.pos_embed[0], sincos_2d(model.embed_dim, model.grid_size))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_mae_vit_official_key_names():
    keys = set(create_model("mae_vit_base_patch16_dec512d8b", num_classes=1000).state_dict())
    for key in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.11.attn.qkv.weight",
        "norm.weight",
        "mask_token",
        "decoder_embed.weight",
        "decoder_pos_embed",
        "decoder_blocks.7.mlp.fc2.bias",
        "decoder_norm.bias",
        "decoder_pred.weight",
        "fc_norm.weight",
        "head.weight",
    ):
        assert key in keys, key
