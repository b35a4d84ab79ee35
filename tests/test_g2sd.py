"""G2SD as a benchmark method (g2sd.md §1–§2, §6 tests 5, 6 and the stages): the generic stage's truncated
teacher decoder and student prediction, the decoder-less teacher refused, the specific stage's loss,
optimiser groups and arms, the `ft` teacher kind, and an end-to-end run on the tiny digits protocol."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from distillbench.benchmark.cli import method_teachers
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.results import validate_record
from distillbench.benchmark.runner import RunRequest, run
from distillbench.benchmark.teacher_kinds import (
    TeacherKindError,
    kind_recipe,
    parent_arch,
    teacher_epochs,
)
from distillbench.benchmark.zoo import create_model
from distillbench.methods import FrozenTeacher, get_method
from distillbench.methods.errors import MethodError
from distillbench.methods.g2sd import (
    G2SD,
    DistTokenViT,
    G2SDGeneric,
    generic_loss,
    nkd_loss,
    specific_loss,
    teacher_decoder_hidden,
)
from distillbench.methods.mae_utils import MissingDecoderError, random_masking

from .conftest import TINY_PROTOCOL, write_protocol

FT_OPT = {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.05}


def _models(teacher_arch="mae_vit_tiny_p2_8"):
    torch.manual_seed(0)
    teacher = create_model(teacher_arch, num_classes=10, in_chans=1)
    student = create_model("mae_vit_micro_p2_8", num_classes=10, in_chans=1)
    return student, teacher


def _batch(n=4):
    return {"image": torch.randn(n, 1, 8, 8), "label": torch.arange(n) % 10}


def test_teacher_target_runs_exactly_layer_blocks_without_decoder_norm():
    _, teacher = _models()
    teacher.decoder_blocks.append(type(teacher.decoder_blocks[0])(64, 4, 4.0, qkv_bias=True))  # depth 3
    x = torch.randn(2, 1, 8, 8)
    ids_keep, ids_restore, _ = random_masking(torch.rand(2, 16), 0.75)
    latent, _ = teacher.forward_masked(x, ids_keep)
    _, full = teacher.forward_decoder(latent, ids_restore, [0, 1, 2])
    with torch.no_grad():
        cut = teacher_decoder_hidden(teacher, x, ids_keep, ids_restore, 2)
    assert cut.shape == (2, 17, 64) and torch.equal(cut, full[1])  # CLS + all 16 patches, block 2 (1-based)
    with torch.no_grad():  # later blocks, the decoder norm and the pixel head cannot change the target
        for module in (teacher.decoder_blocks[2], teacher.decoder_norm, teacher.decoder_pred):
            for p in module.parameters():
                p.add_(1.0)
        assert torch.equal(teacher_decoder_hidden(teacher, x, ids_keep, ids_restore, 2), cut)
        teacher.decoder_blocks[1].mlp.fc2.bias.add_(1.0)
        assert not torch.equal(teacher_decoder_hidden(teacher, x, ids_keep, ids_restore, 2), cut)


def test_generic_stage_loss_gradients_and_frozen_teacher():
    student, teacher = _models()
    frozen = FrozenTeacher(teacher, info={"has_decoder": True})
    module = G2SDGeneric(student, frozen, num_classes=10, hparams={"mask_ratio": 0.75})
    assert module.teacher_layer == 1 and module.student_depth == 2  # teacher decoder depth 2 → layer 1
    assert module.head.fc1.in_features == 64 and module.head.fc2.out_features == 64
    assert torch.count_nonzero(module.head.fc1.bias) == 0
    batch = _batch()
    torch.manual_seed(3)
    terms = module.losses(batch)
    assert set(terms) == {"generic"}
    # the same mask by hand: student's LAST decoder block (no norm) through the head vs teacher block 1
    torch.manual_seed(3)
    ids_keep, ids_restore, _ = random_masking(torch.rand(4, 16), 0.75)
    latent, _ = student.forward_masked(batch["image"], ids_keep)
    _, feats = student.forward_decoder(latent, ids_restore, [0, 1])
    with torch.no_grad():
        target = teacher_decoder_hidden(teacher, batch["image"], ids_keep, ids_restore, 1)
    expected = generic_loss(module.head(feats[1]), target)
    assert terms["generic"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["generic"].backward()
    assert student.decoder_blocks[1].mlp.fc2.weight.grad is not None  # all student decoder blocks are used
    assert student.blocks[0].attn.qkv.weight.grad is not None and module.head.fc2.weight.grad is not None
    assert not student.decoder_norm.weight.requires_grad and not student.decoder_pred.weight.requires_grad
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    optimizer = module.configure_optimizers()
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(module.head.fc1.weight) in trained and id(student.decoder_pred.weight) not in trained
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_teacher_without_decoder_and_bad_layer_are_rejected():
    student, teacher = _models()
    with pytest.raises(MissingDecoderError, match="decoder"):
        G2SDGeneric(student, FrozenTeacher(teacher, info={"has_decoder": False}), num_classes=10)
    with pytest.raises(MethodError, match=r"outside 1\.\.2"):
        G2SDGeneric(student, FrozenTeacher(teacher), num_classes=10, hparams={"teacher_decoder_layer": 3})
    other = create_model("vit_micro_p2_8", num_classes=10, in_chans=1)
    with pytest.raises(MethodError, match="MAE-ViT"):
        G2SDGeneric(student, FrozenTeacher(other), num_classes=10)


def _specific(hparams, teacher=None, student=None):
    s, t = _models()
    student = student or s
    spec = get_method("g2sd")
    hp = spec.resolve_hparams({"generic": False, **hparams})
    sd_teacher = FrozenTeacher(teacher or create_model("mae_vit_tiny_p2_8", num_classes=10, in_chans=1))
    artifacts = {"specific_teacher": {"teacher": sd_teacher}}
    module = G2SD(
        student,
        FrozenTeacher(t),
        num_classes=10,
        hparams=hp,
        optimizer={"name": "adamw", "lr": 1.0},
        label_smoothing=0.1,
        artifacts=artifacts,
    )
    return module, sd_teacher


def test_specific_stage_loss_is_deit_hard_with_the_finetuned_teacher():
    module, sd_teacher = _specific({})
    assert isinstance(module.student, DistTokenViT) and module.teacher is sd_teacher
    batch = _batch(6)
    terms = module.losses(batch)
    module.student.train()
    cls_logits, dist_logits = module.student(batch["image"])
    teacher_logits = sd_teacher.logits(batch["image"])
    soft = F.one_hot(batch["label"], 10).float() * 0.9 + 0.01  # smoothing 0.1 over 10 classes
    expected = specific_loss(cls_logits, dist_logits, soft, teacher_logits)
    assert set(terms) == {"specific"} and terms["specific"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms["specific"].backward()
    assert module.student.dist_token.grad is not None and module.student.head_dist.weight.grad is not None
    assert all(p.grad is None for p in sd_teacher.model.parameters())
    module.student.eval()
    with torch.no_grad():
        c, d = module.student.forward_heads(batch["image"])
        assert torch.allclose(module(batch["image"]), (c + d) / 2)


def test_overhead_of_the_specific_stage_is_measured():
    from distillbench.benchmark.cost import overhead_ratio

    module, _ = _specific({})
    out = overhead_ratio(module, _batch(6), steps=1, rounds=1)  # the student's training forward is a pair
    assert out["overhead_vs_student"] > 0


def test_specific_nkd_and_plain_finetune_arms():
    module, sd_teacher = _specific({"specific": "nkd"})
    batch = _batch(6)
    module.student.train()
    terms = module.losses(batch)
    cls_logits, _ = module.student(batch["image"])
    soft = F.one_hot(batch["label"], 10).float() * 0.9 + 0.01
    expected = nkd_loss(cls_logits, sd_teacher.logits(batch["image"]), soft)
    assert terms["specific"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms["specific"].backward()
    assert torch.count_nonzero(module.student.head_dist.weight.grad) == 0  # 0·dist: in the graph, no signal
    plain, _ = _specific({"specific": "none", "generic": True})
    assert not isinstance(plain.student, DistTokenViT) and set(plain.losses(batch)) == {"ce"}
    with pytest.raises(MethodError, match="mae_ft"):
        _specific({"specific": "none"})
    with pytest.raises(MethodError, match="unknown specific"):
        _specific({"specific": "soft"})
    with pytest.raises(MethodError, match="global_pool"):
        _specific({"global_pool": "avg"})


def test_dist_token_sits_in_the_top_layer_decay_group_with_weight_decay():
    module, _ = _specific({"layer_decay": 0.5})
    optimizer = module.configure_optimizers()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    vit = module.student.vit
    # BEiT grouping over depth 4, as the unwrapped fine-tuner: stem 0.5^5, block i 0.5^(4 − i), top 1
    assert lr_of[id(vit.patch_embed.proj.weight)] == pytest.approx(0.5**5)
    assert lr_of[id(vit.cls_token)] == pytest.approx(0.5**5) and wd_of[id(vit.cls_token)] == 0.0
    assert lr_of[id(vit.blocks[0].mlp.fc1.weight)] == pytest.approx(0.5**4)
    assert lr_of[id(vit.blocks[3].mlp.fc1.weight)] == pytest.approx(0.5)
    for p in (module.student.dist_token, module.student.head_dist.weight, vit.head.weight):
        assert lr_of[id(p)] == pytest.approx(1.0)
    assert wd_of[id(module.student.dist_token)] == pytest.approx(0.05)  # decays (official timm 0.3.2)
    assert wd_of[id(module.student.head_dist.bias)] == 0.0
    assert id(vit.decoder_embed.weight) not in lr_of


def test_ft_teacher_kind_starts_from_the_mae_teacher(tmp_path):
    data = {
        **TINY_PROTOCOL,
        "name": "tinykinds",
        "pairs": [{"teacher": "mae_vit_tiny_p2_8.mae", "student": "mae_vit_micro_p2_8"}],
        "teacher_kinds": {
            "mae": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 1.0e-3}},
            "ft": {"epochs": 1, "optimizer": FT_OPT, "layer_decay": 0.75},
        },
    }
    protocol = load_protocol(write_protocol(tmp_path / "a.yaml", data))
    assert parent_arch("mae_vit_tiny_p2_8.ft") == "mae_vit_tiny_p2_8.mae"
    recipe = kind_recipe(protocol, "mae_vit_tiny_p2_8.ft")
    assert recipe["from"] == kind_recipe(protocol, "mae_vit_tiny_p2_8.mae")
    data["teacher_kinds"]["mae"]["epochs"] = 2  # another MAE teacher → another fine-tuned teacher
    other = load_protocol(write_protocol(tmp_path / "b.yaml", data))
    assert other.teacher_key("mae_vit_tiny_p2_8.ft", "x") != protocol.teacher_key("mae_vit_tiny_p2_8.ft", "x")
    assert other.hash(other.pairs[0]) != protocol.hash(protocol.pairs[0])
    assert teacher_epochs(other, "mae_vit_tiny_p2_8.ft") == 1
    assert teacher_epochs(other, "mae_vit_tiny_p2_8.mae") == 2 and teacher_epochs(other, "resnet14") == 3
    with pytest.raises(TeacherKindError, match="does not start"):
        parent_arch("mae_vit_tiny_p2_8.vit")
    data["teacher_kinds"]["ft"]["init_checkpoint"] = "x.pt"
    with pytest.raises(TeacherKindError, match="unknown key"):
        load_protocol(write_protocol(tmp_path / "c.yaml", data))


def _tiny_g2sd(tmp_path):
    data = {
        **TINY_PROTOCOL,
        "name": "tinyg2sd",
        "epochs": 1,
        "optimizer": FT_OPT,
        "pairs": [{"teacher": "mae_vit_tiny_p2_8.mae", "student": "mae_vit_micro_p2_8"}],
        "teacher_kinds": {
            "mae": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 1.0e-3, "betas": [0.9, 0.95]}},
            "ft": {"epochs": 1, "optimizer": FT_OPT, "layer_decay": 0.75, "train_subset": 300},
        },
        "methods": {
            "g2sd": {
                "specific_teacher": "mae_vit_tiny_p2_8.ft",
                "generic_epochs": 2,
                "generic_warmup_epochs": 0,
                "train_subset": 500,
            }
        },
    }
    return write_protocol(tmp_path / "tinyg2sd.yaml", data)


def _request(tmp_path, path, **kw):
    return RunRequest(
        method="g2sd",
        protocol=str(path),
        teachers=str(tmp_path / "t"),
        results=str(tmp_path / "r"),
        progress=False,
        wandb=False,
        measure_overhead=False,
        **kw,
    )


def test_g2sd_end_to_end_arms_on_tiny_digits(tmp_path):
    path = _tiny_g2sd(tmp_path)
    record = run(_request(tmp_path, path), say=lambda m: None)
    assert record["status"] == "finished" and validate_record(record) == []
    assert record["teacher"]["arch"] == "mae_vit_tiny_p2_8.mae" and record["teacher"]["top1"] is None
    sd = record["extra_teachers"]["specific_teacher"]  # the second teacher, hashed into the protocol hash
    assert sd["arch"] == "mae_vit_tiny_p2_8.ft" and sd["top1"] is not None and len(sd["checkpoint_sha256"]) == 64
    generic = record["stages"]["generic"]
    assert generic["teacher_decoder_layer"] == 1 and generic["epochs"] == 2
    assert len(generic["loss_curve"]) == 2 and all(v > 0 for v in generic["loss_curve"])
    assert record["stages"]["subset"]["train_images"] == 500
    assert record["student"]["deployed"] == "DistTokenViT" and 0 <= record["metrics"]["top1"] <= 100
    store = tmp_path / "t" / "tinyg2sd"
    ft = json.loads((store / "mae_vit_tiny_p2_8.ft.json").read_text())
    mae = json.loads((store / "mae_vit_tiny_p2_8.mae.json").read_text())
    assert ft["kind"] == "ft" and ft["from"]["sha256"] == mae["sha256"] and ft["train_images"] == 300
    run_dir = tmp_path / "r" / "tinyg2sd" / "g2sd" / "mae_vit_tiny_p2_8.mae__mae_vit_micro_p2_8"
    assert (run_dir / "seed0" / "generic" / "encoder.pt").is_file()
    # the arms: GD + plain fine-tuning and SD only, each under its own variant (no collision)
    gd_only = run(_request(tmp_path, path, hparams={"specific": "none"}, variant="gd-only"), say=lambda m: None)
    assert gd_only["status"] == "finished" and "specific_teacher" not in gd_only.get("stages", {})
    assert gd_only["student"].get("deployed") is None
    sd_only = run(_request(tmp_path, path, hparams={"generic": False}, variant="sd-only"), say=lambda m: None)
    assert sd_only["status"] == "finished" and "generic" not in sd_only["stages"]
    assert sd_only["extra_teachers"]["specific_teacher"]["checkpoint_sha256"] == sd["checkpoint_sha256"]
    protocol = load_protocol(path)
    pair = protocol.pairs[0]
    assert record["protocol_hash"] == protocol.hash(pair, {"specific_teacher": "mae_vit_tiny_p2_8.ft"})
    assert record["protocol_hash"] != protocol.hash(pair)
    with pytest.raises(MethodError, match=r"SET=specific_teacher=mae_vit_tiny_p2_8\.ft"):  # fails before GD trains
        run(_request(tmp_path, path, hparams={"specific_teacher": ""}, variant="none"), say=lambda m: None)
    folders = sorted(p.name for p in (tmp_path / "r" / "tinyg2sd").iterdir())
    assert folders == ["g2sd", "g2sd@gd-only", "g2sd@none", "g2sd@sd-only"]


@pytest.mark.parametrize(
    ("name", "pair", "kept"),
    [
        ("digits", "mae_vit_tiny_p2_8.mae__mae_vit_micro_p2_8", "e7be37277b91471e"),
        ("fmnist", "mae_vit_tiny_p4_28.mae__mae_vit_micro_p4_28", "27c0a500b8bc5bd4"),  # moved: MIM pair epochs 15
        ("imagenet-mim", "mae_vit_base_patch16_dec512d8b.mae__mae_vit_small_patch16_dec256d4b", None),
    ],
)
def test_protocols_default_g2sd_to_its_mim_pair(name, pair, kept):
    protocol = load_protocol(name)
    chosen = protocol.pair_for("g2sd")
    assert chosen.name == pair
    hp = get_method("g2sd").resolve_hparams(protocol.methods["g2sd"])
    assert hp["specific"] == "deit_hard" and hp["global_pool"] == "token" and hp["drop_path"] == 0.0
    if kept is not None:  # the pair dmae / mae_ft already use: adding G2SD and the `ft` kind kept its hash
        assert protocol.hash(chosen) == kept and hp["train_subset"] == (5000 if name == "fmnist" else 0)
        assert hp["specific_teacher"] == f"{chosen.teacher[: -len('.mae')]}.ft"
        assert hp["specific_teacher"] in method_teachers(protocol)  # `make teachers` trains it
    else:  # official GD.sh / SD.sh (g2sd.md §3)
        assert (hp["generic_epochs"], hp["generic_lr"], hp["teacher_decoder_layer"]) == (300, 2.4e-3, 4)
        assert hp["specific_teacher"] == "mae_vit_base_patch16_dec512d8b.ft" and hp["mixup"] == 0.8
        recipe = protocol.for_pair(chosen).student_recipe(chosen)
        assert protocol.for_pair(chosen).epochs == 200 and recipe["optimizer"]["lr"] == 4.0e-3
        student = create_model(chosen.student, num_classes=1000)
        assert student.mask_token.shape[-1] == 256 and len(student.decoder_blocks) == 4
        assert student.embed_dim == 384 and student.decoder_blocks[0].attn.num_heads == 8
