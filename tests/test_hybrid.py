"""Hybrid Distill's distill stage and registered method (hybrid.md §6 tests 6–7, §2 masking and pairing),
the extra-teacher machinery it uses (`MethodSpec.teacher_hparams`), and an end-to-end run on tiny digits."""

from __future__ import annotations

import pytest
import torch
from distillbench.benchmark.cli import method_teachers
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.runner import RunRequest, resolve, run
from distillbench.benchmark.zoo import create_model
from distillbench.benchmark.zoo.mae_vit import MaeViT
from distillbench.methods import FrozenTeacher, get_method, register
from distillbench.methods.errors import MethodError
from distillbench.methods.hybrid import (
    HybridDistillStage,
    attention_distances,
    attention_profile,
    cls_attention,
    feature_loss,
    keep_indices,
    paired_block,
)

from .conftest import TINY_PROTOCOL, write_protocol

ONE_RATIO = {"mask_ratios": [0.5], "mask_milestones": []}


def _models(seed=0):
    torch.manual_seed(seed)
    student = create_model("mae_vit_micro_p2_8", num_classes=10, in_chans=1)  # 64-d × 4 blocks × 4 heads
    tm = FrozenTeacher(create_model("mae_vit_tiny_p2_8", num_classes=10, in_chans=1))  # 128-d × 6 × 4
    tc = FrozenTeacher(create_model("mae_vit_tiny_p2_8", num_classes=10, in_chans=1))
    return student, tm, tc


def _batch(n=3, seed=0):
    return {"image": torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))}


def _unfused_probs(model, x, keep=None):
    """{block: attention probabilities} with timm's explicit (unfused) attention, read before its dropout."""
    probs = {}
    handles = []
    for i, block in enumerate(model.blocks):
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_pre_hook(lambda m, a, i=i: probs.__setitem__(i, a[0])))
    with torch.no_grad():
        model.forward_masked(x, keep)
    for h in handles:
        h.remove()
    for block in model.blocks:
        block.attn.fused_attn = True
    return probs


def test_paired_block_rounds_half_up_and_keeps_equal_depths():
    assert [paired_block(i, 4, 6) for i in range(4)] == [1, 2, 4, 5]  # 1.5, 3, 4.5, 6 → 2, 3, 5, 6
    assert [paired_block(i, 12, 12) for i in range(12)] == list(range(12))
    assert [paired_block(i, 12, 24) for i in (0, 5, 11)] == [1, 11, 23]
    with pytest.raises(MethodError):
        paired_block(4, 4, 6)


def test_relation_term_equals_kl_of_renormalised_teacher_attention():
    """§2.6 with a second formulation: timm's own (unfused) attention probabilities, T_m's restricted to
    {CLS} ∪ K_e and renormalised, KL summed over keys, mean over queries, heads, batch and layers."""
    student, tm, tc = _models()
    module = HybridDistillStage(student, tm, tc=tc, num_classes=10, hparams={**ONE_RATIO, "alpha": 0.0, "tc": "x"})
    x = _batch()["image"]
    terms = module.losses({"image": x})
    assert set(terms) == {"rel"} and module.proj is None
    # the keep set: T_c's last-block CLS attention, top half (8 of 16 patches)
    tc_probs = _unfused_probs(tc.model, x)
    keep = keep_indices(tc_probs[5][:, :, 0, 1:].mean(dim=1), 0.5)
    assert keep.shape == (3, 8)
    t_probs, s_probs = _unfused_probs(tm.model, x), _unfused_probs(student, x, keep)
    idx = torch.cat([torch.zeros(3, 1, dtype=torch.long), keep + 1], dim=1)
    expected = []
    for i in (0, 1, 2):  # layers: all student blocks but the last, paired with T_m blocks 1, 2, 4
        j = paired_block(i, 4, 6)
        rows = torch.stack([t_probs[j][b][:, idx[b]][:, :, idx[b]] for b in range(3)])
        p = rows / rows.sum(dim=-1, keepdim=True)
        q = s_probs[i]
        expected.append((p * (p.log() - q.log())).sum(dim=-1).mean())
    assert terms["rel"].item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)


def test_feature_term_on_kept_tokens_and_fd_reduction():
    """§6.7: masking off, layers = [], α = 1 → FD-style feature distillation on all patch tokens."""
    student, tm, tc = _models()
    hp = {"mask_ratios": [0.0], "mask_milestones": [], "layers": [], "tc": "x"}
    module = HybridDistillStage(student, tm, tc=tc, num_classes=10, hparams=hp)
    x = _batch()["image"]
    terms = module.losses({"image": x})
    assert set(terms) == {"feat"} and module.teacher_blocks == []
    with torch.no_grad():
        target = tc.model.forward_masked(x, None)[0][:, 1:]
    fd = feature_loss(module.proj(student.forward_masked(x, None)[0][:, 1:]), target)
    assert terms["feat"].item() == pytest.approx(fd.item(), abs=1e-6)
    # with masking: the student sees CLS + the kept patches, the target is T_c's tokens at those positions
    module = HybridDistillStage(student, tm, tc=tc, num_classes=10, hparams={**hp, **ONE_RATIO, "alpha": 2.0})
    with torch.no_grad():
        tokens, _ = tc.model.forward_masked(x, None)
    keep = keep_indices(cls_attention(_qkv(tc.model, x, 5), 4, tc.model.blocks[5].attn.scale), 0.5)
    expected = feature_loss(
        module.proj(student.forward_masked(x, keep)[0][:, 1:]),
        tokens[:, 1:].gather(1, keep[..., None].expand(-1, -1, 128)),
    )
    assert module.losses({"image": x})["feat"].item() == pytest.approx(2.0 * expected.item(), abs=1e-6)


def _qkv(model, x, block):
    seen = {}
    h = model.blocks[block].attn.qkv.register_forward_hook(lambda m, a, o: seen.setdefault("qkv", o))
    with torch.no_grad():
        model.forward_masked(x, None)
    h.remove()
    return seen["qkv"]


def test_gradients_reach_only_student_and_projector_teachers_stay_eval():
    """§6.6: gradients reach only the student and the projector; teachers in eval mode; bf16 → float32."""
    student, tm, tc = _models()
    module = HybridDistillStage(student, tm, tc=tc, num_classes=10, hparams={**ONE_RATIO, "tc": "x"})
    module.train()
    tm.model.train()  # someone flips it: every teacher call puts it back
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = module.losses(_batch(4))
    assert terms["rel"].dtype == torch.float32
    sum(terms.values()).backward()
    assert not tm.model.training and not tc.model.training
    assert all(p.grad is None for t in (tm, tc) for p in t.model.parameters())
    assert module.proj.weight.grad is not None and student.blocks[3].attn.qkv.weight.grad is not None
    assert student.pos_embed.grad is not None and student.norm.weight.grad is not None
    assert student.decoder_embed.weight.grad is None and student.head.weight.grad is None
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    assert trained == {id(p) for p in module.parameters() if p.grad is not None}  # no unused trainable parameter


def test_arms_need_only_their_teachers_and_masking_ablations():
    student, tm, tc = _models()
    x = _batch()["image"]
    feature_only = HybridDistillStage(student, None, tc=tc, num_classes=10, hparams={"beta": 0.0, **ONE_RATIO})
    assert set(feature_only.losses({"image": x})) == {"feat"}
    relation_only = HybridDistillStage(
        student, tm, tc=None, num_classes=10, hparams={"alpha": 0.0, "masking": "random"}
    )
    assert set(relation_only.losses({"image": x})) == {"rel"} and relation_only.proj is None
    # relation only: blocks after the last relation block are frozen (they would get no gradient)
    assert not student.blocks[3].attn.qkv.weight.requires_grad and not student.norm.weight.requires_grad
    with pytest.raises(MethodError, match="needs T_c"):
        HybridDistillStage(student, tm, tc=None, num_classes=10, hparams={})
    with pytest.raises(MethodError, match="needs T_m"):
        HybridDistillStage(student, None, tc=tc, num_classes=10, hparams={})
    with pytest.raises(MethodError, match="unknown masking"):
        HybridDistillStage(student, tm, tc=tc, num_classes=10, hparams={"masking": "block"})
    with pytest.raises(MethodError, match="layers"):
        HybridDistillStage(student, tm, tc=tc, num_classes=10, hparams={"layers": [4]})
    two_heads = MaeViT(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=2, num_heads=2, decoder_depth=1)
    with pytest.raises(MethodError, match="heads"):
        HybridDistillStage(student, FrozenTeacher(two_heads), tc=tc, num_classes=10, hparams={})
    other = FrozenTeacher(create_model("mae_vit_micro_p4_28", num_classes=10, in_chans=1))
    with pytest.raises(MethodError, match="patches"):
        HybridDistillStage(student, other, tc=tc, num_classes=10, hparams={})
    # random masking keeps a sorted uniform subset of the same size; tm-sourced redundancy, masked-input relation
    module = HybridDistillStage(student, tm, tc=tc, num_classes=10, hparams={**ONE_RATIO, "masking": "random"})
    keep = module.keep_set(x, 0.25, None, None)
    assert keep.shape == (3, 12) and (keep.diff(dim=1) > 0).all()
    hp = {**ONE_RATIO, "redundancy_source": "tm", "teacher_relation": "masked_input"}
    module = HybridDistillStage(student, tm, tc=tc, num_classes=10, hparams=hp)
    assert set(module.losses({"image": x})) == {"feat", "rel"}


def test_schedule_follows_the_epoch_and_attention_report():
    student, tm, tc = _models()
    module = HybridDistillStage(student, tm, tc=tc, num_classes=10, hparams={}, epochs=3)
    assert module.mask_ratio() == 0.0  # epoch 0 of 3 (no trainer: epoch 0)
    report = module.attention_report(_batch(5)["image"])
    distance, nmi = report["distance"], report["nmi"]
    assert distance["images"] == nmi["images"] == 5 and len(distance["student"]) == len(nmi["student"]) == 4
    assert len(distance["tm"]) == len(distance["tc"]) == len(nmi["tm"]) == len(nmi["tc"]) == 6
    assert distance["student"] == attention_distances(student, _batch(5)["image"])
    assert nmi["student"] == attention_profile(student, _batch(5)["image"])["nmi"]
    assert all(0 <= d <= 3 * 2**0.5 for d in distance["student"])  # at most the 4×4 grid's diagonal
    assert all(0 <= v <= 1 for v in nmi["student"] + nmi["tm"] + nmi["tc"])


def test_extra_teacher_is_hashed_and_trained_by_make_teachers():
    protocol = load_protocol("digits")
    spec = get_method("hybrid")
    assert spec.teacher_hparams == ("tc",)
    assert spec.extra_teachers({"tc": "mae_vit_tiny_p2_8.vit"}) == {"tc": "mae_vit_tiny_p2_8.vit"}
    assert spec.extra_teachers({"tc": ""}) == {}
    pair = protocol.pair_for("hybrid")
    assert pair.name == "mae_vit_tiny_p2_8.mae__mae_vit_micro_p2_8"
    plain, extra = protocol.hash(pair), protocol.hash(pair, {"tc": "mae_vit_tiny_p2_8.vit"})
    assert plain != extra and protocol.hash(pair, {}) == plain
    assert protocol.recipe(pair, {"tc": "mae_vit_tiny_p2_8.vit"})["extra_teachers"]["tc"]["kind"]["epochs"] > 0
    assert "mae_vit_tiny_p2_8.vit" in method_teachers(protocol)
    r = resolve(RunRequest(method="hybrid", protocol="digits", wandb=False))
    assert r.extra_teachers == {"tc": "mae_vit_tiny_p2_8.vit"} and r.protocol_hash == extra
    with pytest.raises(MethodError, match="names a teacher"):
        spec.extra_teachers({"tc": 3})
    for name, tc, student in (
        ("fmnist", "mae_vit_tiny_p4_28.vit", "mae_vit_micro_p4_28"),
        ("imagenet-mim", "deit_base_patch16_224", "mae_vit_base_patch16_dec512d8b"),
    ):
        other = load_protocol(name)
        assert other.pair_for("hybrid").student == student and tc in method_teachers(other)
    with pytest.raises(MethodError, match="need a default"):
        register("_no_default_teacher", defaults={}, teacher_hparams=("tc",))


def test_hybrid_end_to_end_on_tiny_digits(tmp_path):
    data = {
        **TINY_PROTOCOL,
        "name": "tinyhybrid",
        "epochs": 1,
        "optimizer": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.05},
        "pairs": [{"teacher": "mae_vit_tiny_p2_8.mae", "student": "mae_vit_micro_p2_8"}],
        "teacher_kinds": {
            "mae": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 1.0e-3}, "train_subset": 300},
            "vit": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 1.0e-3}, "train_subset": 300},
        },
        "methods": {
            "hybrid": {
                "tc": "mae_vit_tiny_p2_8.vit",
                "distill_epochs": 3,
                "distill_warmup_epochs": 0,
                "train_subset": 300,
                "attention_images": 32,
            }
        },
    }
    path = write_protocol(tmp_path / "tinyhybrid.yaml", data)
    request = RunRequest(
        method="hybrid",
        protocol=str(path),
        teachers=str(tmp_path / "t"),
        results=str(tmp_path / "r"),
        progress=False,
        wandb=False,
        measure_overhead=False,
    )
    record = run(request, say=lambda m: None)
    assert record["status"] == "finished" and record["metrics"]["top1"] >= 0
    assert record["extra_teachers"]["tc"]["arch"] == "mae_vit_tiny_p2_8.vit"
    assert record["extra_teachers"]["tc"]["top1"] is not None  # the supervised T_c, trained on demand
    stage = record["stages"]["distill"]
    assert stage["mask_ratio_per_epoch"] == [0.0, 0.25, 0.5] and stage["layers"] == [0, 1, 2]
    assert stage["teacher_blocks"] == [1, 2, 4]
    assert [len(stage["attention_distance"][k]) for k in ("student", "tm", "tc")] == [4, 6, 6]
    assert [len(stage["attention_nmi"][k]) for k in ("student", "tm", "tc")] == [4, 6, 6]
    assert {"train/feat", "train/rel"} <= set(stage["final_train"])
    protocol = load_protocol(path)
    pair = protocol.pair("mae_vit_tiny_p2_8.mae__mae_vit_micro_p2_8")
    assert record["protocol_hash"] == protocol.hash(pair, {"tc": "mae_vit_tiny_p2_8.vit"})
    assert (tmp_path / "r" / "tinyhybrid" / "hybrid" / pair.name / "seed0" / "distill" / "encoder.pt").is_file()
