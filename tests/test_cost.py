"""Cost columns: fvcore FLOPs with the attention handler (a ViT against its analytic count), the
step-time split of `python -m distillbench.benchmark cost`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from distillbench.benchmark import cost
from distillbench.benchmark.cli import main
from distillbench.benchmark.costbench import PARTS
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_handler_counts_both_products():
    q, k, v = torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 7, 4), torch.zeros(2, 3, 7, 6)
    # Q·Kᵀ: 5×7 outputs of length-4 dot products; A·V: 5×6 outputs of length-7; per (batch, head)
    expected = 2 * 3 * (5 * 7 * 4 + 5 * 6 * 7)
    assert cost.flop_analysis(_Attention(), (q, k, v)).total() == expected


def _vit(depth: int = 2, dim: int = 64, heads: int = 4) -> VisionTransformer:
    return VisionTransformer(
        img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=dim, depth=depth, num_heads=heads
    )


def test_vit_flops_match_the_analytic_count():
    depth, dim, classes, patches = 2, 64, 10, (32 // 8) ** 2
    model = _vit(depth, dim)
    assert model.blocks[0].attn.fused_attn  # the path fvcore cannot see without our handler
    n = patches + 1  # + class token
    patch_embed = patches * dim * (1 * 8 * 8)
    per_block = (
        n * dim * 3 * dim  # qkv projection
        + 2 * n * n * dim  # Q·Kᵀ and attention·V over all heads
        + n * dim * dim  # output projection
        + 2 * n * dim * 4 * dim  # MLP, ratio 4
        + 2 * 5 * n * dim  # two LayerNorms: fvcore counts 5 per element with affine
    )
    final = 5 * n * dim + dim * classes  # final LayerNorm on all tokens, head on the class token
    expected = patch_embed + depth * per_block + final
    assert cost.count_flops(model, (1, 32, 32)) == expected

    from fvcore.nn import FlopCountAnalysis

    plain = FlopCountAnalysis(model.eval(), torch.zeros(1, 1, 32, 32)).unsupported_ops_warnings(False)
    assert plain.uncalled_modules_warnings(False).total() == expected - depth * 2 * n * n * dim


def test_cost_command_splits_the_step(tiny_protocol_path, teacher_store, capsys):
    from distillbench.benchmark.costbench import measure
    from distillbench.benchmark.runner import RunRequest

    common = {"protocol": str(tiny_protocol_path), "teachers": str(teacher_store), "wandb": False, "progress": False}
    kd = measure(RunRequest(method="kd", **common), steps=3, warmup=1, say=lambda m: None)
    for part in PARTS:
        assert kd[f"{part}_ms"] >= 0
    assert kd["teacher_forward_ms"] > 0 and kd["student_forward_backward_ms"] > 0
    assert abs(sum(kd[f"{p}_ms"] for p in PARTS) - kd["step_ms"]) < 0.01
    assert kd["throughput_img_s"] > 0 and kd["overhead_vs_student"] > 0
    assert kd["student_params"] == 77_754 and kd["teacher_flops"] > kd["student_flops"] > 0
    vanilla = measure(RunRequest(method="vanilla", **common), steps=2, warmup=1, say=lambda m: None)
    assert vanilla["teacher_forward_ms"] == 0 and vanilla["overhead_vs_student"] == 1.0

    args = ["cost", "--method", "kd", "--protocol", str(tiny_protocol_path), "--teachers", str(teacher_store)]
    assert main([*args, "--steps", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for line in ("teacher forward", "student forward backward", "optimizer", "data", "overhead_vs_student"):
        assert line in out
    assert main([*args, "--steps", "0"]) == 2
