"""G2SD and Hybrid Distill pure functions: hand values, second formulations, invariants (g2sd.md §6,
hybrid.md §6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from distillbench.methods.errors import MethodError
from distillbench.methods.g2sd import DistTokenViT, generic_loss, nkd_loss, specific_loss
from distillbench.methods.hybrid import (
    attention_distance,
    attention_logits,
    attention_nmi,
    cls_attention,
    feature_loss,
    keep_indices,
    mask_ratio_at,
    random_keep_indices,
    relation_loss,
    submatrix,
)
from timm.models.vision_transformer import VisionTransformer


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- G2SD generic ----------------------------------------------------------------------------------
def test_generic_loss_hand_values_and_affine_invariance():
    teacher = torch.tensor([[[1.0, 3.0]]])
    target = torch.tensor([-1.0, 1.0]) / math.sqrt(1.0 + 1e-6)  # non-affine LN, biased var 1, eps 1e-6
    assert target.tolist() == pytest.approx([-0.9999995, 0.9999995], abs=1e-7)
    assert generic_loss(torch.zeros(1, 1, 2), teacher).item() == pytest.approx(0.2499998, abs=1e-7)
    assert generic_loss(torch.tensor([[[3.0, 1.0]]]), teacher).item() == pytest.approx(1.4999998, abs=1e-7)
    h, pred = torch.randn(3, 5, 8, generator=_gen()), torch.randn(3, 5, 8, generator=_gen(1))
    base = generic_loss(pred, h)
    assert generic_loss(pred, 3.7 * h - 2.5).item() == pytest.approx(base.item(), abs=1e-5)


def test_smooth_l1_branch_boundary_is_continuous():
    teacher = torch.tensor([[[-1.0, 1.0]]])  # LN target ≈ [−1, 1]
    t = F.layer_norm(teacher, (2,), eps=1e-6)
    # |d| = 2 on both elements: quadratic branch 0.5·4/2 = 1, linear branch 2 − 1 = 1
    for eps in (-1e-4, 0.0, 1e-4):
        pred = (t + torch.tensor([2.0 + eps, -(2.0 + eps)])).requires_grad_(True)
        loss = generic_loss(pred, teacher)
        assert loss.item() == pytest.approx(1.0 + eps, abs=2e-4)
        (grad,) = torch.autograd.grad(loss, pred)
        # d/dd of both branches is 1 at |d| = β (quadratic: d/β, linear: sign d), /2 for the mean
        assert grad.abs().flatten().tolist() == pytest.approx([0.5, 0.5], abs=1e-4)


# -- G2SD specific ---------------------------------------------------------------------------------
def test_specific_loss_hand_values():
    zeros = torch.zeros(2, 4)
    soft = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.0]])
    teacher = torch.randn(2, 4, generator=_gen())
    assert specific_loss(zeros, zeros, soft, teacher).item() == pytest.approx(math.log(4), abs=1e-6)
    ln3 = math.log(3)
    cls = torch.tensor([[ln3, 0.0, 0.0, 0.0]])
    dist = torch.tensor([[0.0, ln3, 0.0, 0.0]])
    value = specific_loss(cls, dist, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 5.0, 1.0, 2.0]]))
    assert value.item() == pytest.approx(0.6931472, abs=1e-6)
    # an int label vector is a one-hot target
    assert specific_loss(cls, dist, torch.tensor([0]), torch.tensor([[0.0, 5.0, 1.0, 2.0]])).item() == pytest.approx(
        value.item(), abs=1e-7
    )


def _nkd_reference(s, t, labels, temp, alpha):
    """NKD written out per sample with explicit renormalisation over the non-target classes."""
    total_t, total_n = 0.0, 0.0
    for b in range(s.shape[0]):
        g = int(labels[b])
        ps, pt = torch.softmax(s[b].double(), 0), torch.softmax(t[b].double(), 0)
        total_t += -(pt[g] * torch.log(ps[g])).item()
        others = [k for k in range(s.shape[1]) if k != g]
        qs = torch.softmax(s[b].double()[others] / temp, 0)
        qt = torch.softmax(t[b].double()[others] / temp, 0)
        total_n += (qt * torch.log(qs)).sum().item()
    n = s.shape[0]
    return total_t / n - alpha * temp**2 * total_n / n


@pytest.mark.parametrize(("temp", "alpha"), [(1.0, 1.0), (2.0, 0.5)])
def test_nkd_loss_against_per_sample_formula(temp, alpha):
    s, t = torch.randn(6, 7, generator=_gen(2)) * 3, torch.randn(6, 7, generator=_gen(3)) * 3
    labels = torch.randint(0, 7, (6,), generator=_gen(4))
    expected = _nkd_reference(s, t, labels, temp, alpha)
    assert nkd_loss(s, t, labels, temp, alpha).item() == pytest.approx(expected, abs=1e-5)
    # mixed (soft) labels: g = argmax of the row
    lam = 0.7
    mixed = lam * F.one_hot(labels, 7).float() + (1 - lam) * F.one_hot(labels.roll(1), 7).float()
    assert nkd_loss(s, t, mixed, temp, alpha).item() == pytest.approx(expected, abs=1e-5)
    # gradients finite (the masked target entry must not leak NaN)
    s.requires_grad_(True)
    (grad,) = torch.autograd.grad(nkd_loss(s, t, labels, temp, alpha), s)
    assert torch.isfinite(grad).all()


def _tiny_vit(**kw):
    args = dict(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=2, num_heads=2)
    return VisionTransformer(**{**args, **kw})


def test_dist_token_is_last_without_pos_embed_and_eval_is_mean():
    torch.manual_seed(0)
    model = DistTokenViT(_tiny_vit())
    x = torch.randn(3, 1, 8, 8, generator=_gen())
    seen = {}
    model.vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model.train()
    cls_logits, dist_logits = model(x)
    tokens = seen["x"]
    assert tokens.shape[1] == 1 + 16 + 1
    assert torch.equal(tokens[:, -1], model.dist_token[0].expand(3, -1))  # raw token: no pos embedding
    expected_prefix = model.vit._pos_embed(model.vit.patch_embed(x))
    assert torch.allclose(tokens[:, :-1], expected_prefix)
    model.eval()
    assert torch.allclose(model(x), (cls_logits + dist_logits) / 2, atol=1e-6)
    with pytest.raises(MethodError, match="CLS-token head"):
        DistTokenViT(_tiny_vit(global_pool="avg"))


# -- Hybrid ------------------------------------------------------------------------------------------
def test_relation_loss_hand_value_and_invariants():
    teacher = torch.tensor([[[[math.log(3), 0.0], [0.0, 0.0]]]])
    assert relation_loss(teacher, torch.zeros_like(teacher)).item() == pytest.approx(0.0654060, abs=1e-7)
    a, b = torch.randn(2, 3, 5, 5, generator=_gen()), torch.randn(2, 3, 5, 5, generator=_gen(1))
    assert relation_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert relation_loss(a, b).item() > 0
    shift = torch.randn(2, 3, 5, 1, generator=_gen(2))
    assert relation_loss(a + shift, b).item() == pytest.approx(relation_loss(a, b).item(), abs=1e-6)
    assert relation_loss(a, b - shift).item() == pytest.approx(relation_loss(a, b).item(), abs=1e-6)
    with pytest.raises(MethodError, match="differ in shape"):
        relation_loss(a, b[:, :2])


def test_relation_loss_is_float32_under_bf16_autocast():
    a, b = torch.randn(2, 2, 4, 4, generator=_gen()), torch.randn(2, 2, 4, 4, generator=_gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = relation_loss(a.bfloat16(), b.bfloat16())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(relation_loss(a.bfloat16().float(), b.bfloat16().float()).item(), abs=1e-6)


def test_submatrix_softmax_is_renormalised_restriction():
    logits = torch.randn(2, 3, 1 + 6, 1 + 6, generator=_gen())
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    sub = submatrix(logits, keep)
    assert sub.shape == (2, 3, 4, 4)
    full = logits.softmax(dim=-1)
    for bi in range(2):
        idx = [0] + [int(k) + 1 for k in keep[bi]]
        restricted = full[bi][:, idx][:, :, idx]
        assert torch.allclose(sub[bi].softmax(-1), restricted / restricted.sum(-1, keepdim=True), atol=1e-6)


def test_feature_loss_hand_value_and_agrees_with_generic_loss():
    assert feature_loss(torch.zeros(1, 1, 2), torch.tensor([[[1.0, 3.0]]])).item() == pytest.approx(0.2499998, abs=1e-7)
    s, t = torch.randn(2, 7, 12, generator=_gen()), torch.randn(2, 7, 12, generator=_gen(1)) * 4 + 1
    assert feature_loss(s, t).item() == pytest.approx(generic_loss(s, t).item(), abs=1e-7)


def test_attention_logits_match_timm_unfused_probabilities():
    torch.manual_seed(0)
    vit = _tiny_vit(depth=1).eval()
    attn = vit.blocks[0].attn
    attn.fused_attn = False
    seen = {}
    attn.qkv.register_forward_hook(lambda m, i, o: seen.setdefault("qkv", o))
    attn.attn_drop.register_forward_pre_hook(lambda m, args: seen.setdefault("probs", args[0]))
    vit(torch.randn(2, 1, 8, 8, generator=_gen()))
    logits = attention_logits(seen["qkv"], attn.num_heads, attn.scale)
    assert logits.shape == (2, 2, 17, 17)
    assert torch.allclose(logits.softmax(-1), seen["probs"], atol=1e-6)
    cls = cls_attention(seen["qkv"], attn.num_heads, attn.scale)
    assert torch.allclose(cls, seen["probs"][:, :, 0, 1:].mean(1), atol=1e-6)


def test_keep_indices_and_schedule():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.9, 0.5, 0.0, 0.3]])
    # L = 8, r = 0.25: drop ⌊2⌋ → keep 6; r = 0.5: keep 4 = {4, 1, 2, 5} (ties → lower index)
    assert keep_indices(scores, 0.5).tolist() == [[1, 2, 4, 5]]
    assert keep_indices(scores, 0.25).tolist() == [[1, 2, 3, 4, 5, 7]]
    assert keep_indices(scores, 0.0).tolist() == [list(range(8))]
    assert keep_indices(torch.zeros(1, 7), 0.5).tolist() == [[0, 1, 2, 3]]  # ⌊3.5⌋ = 3 dropped, ties → low
    rand = random_keep_indices(4, 49, 0.25, generator=_gen())
    assert rand.shape == (4, 49 - 12) and (rand.diff(dim=1) > 0).all()
    ratios, milestones = [0.0, 0.25, 0.5], [1 / 3, 2 / 3]
    assert [mask_ratio_at(e, 9, ratios, milestones) for e in range(9)] == [0.0] * 3 + [0.25] * 3 + [0.5] * 3
    assert [mask_ratio_at(e, 3, ratios, milestones) for e in range(3)] == [0.0, 0.25, 0.5]
    with pytest.raises(MethodError, match="one more entry"):
        mask_ratio_at(0, 3, [0.0, 0.5], [1 / 3, 2 / 3])
    with pytest.raises(MethodError, match="mask ratio"):
        keep_indices(scores, 1.0)


def test_attention_distance():
    # 2×2 grid: a head attending only to itself has distance 0; uniform over the 4 patches gives
    # (0 + 1 + 1 + √2) / 4 for every query
    eye = torch.eye(4).view(1, 1, 4, 4)
    uniform = torch.full((1, 1, 4, 4), 0.25)
    d = attention_distance(torch.cat([eye, uniform], dim=1), 2)
    assert d.tolist() == pytest.approx([0.0, (2 + math.sqrt(2)) / 4], abs=1e-6)
    # with a CLS row/column: dropped, rows renormalised over the patches
    with_cls = torch.zeros(1, 1, 5, 5)
    with_cls[..., 1:, 1:] = uniform * 0.5
    with_cls[..., :, 0] = 0.5
    assert attention_distance(with_cls, 2).item() == pytest.approx((2 + math.sqrt(2)) / 4, abs=1e-6)
    with pytest.raises(MethodError, match="grid"):
        attention_distance(torch.zeros(1, 1, 6, 6), 2)


def test_attention_nmi():
    # a 1×2 grid, queries uniform: attention [[1, 0], [0.5, 0.5]] gives the joint [[.5, 0], [.25, .25]] and the
    # key marginal [.75, .25]; I = .5·ln(4/3) + .25·ln(2/3) + .25·ln 2, H(Q) = ln 2, H(K) = H(.75, .25)
    mutual = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_keys = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    attn = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).view(1, 1, 2, 2)
    assert attention_nmi(attn, (1, 2)).item() == pytest.approx(mutual / math.sqrt(math.log(2) * h_keys), abs=1e-6)
    assert attention_nmi(attn, (1, 2)).item() == pytest.approx(0.3455920, abs=1e-6)
    # each query on itself alone: 1; every query with the same map (collapse): 0; per head, mean over batch
    eye, shared = torch.eye(4).view(1, 1, 4, 4), torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(1, 1, 4, 4)
    assert attention_nmi(torch.cat([eye, shared], dim=1), 2).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    batch = torch.cat([eye, shared], dim=0)  # (2, 1, 4, 4): the two samples average
    assert attention_nmi(batch, 2).item() == pytest.approx(0.5, abs=1e-6)
    # the CLS row/column is dropped and rows renormalised, as in attention_distance
    with_cls = torch.zeros(1, 1, 5, 5)
    with_cls[..., 1:, 1:] = eye * 0.5
    with_cls[..., :, 0] = 0.5
    assert attention_nmi(with_cls, 2).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(MethodError, match="grid"):
        attention_nmi(torch.zeros(1, 1, 6, 6), 2)
