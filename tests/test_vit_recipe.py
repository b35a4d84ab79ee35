"""OFA-KD's ViT/MLP-student recipe (ofa.md §4): per-pair student recipes, mixup/cutmix, RandAugment and
random erasing, gradient clipping and a student EMA — and the CNN pairs' hashes that must not move."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distillbench.benchmark.protocol import ProtocolError, load_protocol
from distillbench.benchmark.results import validate_record
from distillbench.benchmark.runner import RunRequest, resolve, run
from distillbench.benchmark.zoo import create_model
from distillbench.datasets.base import ArrayDataset
from distillbench.methods import FrozenTeacher, MethodError, get_method
from distillbench.methods.mixing import BatchMixup
from timm.loss import SoftTargetCrossEntropy

from tests.conftest import TINY_PROTOCOL, write_protocol

PINNED = {  # the CNN-student pairs' hashes before the per-pair recipes existed (their records stay valid)
    "cifar100-hetero": {
        "swin_tiny_patch4_window7_224__resnet18": "f1f43e2d41fffa48",
        "vit_small_patch16_224__resnet18": "c0510d895b1cc36e",
        "vit_small_patch16_224__mobilenetv2_100": "c2b4c7383d6ee620",
        "swin_tiny_patch4_window7_224__mobilenetv2_100": "e5d8c786c95b05fc",
        "mixer_b16_224__resnet18": "5ee05bb5dc48b8ac",
    },
    "imagenet-hetero": {"deit_tiny_patch16_224__resnet18": "878cc331d22ddc62"},
    "imagenet": {"resnet34__resnet18": "6225caee6b0487ab", "resnet50__mobilenetv1": "ae5f9776fef99fe3"},
    "fmnist": {
        "resnet20__resnet8": "7ff46466ea903bac",
        "resnet20__vit_micro_p4_28": "6d3e3a7d4bec5f05",
        # moved on purpose (a3737e7): the ViT teacher got its own recipe (teacher_archs) before any record
        "vit_micro_p4_28__resnet8": "0ac5597f371928b8",
    },
    "digits": {"resnet20__resnet8": "994cf9dc959371f9", "resnet20__vit_micro_p2_8": "820ea186ca7dc26e"},
}
VIT_STUDENTS = {"deit_tiny_patch16_224", "resmlp_12_224"}


def test_existing_pair_hashes_did_not_move():
    for name, pairs in PINNED.items():
        p = load_protocol(name)
        assert {q: p.hash(p.pair(q)) for q in pairs} == pairs, name


def test_vit_and_mlp_students_carry_the_official_recipe():
    """configs/cifar/vit_mlp.yaml and configs/imagenet/vit_mlp.yaml (+ EMA 0.99996, ofa.md §4)."""
    for name, min_lr in (("cifar100-hetero", 1e-5), ("imagenet-hetero", 1e-6)):
        p = load_protocol(name)
        token = [q for q in p.pairs if q.student in VIT_STUDENTS]
        assert token and all(q.student not in VIT_STUDENTS for q in p.pairs if q not in token)
        for pair in token:
            r = p.student_recipe(pair)
            assert (r["optimizer"]["name"], r["optimizer"]["lr"], r["optimizer"]["weight_decay"]) == (
                "adamw",
                5e-4,
                0.05,
            )
            assert r["schedule"] == {"name": "cosine", "min_lr": min_lr, "warmup_epochs": 20, "warmup_lr": 5e-7}
            assert r["augment"]["auto_augment"] == "rand-m9-mstd0.5-inc1" and r["augment"]["re_prob"] == 0.25
            assert r["mixup"] == {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}
            assert (r["ema_decay"], r["grad_clip"], p.label_smoothing) == (0.99996, 5.0, 0.1)
            hp = get_method("ofa").resolve_hparams(p.methods.get("ofa"), pair.methods.get("ofa"))
            assert (hp["eps"], hp["ofa_weight"]) == (1.0, 1.0)
        cnn = p.student_recipe(p.pair())
        assert cnn["mixup"] == {} and cnn["ema_decay"] is None and "auto_augment" not in cnn["augment"]
    imagenet = load_protocol("imagenet-hetero")
    vit = imagenet.pair("convnext_tiny__deit_tiny_patch16_224")
    own = imagenet.for_pair(vit)
    assert (own.epochs, own.batch_size, imagenet.epochs, imagenet.batch_size) == (300, 1024, 100, 512)
    r = resolve(RunRequest(method="ofa", protocol="imagenet-hetero", pair=vit.name))
    assert (r.protocol.epochs, r.protocol.batch_size, r.variant) == (300, 1024, "")
    short = resolve(RunRequest(method="ofa", protocol="imagenet-hetero", pair=vit.name, epochs=2))
    assert short.protocol.epochs == 2 and short.variant == "epochs=2"
    assert short.protocol.hash(short.pair) != r.protocol.hash(r.pair) == imagenet.hash(vit)


def test_student_recipes_are_validated(tmp_path):
    pair = {"teacher": "resnet14", "student": "resnet8"}
    for bad, message in (
        ({"mixup": {"alpha": 1.0}}, r"pairs\[0\]\.mixup: unknown key\(s\) alpha"),
        ({"mixup": {"prob": 1.0}}, "set mixup_alpha and/or cutmix_alpha > 0"),
        ({"ema_decay": 1.5}, r"ema_decay must be in \(0, 1\)"),
        ({"grad_clip": 0.0}, "grad_clip must be > 0"),
        ({"augment": {"kind": "rrc", "colour": 1}}, r"pairs\[0\]\.augment: unknown key\(s\) colour"),
        ({"schedule": {"name": "cosine", "warmup_epochs": 5}}, r"warmup_epochs must be an integer in 0\.\.1"),
    ):
        data = {**TINY_PROTOCOL, "pairs": [{**pair, **bad}]}
        with pytest.raises(ProtocolError, match=message):
            load_protocol(write_protocol(tmp_path / "p.yaml", data))


def test_mixup_is_timms_seeded_per_step_and_leaves_global_state_alone():
    torch.manual_seed(0)
    batch = {"image": torch.randn(6, 3, 8, 8), "label": torch.tensor([0, 1, 2, 3, 4, 0]), "index": torch.arange(6)}
    mix = BatchMixup({"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "seed": 3}, num_classes=5, label_smoothing=0.1)
    np.random.seed(7)
    random.seed(7)
    before = (np.random.get_state()[1].copy(), random.getstate())
    a, again, other = mix(batch, step=4), mix(batch, step=4), mix(batch, step=5)
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    assert torch.equal(a["image"], again["image"]) and torch.equal(a["label"], again["label"])
    assert not torch.equal(a["image"], other["image"]) and not torch.equal(a["image"], batch["image"])
    assert a["label"].shape == (6, 5) and torch.allclose(a["label"].sum(1), torch.ones(6))
    assert a["label"].min() >= 0.1 / 5 - 1e-7  # smoothing is inside the targets (timm's mixup_target)
    assert torch.equal(batch["label"], torch.tensor([0, 1, 2, 3, 4, 0]))  # the input batch is not modified
    with pytest.raises(MethodError, match="even per-device batch"):
        mix({**batch, "image": batch["image"][:5], "label": batch["label"][:5]}, step=0)
    with pytest.raises(MethodError, match="stored teacher logits"):
        mix({**batch, "teacher_logits": torch.zeros(6, 5)}, step=0)


def test_soft_targets_train_vanilla_kd_ofa_and_are_refused_elsewhere():
    spec = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}
    teacher = FrozenTeacher(create_model("resnet8", num_classes=5, in_chans=3))
    for name in ("vanilla", "kd", "ofa", "dkd"):
        m = get_method(name)
        build = lambda m=m: m.module_cls(  # noqa: E731
            create_model("resnet8", num_classes=5, in_chans=3),
            teacher,
            num_classes=5,
            hparams=m.resolve_hparams(),
            label_smoothing=0.1,
            mixup=spec,
        )
        if name == "dkd":
            with pytest.raises(MethodError, match="needs class-index labels"):
                build()
            continue
        module = build()
        logits, soft = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), dim=1)
        assert module.classification_loss(logits, soft).item() == pytest.approx(
            SoftTargetCrossEntropy()(logits, soft).item(), rel=1e-6
        )
        hard = torch.tensor([0, 1, 2, 3])
        assert module.classification_loss(logits, hard).item() == pytest.approx(
            F.cross_entropy(logits, hard, label_smoothing=0.1).item(), rel=1e-6
        )
        batch = {"image": torch.randn(4, 3, 32, 32), "label": hard, "index": torch.arange(4)}
        mixed = module.mixup(batch, step=0)
        assert all(torch.isfinite(v) for v in module.losses(mixed).values())


def _rgb_dataset(spec):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, generator=gen)
    kw = {"mean": (0.5, 0.4, 0.3), "std": (0.25, 0.25, 0.25), "seed": 1}
    return ArrayDataset(images, torch.arange(4), augment_spec={"kind": "rrc", "size": 32, **spec}, **kw)


def test_rand_augment_and_random_erasing_are_functions_of_seed_epoch_index():
    strong = _rgb_dataset({"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 1.0})
    plain = _rgb_dataset({})
    keys = [(0, 0), (1, 0), (2, 0), (3, 0)]
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a, b = strong.__getitems__(keys), strong.__getitems__(list(reversed(keys)))
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert torch.equal(a["image"], b["image"].flip(0))  # per sample, whatever the batch order
    later = strong.__getitems__([(k, 1) for k, _ in keys])["image"]
    assert not torch.equal(a["image"], later)
    base = plain.__getitems__(keys)["image"]
    assert a["image"].shape == base.shape == (4, 3, 32, 32) and not torch.equal(a["image"], base)
    # p = 1: every image has an erased box of N(0, 1) noise (2–33 % of its area), unlike the plain crop
    erased_only = _rgb_dataset({"re_prob": 1.0}).__getitems__(keys)["image"]
    changed = (erased_only != base).float().mean(dim=(1, 2, 3))
    assert bool(((changed > 0.015) & (changed < 0.34)).all())
    with pytest.raises(Exception, match="invalid RandAugment config"):
        _rgb_dataset({"auto_augment": "bogus"}).__getitems__(keys)


def test_a_pair_with_the_vit_recipe_runs_end_to_end(teacher_store, tmp_path):
    """Mixup/cutmix, a student EMA and gradient clipping on a tiny digits pair: the record says what
    was evaluated (metrics.top1: the student; metrics.ema_top1: its EMA) and the hash tracks the recipe."""
    recipe = {"mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}, "ema_decay": 0.9, "grad_clip": 1.0}
    data = {
        **TINY_PROTOCOL,
        "pairs": [*TINY_PROTOCOL["pairs"], {"teacher": "resnet14", "student": "resnet8x4", **recipe}],
    }
    path = write_protocol(tmp_path / "tinydigits.yaml", data)
    base = dict(protocol=str(path), teachers=str(teacher_store), progress=False, wandb=False, epochs=1)
    request = RunRequest(method="kd", pair="resnet14__resnet8x4", results=str(tmp_path / "r"), **base)
    record = run(request, say=lambda m: None)
    assert validate_record(record) == [] and record["status"] == "finished"
    assert {"top1", "ema_top1"} <= set(record["metrics"]) and record["metrics"]["ema_top1"] >= 0
    assert record["ema"]["decay"] == 0.9 and "student's own weights" in record["ema"]["reported"]
    assert record["mixup"] == recipe["mixup"] and record["grad_clip"] == 1.0
    p = load_protocol(path).with_epochs(1)
    assert record["protocol_hash"] == p.hash(p.pair("resnet14__resnet8x4")) != p.hash(p.pair())
    ckpt = torch.load(resolve(request).run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "StudentEMA" in k]
    assert state["decay"] == 0.9 and any(k.startswith("module.") for k in state["ema"])
