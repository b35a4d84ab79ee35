"""The standard protocols (cifar100, cifar100-hetero, imagenet) encode the reference recipes exactly."""

from __future__ import annotations

import json

import pytest
from distillbench.benchmark.protocol import ProtocolError, load_protocol
from distillbench.methods import get_method

from tests.conftest import REPO, TINY_PROTOCOL, write_protocol

SMALL_LR_STUDENTS = {"mobilenetv2", "shufflenet_v1", "shufflenet_v2"}


def _hparams(protocol, pair, method):
    return get_method(method).resolve_hparams(protocol.methods.get(method), pair.methods.get(method), {})


def test_cifar100_is_mdistillers_recipe():
    p = load_protocol("cifar100")
    assert (p.dataset.name, p.input.size, p.input.channels, p.batch_size, p.epochs) == ("cifar100", 32, 3, 64, 240)
    assert p.input.mean == (0.5071, 0.4867, 0.4408) and p.input.std == (0.2675, 0.2565, 0.2761)
    assert p.augment == {"kind": "padcrop", "pad": 4, "flip": True}
    assert p.optimizer == {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4}
    assert p.schedule == {"name": "multistep", "milestones": [150, 180, 210], "gamma": 0.1}
    assert p.teacher.source == "train" and p.teacher.epochs == 240 and p.teacher.optimizer == p.optimizer
    assert len(p.pairs) == 11 and p.default_pair == "resnet32x4__resnet8x4"
    betas = {}
    for pair in p.pairs:
        assert p.optimizer_for(pair)["lr"] == (0.01 if pair.student in SMALL_LR_STUDENTS else 0.05), pair.name
        kd, dkd = _hparams(p, pair, "kd"), _hparams(p, pair, "dkd")
        assert (kd["temperature"], kd["ce_weight"], kd["kd_weight"]) == (4.0, 0.1, 0.9)
        assert (dkd["alpha"], dkd["temperature"], dkd["warmup_epochs"], dkd["ce_weight"]) == (1.0, 4.0, 20, 1.0)
        betas[pair.name] = dkd["beta"]
    assert betas == {
        "resnet56__resnet20": 2.0,
        "resnet110__resnet32": 2.0,
        "resnet32x4__resnet8x4": 8.0,
        "wrn_40_2__wrn_16_2": 6.0,
        "wrn_40_2__wrn_40_1": 6.0,
        "vgg13__vgg8": 6.0,
        "vgg13__mobilenetv2": 6.0,
        "resnet50_cifar__mobilenetv2": 8.0,
        "resnet32x4__shufflenet_v1": 8.0,
        "wrn_40_2__shufflenet_v1": 8.0,
        "resnet32x4__shufflenet_v2": 8.0,
    }


def test_imagenet_is_mdistillers_recipe_with_imported_teachers():
    p = load_protocol("imagenet")
    assert (p.dataset.name, p.dataset.val_size, p.input.size, p.batch_size, p.epochs) == (
        "imagenet",
        10000,
        224,
        512,
        100,
    )
    assert p.optimizer["lr"] == 0.2 and p.optimizer["weight_decay"] == 1e-4 and p.optimizer["momentum"] == 0.9
    assert p.schedule["milestones"] == [30, 60, 90] and p.schedule["gamma"] == 0.1
    assert p.augment["kind"] == "rrc" and p.augment["crop_pct"] == 0.875
    assert p.teacher.source == "import"
    assert p.pair_names() == ["resnet34__resnet18", "resnet50__mobilenetv1"]
    for pair, beta in zip(p.pairs, (0.5, 2.0), strict=True):
        kd, dkd = _hparams(p, pair, "kd"), _hparams(p, pair, "dkd")
        assert (kd["temperature"], kd["ce_weight"], kd["kd_weight"]) == (1.0, 0.5, 0.5)
        assert (dkd["beta"], dkd["alpha"], dkd["temperature"], dkd["warmup_epochs"], dkd["ce_weight"]) == (
            beta,
            1.0,
            1.0,
            1,
            1.0,
        )
    with pytest.raises(ProtocolError, match="imported, not trained"):
        p.with_teacher_epochs(1)


def test_cifar100_hetero_is_ofas_cnn_recipe():
    p = load_protocol("cifar100-hetero")
    assert (p.dataset.name, p.input.size, p.batch_size, p.epochs, p.label_smoothing) == (
        "cifar100",
        224,
        1024,
        300,
        0.1,
    )
    assert p.augment["kind"] == "rrc" and p.augment["scale"] == [0.08, 1.0]
    assert p.optimizer["nesterov"] is True and p.optimizer["no_decay_bias_norm"] is True and p.optimizer["lr"] == 0.1
    assert p.schedule == {"name": "cosine", "min_lr": 1e-3, "warmup_epochs": 3, "warmup_lr": 1e-4}
    assert p.teacher.source == "import" and "vit_small_patch16_224__resnet18" in p.pair_names()


def test_teacher_epochs_override_changes_the_teacher_key():
    p = load_protocol("cifar100")
    short = p.with_teacher_epochs(2)
    assert short.teacher.epochs == 2 and short.teacher.schedule["milestones"] == []
    assert short.teacher_key("resnet32x4", "fp") != p.teacher_key("resnet32x4", "fp")
    assert short.hash(p.pair()) != p.hash(p.pair())


def test_small_protocol_hashes_did_not_move():
    """Adding teacher.source must not change the hash of protocols that predate it (records, teacher store)."""
    for name in ("digits", "fmnist"):
        record = REPO / "leaderboards" / "records" / name / "kd" / "resnet20__resnet8" / "seed0.json"
        p = load_protocol(name)
        assert p.hash(p.pair()) == json.loads(record.read_text())["protocol_hash"]


def test_teacher_source_is_validated(tmp_path):
    bad = {**TINY_PROTOCOL, "teacher": {**TINY_PROTOCOL["teacher"], "source": "download"}}
    with pytest.raises(ProtocolError, match=r"teacher\.source must be one of train, import"):
        load_protocol(write_protocol(tmp_path / "a.yaml", bad))
    bad = {**TINY_PROTOCOL, "teacher": {"source": "train"}}
    with pytest.raises(ProtocolError, match=r"teacher\.epochs must be ≥ 1"):
        load_protocol(write_protocol(tmp_path / "b.yaml", bad))
    ok = {**TINY_PROTOCOL, "teacher": {"source": "import"}}
    assert load_protocol(write_protocol(tmp_path / "c.yaml", ok)).teacher.source == "import"


def test_imported_teachers_are_never_trained(tmp_path):
    from distillbench.benchmark.teachers import TeacherError, ensure_teacher, train_teacher

    p = load_protocol("imagenet")
    with pytest.raises(TeacherError, match=r"teachers are imported, not trained.*teachers import --protocol imagenet"):
        ensure_teacher(p, "resnet34", data_fingerprint="x", root=tmp_path)
    with pytest.raises(TeacherError, match="teachers are imported"):
        train_teacher(p, "resnet34", root=tmp_path)


def test_global_batch_must_divide_over_all_nodes():
    from distillbench.benchmark.errors import BenchmarkError
    from distillbench.benchmark.runner import RunRequest, resolve

    with pytest.raises(BenchmarkError, match=r"not divisible by 3 devices; choose DEVICES × NUM_NODES"):
        resolve(RunRequest(method="kd", protocol="digits", num_nodes=3))
    assert resolve(RunRequest(method="kd", protocol="digits", num_nodes=2)).protocol.batch_size == 64


def test_imagenet_hetero_is_ofas_imagenet_cnn_recipe():
    """ofa.md §4 / official configs/imagenet/cnn.yaml: timm `step` every 30 epochs after a 3-epoch warm-up."""
    p = load_protocol("imagenet-hetero")
    assert (p.dataset.name, p.input.size, p.batch_size, p.epochs, p.label_smoothing) == ("imagenet", 224, 512, 100, 0.1)
    assert p.optimizer == {
        "name": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-4,
        "no_decay_bias_norm": True,
    }
    assert p.schedule == {
        "name": "multistep",
        "milestones": [30, 60, 90],
        "gamma": 0.1,
        "warmup_epochs": 3,
        "warmup_lr": 1e-4,
    }
    assert p.teacher.source == "import" and p.dataset.val_size == 10000
    cnn_students = [pair for pair in p.pairs if pair.student in ("resnet18", "mobilenetv2_100")]
    for pair in cnn_students:
        hp = _hparams(p, pair, "ofa")
        assert (hp["eps"], hp["ofa_weight"], hp["stages"]) == (1.5, 1.0, [1, 2, 3, 4]), pair.name
    # the ViT student (ConvNeXt-T -> DeiT-T) keeps the official code's default eps = 1.0 and its own recipe
    (vit_pair,) = [pair for pair in p.pairs if pair not in cnn_students]
    assert vit_pair.name == "convnext_tiny__deit_tiny_patch16_224"
    assert _hparams(p, vit_pair, "ofa")["eps"] == 1.0


def test_schedules_are_validated(tmp_path):
    bad = {**TINY_PROTOCOL, "schedule": {"name": "poly"}}
    with pytest.raises(ProtocolError, match="unknown schedule 'poly'; valid: multistep, cosine, constant"):
        load_protocol(write_protocol(tmp_path / "a.yaml", bad))
    bad = {**TINY_PROTOCOL, "schedule": {"name": "multistep", "milestones": [1], "warmup_epochs": 9}}
    with pytest.raises(ProtocolError, match=r"schedule: warmup_epochs must be an integer in 0\.\.1, got 9"):
        load_protocol(write_protocol(tmp_path / "b.yaml", bad))
