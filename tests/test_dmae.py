"""DMAE (dmae.md §6), the shared MAE fine-tuner, MIM teacher kinds and official-format MAE imports."""

from __future__ import annotations

import json

import pytest
import torch
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.runner import RunRequest, run
from distillbench.benchmark.teacher_import import import_teacher
from distillbench.benchmark.teacher_kinds import split_kind
from distillbench.benchmark.teachers import TeacherError, train_teacher
from distillbench.benchmark.zoo import create_model
from distillbench.methods import FrozenTeacher
from distillbench.methods.dmae import DMAEDistill, dmae_feature_loss, masked_pixel_loss, teacher_features
from distillbench.methods.errors import MethodError
from distillbench.methods.mae import MAEFinetune, MAEPretrain, load_encoder
from distillbench.methods.mae_utils import MissingDecoderError, random_masking, require_decoder

from .conftest import TINY_PROTOCOL, write_protocol


def test_feature_loss_hand_value_scale_invariance_and_parallel_vectors():
    assert dmae_feature_loss(torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[1.0, 0.0]]])).item() == pytest.approx(0.6)
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    base = dmae_feature_loss(s, t)
    scale = torch.rand(2, 5, 1) + 0.1  # a positive factor per token
    assert torch.allclose(dmae_feature_loss(s * scale, t), base, atol=1e-6)
    assert torch.allclose(dmae_feature_loss(s, t * 7.0), base, atol=1e-6)
    assert dmae_feature_loss(s, s * scale).item() == pytest.approx(0.0, abs=1e-7)
    # second formulation: per element |s_i/‖s‖ − t_i/‖t‖|, summed in float64, divided by the element count
    sd, td = s.double(), t.double()
    manual = (sd / sd.norm(dim=-1, keepdim=True) - td / td.norm(dim=-1, keepdim=True)).abs().sum() / s.numel()
    assert base.item() == pytest.approx(manual.item(), abs=1e-7)
    l2 = (sd / sd.norm(dim=-1, keepdim=True) - td / td.norm(dim=-1, keepdim=True)).pow(2).sum() / s.numel()
    assert dmae_feature_loss(s, t, "l2").item() == pytest.approx(l2.item(), abs=1e-7)
    with pytest.raises(MethodError):
        dmae_feature_loss(s, t[..., :4])


def test_masked_pixel_loss_spec_values():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    assert masked_pixel_loss(pred, target, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(4.0)
    assert masked_pixel_loss(pred, target, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(2.5)
    # norm-pix: [1, 3] → [−0.7071066, 0.7071066]; pred equal to that gives 0 on the patch
    one = torch.tensor([[[1.0, 3.0]]])
    hit = torch.tensor([[[-0.7071066, 0.7071066]]])
    assert masked_pixel_loss(hit, one, torch.ones(1, 1), norm_pix=True).item() == pytest.approx(0.0, abs=1e-12)


def _pair():
    torch.manual_seed(0)
    teacher = create_model("mae_vit_tiny_p2_8", num_classes=10, in_chans=1)
    student = create_model("mae_vit_micro_p2_8", num_classes=10, in_chans=1)
    return student, FrozenTeacher(teacher)


def test_truncated_teacher_features_equal_a_full_run():
    _, teacher = _pair()
    x = torch.randn(3, 1, 8, 8)
    ids_keep = random_masking(torch.rand(3, 16), 0.75)[0]
    cut = teacher_features(teacher.model, x, ids_keep, [4])[0]
    _, full = teacher.model.forward_masked(x, ids_keep, [4, 5])
    assert torch.equal(cut, full[0])


def test_distill_terms_gradients_and_frozen_teacher():
    student, teacher = _pair()
    module = DMAEDistill(student, teacher, num_classes=10, hparams={"mask_ratio": 0.75})
    assert module.student_blocks == [2] and module.teacher_blocks == [4]  # aligned blocks of depth 4 and 6
    terms = module.losses({"image": torch.randn(4, 1, 8, 8), "label": torch.zeros(4, dtype=torch.long)})
    assert set(terms) == {"pix", "feat_b2"}
    terms["feat_b2"].backward(retain_graph=True)  # the feature term reaches blocks 0..2 and the head only
    assert module.heads[0].weight.grad is not None and student.blocks[0].attn.qkv.weight.grad is not None
    assert student.blocks[3].attn.qkv.weight.grad is None and student.decoder_pred.weight.grad is None
    terms["pix"].backward()
    assert student.blocks[3].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in teacher.model.parameters())
    assert not teacher.model.training


def test_feat_weight_zero_is_plain_mae_on_the_same_mask():
    student, teacher = _pair()
    batch = {"image": torch.randn(4, 1, 8, 8), "label": torch.zeros(4, dtype=torch.long)}
    dmae = DMAEDistill(student, teacher, num_classes=10, hparams={"feat_weight": 0.0})
    mae = MAEPretrain(student, num_classes=10, mask_ratio=0.75, norm_pix=False)
    torch.manual_seed(5)
    ours = dmae.losses(batch)
    torch.manual_seed(5)
    reference = mae.losses(batch)
    assert set(ours) == {"pix"} and torch.equal(ours["pix"], reference["pix"])


def test_finetuner_layer_decay_groups_and_frozen_mim_parts():
    student = create_model("mae_vit_micro_p2_8", num_classes=10, in_chans=1)
    module = MAEFinetune(student, num_classes=10, hparams={"layer_decay": 0.5}, optimizer={"name": "adamw", "lr": 1.0})
    assert not student.decoder_embed.weight.requires_grad and not student.mask_token.requires_grad
    assert student.pos_embed.requires_grad and student.head.weight.requires_grad
    optimizer = module.configure_optimizers()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    # BEiT grouping over depth 4: stem 0.5^5, block i 0.5^(4 - i), head/fc_norm 1
    assert lr_of[id(student.patch_embed.proj.weight)] == pytest.approx(0.5**5)
    assert lr_of[id(student.blocks[0].mlp.fc1.weight)] == pytest.approx(0.5**4)
    assert lr_of[id(student.blocks[3].mlp.fc1.weight)] == pytest.approx(0.5)
    assert lr_of[id(student.head.weight)] == pytest.approx(1.0)
    assert id(student.decoder_embed.weight) not in lr_of
    assert student.head.weight.std().item() < 1e-3  # trunc-normal std 2e-5


def test_encoder_loading_is_strict_on_the_encoder():
    source = create_model("mae_vit_micro_p2_8", num_classes=10, in_chans=1)
    encoder_only = {k: v for k, v in source.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    target = create_model("mae_vit_micro_p2_8", num_classes=10, in_chans=1)
    missing = load_encoder(target, encoder_only, "enc.pt")
    assert "decoder_embed.weight" in missing and torch.equal(
        target.blocks[1].norm1.weight, source.blocks[1].norm1.weight
    )
    broken = dict(encoder_only)
    broken.pop("blocks.2.attn.qkv.weight")
    with pytest.raises(MethodError, match="missing encoder"):
        load_encoder(target, broken, "enc.pt")


def test_official_mae_checkpoints_import_with_strict_key_checks(tmp_path):
    protocol = load_protocol("digits")
    arch = "mae_vit_tiny_p2_8.mae"
    assert split_kind(arch) == ("mae_vit_tiny_p2_8", "mae") and split_kind("resnet34.tv_in1k")[1] is None
    full = create_model(arch, num_classes=10, in_chans=1).state_dict()
    pretrain = {k: v for k, v in full.items() if not k.startswith(("head.", "fc_norm."))}  # MAE's pre-training keys
    encoder_only = {k: v for k, v in pretrain.items() if not k.startswith(("decoder_", "mask_token"))}

    def imported(state, name):
        path = tmp_path / f"{name}.pth"
        torch.save({"model": state, "epoch": 1}, path)
        return import_teacher(protocol, arch, str(path), fmt="mae", root=tmp_path / "store", force=True)

    info = imported(pretrain, "full")
    assert info["has_decoder"] is True and info["top1"] is None and info["kind"] == "mae"
    require_decoder(info, "g2sd")
    info = imported(encoder_only, "encoder")
    assert info["has_decoder"] is False
    with pytest.raises(MissingDecoderError, match="decoder"):
        require_decoder(info, "g2sd")
    partial = {k: v for k, v in pretrain.items() if not k.startswith("decoder_blocks.1.")}
    with pytest.raises(TeacherError, match="incomplete"):
        imported(partial, "partial")
    no_block = {k: v for k, v in encoder_only.items() if k != "blocks.3.mlp.fc1.weight"}
    with pytest.raises(TeacherError, match="missing key"):
        imported(no_block, "noblock")
    with pytest.raises(TeacherError, match="unexpected"):
        imported({**pretrain, "extra.weight": torch.zeros(1)}, "extra")


def test_kinds_keep_the_other_pairs_hashes():
    protocol = load_protocol("digits")
    assert protocol.hash(protocol.pair("resnet20__resnet8")) == "994cf9dc959371f9"  # as before MIM pairs existed
    assert protocol.pair_for("dmae").teacher == "mae_vit_tiny_p2_8.mae"
    assert protocol.pair_for("kd").name == "resnet20__resnet8"


def test_dmae_end_to_end_on_digits(tmp_path):
    data = {
        **TINY_PROTOCOL,
        "name": "tinymim",
        "epochs": 1,
        "optimizer": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.05},
        "pairs": [{"teacher": "mae_vit_tiny_p2_8.mae", "student": "mae_vit_micro_p2_8"}],
        "teacher_kinds": {
            "mae": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 1.0e-3, "betas": [0.9, 0.95]}, "norm_pix": True},
            "vit": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 1.0e-3}, "layer_decay": 1.0, "train_subset": 500},
        },
        "methods": {"dmae": {"distill_epochs": 1, "distill_warmup_epochs": 0, "mask_ratio": 0.9}},
    }
    path = write_protocol(tmp_path / "tinymim.yaml", data)
    request = RunRequest(
        method="dmae",
        protocol=str(path),
        teachers=str(tmp_path / "t"),
        results=str(tmp_path / "r"),
        progress=False,
        wandb=False,
        measure_overhead=False,
    )
    record = run(request, say=lambda m: None)
    assert record["status"] == "finished" and record["teacher"]["top1"] is None
    stage = record["stages"]["distill"]
    assert stage["student_blocks"] == [2] and stage["teacher_blocks"] == [4]
    assert 0 < stage["teacher_flops_saved"] < 1 and stage["teacher_flops_truncated"] < stage["teacher_flops_full"]
    sidecar = json.loads((tmp_path / "t" / "tinymim" / "mae_vit_tiny_p2_8.mae.json").read_text())
    assert sidecar["kind"] == "mae" and sidecar["has_decoder"] is True
    encoder = (
        tmp_path
        / "r"
        / "tinymim"
        / "dmae"
        / "mae_vit_tiny_p2_8.mae__mae_vit_micro_p2_8"
        / "seed0"
        / "distill"
        / "encoder.pt"
    )
    assert encoder.is_file()
    # the supervised kind: a labelled ViT teacher, trained with the fine-tuning recipe on its subset
    info = train_teacher(load_protocol(path), "mae_vit_micro_p2_8.vit", root=tmp_path / "t", progress=False)
    assert info["kind"] == "vit" and info["top1"] is not None and info["epochs"] == 1


def test_train_subset_is_fixed_stratified_and_leaves_eval_splits():
    from distillbench.benchmark.runner import make_datamodule
    from distillbench.methods.mae import subset_train_split

    protocol = load_protocol("digits")
    first, second = (make_datamodule(protocol, seed=s) for s in (0, 1))
    info = subset_train_split(first, 300)["record"]
    assert info == subset_train_split(second, 300)["record"]  # the run seed does not move the subset
    assert len(first.train_set) == 300 and torch.equal(first.train_set.images, second.train_set.images)
    counts = torch.bincount(first.train_set.labels, minlength=10)
    assert counts.min() >= 28 and counts.max() <= 32  # stratified: ~30 per class
    full = make_datamodule(protocol, seed=0)
    full.setup()
    assert torch.equal(first.test_set.images, full.test_set.images) and len(first.val_set) == len(full.val_set)
    with pytest.raises(MethodError, match="not smaller"):
        subset_train_split(full, 10**6)


def test_linear_probe_trains_only_bn_and_head_on_a_frozen_encoder():
    from distillbench.methods.dmae import DEFAULTS as DMAE_DEFAULTS
    from distillbench.methods.hybrid import DEFAULTS as HYBRID_DEFAULTS
    from distillbench.methods.mae import LinearProbe

    torch.manual_seed(0)
    student = create_model("mae_vit_micro_p2_8", num_classes=10, in_chans=1)
    module = MAEFinetune(student, num_classes=10, hparams={"probe": True}, optimizer={"name": "adamw", "lr": 0.1})
    probe = module.student
    assert isinstance(probe, LinearProbe) and probe.encoder is student
    trainable = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}  # BatchNorm1d(affine=False) has no parameters
    encoder_before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = module.configure_optimizers()
    module.train()
    assert not student.training and probe.bn.training  # the encoder stays in eval mode (no drop path)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    loss = module.losses({"image": x, "label": y})["ce"]
    loss.backward()
    head_before = probe.head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(probe.head.weight, head_before)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in encoder_before.items())
    # the same switch is a hyper-parameter of the distillation methods' last stage: one command per arm
    assert DMAE_DEFAULTS["probe"] is False and HYBRID_DEFAULTS["probe"] is False
