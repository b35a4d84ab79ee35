"""ND loss (KD++ / DKD++): hand values, invariants, gradients, class means and their cache, the modules."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.runner import RunRequest, make_datamodule, run
from distillbench.benchmark.zoo import create_model
from distillbench.methods import FrozenTeacher, MethodError, StageContext, get_method
from distillbench.methods.nd import (
    ClassMeansMismatchError,
    EmbProjector,
    class_means,
    class_means_metadata,
    class_means_path,
    embedding_width,
    linear_warmup,
    nd_loss,
    nd_per_sample,
    run_class_means_stage,
)
from torch import nn

from tests.conftest import write_protocol

C = torch.tensor([[2.0, 0.0], [0.0, 5.0]])


# -- the loss --------------------------------------------------------------------------------------
def test_hand_values_direction_only_versus_norm_pushed_up():
    s = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 10.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    # ‖s‖ = 5 < ‖t‖ = 10: 1 − 3/10 = 0.7 (the norm term is active); ‖s‖ = 5 ≥ ‖t‖ = 1: 1 − cos = 1 − 3/5 = 0.4
    assert nd_per_sample(s, t, C, y).tolist() == pytest.approx([0.7, 0.4], abs=1e-7)
    assert nd_loss(s, t, C, y).item() == pytest.approx(0.55, abs=1e-7)


def test_invariants():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(32, 6, generator=g)
    t = torch.randn(32, 6, generator=g) * torch.linspace(0.3, 3, 32).unsqueeze(1)
    means, y = torch.randn(4, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    base = nd_per_sample(s, t, means, y)
    assert torch.allclose(nd_per_sample(s, t, means * 7.5, y), base, atol=1e-6)  # only the direction of c_y
    assert ((base >= 0) & (base <= 2)).all()
    big = s.norm(dim=1) >= t.norm(dim=1)
    cos = nn.functional.cosine_similarity(s, means[y], dim=1)
    assert big.any() and (~big).any()
    assert torch.allclose(base[big], 1 - cos[big], atol=1e-6)
    assert torch.allclose(base[~big], 1 - (s.norm(dim=1) / t.norm(dim=1) * cos)[~big], atol=1e-6)
    e = means[y] / means[y].norm(dim=1, keepdim=True)
    aligned = e * (t.norm(dim=1, keepdim=True) * 1.5)
    assert torch.allclose(nd_per_sample(aligned, t, means, y), torch.zeros(32), atol=1e-6)


def test_gradients():
    t = torch.tensor([[0.0, 10.0]])
    s = torch.tensor([[3.0, 4.0]], requires_grad=True)  # ‖s‖ < ‖t‖: ℓ = 1 − ⟨s, e⟩/‖t‖, ∂ℓ/∂s = −e/‖t‖
    nd_loss(s, t, C, torch.tensor([0])).backward()
    assert torch.allclose(s.grad, torch.tensor([[-0.1, 0.0]]), atol=1e-7)
    s = torch.tensor([[3.0, 4.0]], requires_grad=True)  # ‖s‖ > ‖t‖: direction only, gradient ⟂ s
    nd_loss(s, torch.tensor([[0.0, 1.0]]), C, torch.tensor([0])).backward()
    assert s.grad.norm() > 0 and abs(float((s.grad * s.detach()).sum())) < 1e-6


def test_vectorised_equals_a_per_sample_loop():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(16, 64)), rng.normal(size=(16, 64)) * rng.uniform(0.5, 2, size=(16, 1))
    means, y = rng.normal(size=(10, 64)), rng.integers(0, 10, size=16)
    expected = []
    for b in range(16):
        centre = means[y[b]] / math.sqrt(sum(v * v for v in means[y[b]]))
        dot = sum(a * c for a, c in zip(s[b], centre, strict=True))
        expected.append(1 - dot / max(np.linalg.norm(s[b]), np.linalg.norm(t[b])))
    got = nd_loss(*(torch.tensor(a, dtype=torch.float32) for a in (s, t, means)), torch.tensor(y))
    assert got.item() == pytest.approx(float(np.mean(expected)), abs=1e-6)


def test_shape_errors_are_clear():
    with pytest.raises(MethodError, match="project the student"):
        nd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


def test_warmup_is_zero_based():
    assert linear_warmup(0, 20) == 0.0 and linear_warmup(10, 20) == 0.5 and linear_warmup(20, 20) == 1.0
    assert linear_warmup(0, 0) == 1.0


# -- class means ------------------------------------------------------------------------------------
class _Flatten(nn.Module):
    """An identity 'teacher': the embedding is the flattened image; records calls and its mode."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls, self.modes = 0, []
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward_features(self, x):
        self.calls += 1
        self.modes.append(self.training)
        return x.flatten(1)

    def forward_head(self, x, pre_logits=False):
        assert pre_logits
        return x


def test_class_means_equal_numpy_means_in_one_eval_pass():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 4)).astype(np.float32), np.arange(30) % 3
    loader = [(torch.tensor(x[i : i + 8]), torch.tensor(y[i : i + 8])) for i in range(0, 30, 8)]
    teacher = _Flatten().train()
    means = class_means(teacher, loader)
    expected = np.stack([x[y == k].mean(0) for k in range(3)])
    assert np.allclose(means.numpy(), expected, atol=1e-6) and means.dtype == torch.float32
    assert teacher.calls == len(loader) and not any(teacher.modes) and teacher.training
    rounded = class_means(teacher.eval(), loader, round_decimals=4)
    official = np.round(np.stack([np.round(x[y == k].astype(np.float64), 4).mean(0) for k in range(3)]), 4)
    assert np.allclose(rounded.numpy(), official, atol=1e-6) and not teacher.training
    with pytest.raises(MethodError, match=r"class\(es\) \[2\]"):
        class_means(teacher, [(torch.tensor(x[:2]), torch.tensor([0, 1]))])


# -- the stage and its cache ---------------------------------------------------------------------------
def _context(protocol, datamodule, model, sha, cache_dir):
    return StageContext(
        method="kd++",
        hparams={},
        datamodule=datamodule,
        teacher=FrozenTeacher(model),
        teacher_info={"arch": "resnet8", "checkpoint_sha256": sha},
        protocol=dataclasses.asdict(protocol),
        seed=0,
        work_dir=cache_dir,
        cache_dir=cache_dir,
    )


def test_means_are_cached_and_keyed_by_the_teacher_hash(tiny_protocol_path, tmp_path):
    protocol = load_protocol(tiny_protocol_path)
    datamodule = make_datamodule(protocol, seed=3)
    torch.manual_seed(0)
    teacher_a = create_model("resnet8", num_classes=10, in_chans=1)
    teacher_b = create_model("resnet8", num_classes=10, in_chans=1)
    ctx_a = _context(protocol, datamodule, teacher_a, "a" * 64, tmp_path)
    means_a = run_class_means_stage(ctx_a)
    assert means_a.shape == (10, 64)
    path_a = class_means_path(tmp_path, class_means_metadata(ctx_a))
    assert path_a.is_file()
    # the cache is reused: a poisoned teacher would fail if it were called
    ctx_a.teacher.model.forward_features = None
    assert torch.equal(run_class_means_stage(ctx_a), means_a)
    # another teacher (another sha256) recomputes and never sees A's means
    ctx_b = _context(protocol, datamodule, teacher_b, "b" * 64, tmp_path)
    means_b = run_class_means_stage(ctx_b)
    assert not torch.allclose(means_a, means_b)
    assert len(list(tmp_path.glob("resnet8.class_means-*.safetensors"))) == 2
    # an artifact whose teacher sha256 differs from the run's teacher is refused
    path_b = class_means_path(tmp_path, class_means_metadata(ctx_b))
    shutil.copyfile(path_a, path_b)
    with pytest.raises(ClassMeansMismatchError, match="teacher_sha256"):
        run_class_means_stage(ctx_b)
    # another transform is another key; the run seed is not
    other = dataclasses.replace(protocol, augment={"kind": "padcrop", "pad": 2, "flip": False})
    ctx_t = _context(other, make_datamodule(other, seed=3), teacher_a, "a" * 64, tmp_path)
    assert class_means_path(tmp_path, class_means_metadata(ctx_t)) != path_a
    ctx_seed = _context(protocol, make_datamodule(protocol, seed=4), teacher_a, "a" * 64, tmp_path)
    assert class_means_path(tmp_path, class_means_metadata(ctx_seed)) == path_a


# -- modules ----------------------------------------------------------------------------------------
def _module(method, student="resnet8", teacher="resnet8", overrides=None, d_teacher=64):
    spec = get_method(method)
    hparams = spec.resolve_hparams(overrides)
    cls, stages = spec.plan(hparams)
    assert [s.name for s in stages] == ["class_means"]
    torch.manual_seed(0)
    t = create_model(teacher, num_classes=10, in_chans=1)
    means = torch.randn(10, d_teacher)
    return cls(
        create_model(student, num_classes=10, in_chans=1),
        FrozenTeacher(t),
        num_classes=10,
        hparams=hparams,
        artifacts={"class_means": means},
    )


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(8, 1, 8, 8, generator=g), "label": torch.arange(8) % 10, "index": torch.arange(8)}


def _at_epoch(monkeypatch, module, epoch):
    monkeypatch.setattr(type(module), "current_epoch", property(lambda self: epoch))


def test_kdpp_warmup_and_terms(monkeypatch):
    module = _module("kd++")
    assert module.nd_projector is None and module.adapter_parameters() == []
    _at_epoch(monkeypatch, module, 0)
    terms = module.losses(_batch())
    assert set(terms) == {"ce", "kd", "nd"} and terms["kd"].item() == 0.0 and terms["nd"].item() > 0
    _at_epoch(monkeypatch, module, 20)
    terms = module.losses(_batch())
    assert terms["kd"].item() > 0
    # the ND term equals nd_loss on the classifier inputs of both networks
    x, y = _batch()["image"], _batch()["label"]
    s = module.student.forward_head(module.student.forward_features(x), pre_logits=True)
    t = module.teacher.run(lambda m, v: m.forward_head(m.forward_features(v), pre_logits=True), x)
    assert terms["nd"].item() == pytest.approx(nd_loss(s, t, module.nd_class_means, y).item(), rel=1e-5)


def test_dkdpp_warmup_nd_ramps_only_the_nd_term(monkeypatch):
    module = _module("dkd++", overrides={"warmup_nd": True, "nd_weight": 2.0})
    plain = _module("dkd++", overrides={"nd_weight": 2.0})
    _at_epoch(monkeypatch, module, 10)
    ramped, full = module.losses(_batch()), plain.losses(_batch())
    assert ramped["nd"].item() == pytest.approx(0.5 * full["nd"].item(), rel=1e-5)
    assert ramped["dkd"].item() == pytest.approx(full["dkd"].item(), rel=1e-5)


def test_projector_when_widths_differ_is_an_adapter_used_only_by_nd(monkeypatch):
    module = _module("kd++", teacher="wrn_16_2", d_teacher=128)
    assert isinstance(module.nd_projector, EmbProjector)
    n_proj = sum(p.numel() for p in module.nd_projector.parameters())
    assert n_proj == 2 * 64 + 64 * 128 + 128
    assert sum(p.numel() for p in module.adapter_parameters()) == n_proj
    terms = module.losses(_batch())
    terms["nd"].backward()
    assert module.nd_projector[2].weight.grad is not None
    assert module.student.fc.weight.grad is None  # the ND term never touches the classifier
    imagenet = EmbProjector(64, 128, init="imagenet")
    assert imagenet[2].bias.abs().sum() > 0 and imagenet[2].weight.std() < 0.02
    assert EmbProjector(64, 128)[2].bias.abs().sum() == 0
    with pytest.raises(MethodError, match="projector init"):
        EmbProjector(4, 8, init="other")


def test_nd_attaches_to_any_logit_method_through_configuration():
    module = _module("dkd", overrides={"nd": {"weight": 0.5}})
    terms = module.losses(_batch())
    assert set(terms) == {"ce", "dkd", "nd"}
    assert get_method("dkd").plan(get_method("dkd").resolve_hparams())[1] == ()
    with pytest.raises(MethodError, match="no setting"):
        get_method("kd").resolve_hparams({"nd": {"wieght": 1.0}})
    with pytest.raises(MethodError, match="no hyper-parameter"):
        get_method("vanilla").resolve_hparams({"nd": {"weight": 1.0}})


def test_protocol_weights_match_the_official_scripts():
    cifar, imagenet = load_protocol("cifar100"), load_protocol("imagenet")

    def hp(protocol, pair, method):
        return get_method(method).resolve_hparams(protocol.methods.get(method), protocol.pair(pair).methods.get(method))

    kd = {p: hp(cifar, p, "kd++") for p in cifar.pair_names()}
    dkd = {p: hp(cifar, p, "dkd++") for p in cifar.pair_names()}
    assert (kd["resnet56__resnet20"]["kd_weight"], kd["resnet56__resnet20"]["nd_weight"]) == (1.0, 2.0)
    assert (kd["resnet32x4__shufflenet_v2"]["kd_weight"], kd["resnet32x4__shufflenet_v2"]["nd_weight"]) == (4.0, 0.5)
    d = dkd["resnet32x4__resnet8x4"]
    assert (d["alpha"], d["beta"], d["nd_weight"], d["warmup_epochs"], d["temperature"]) == (2.0, 8.0, 0.5, 20, 4.0)
    assert (kd["vgg13__vgg8"]["kd_weight"], kd["vgg13__vgg8"]["nd_weight"]) == (1.0, 1.0)  # untuned pair
    r18 = hp(imagenet, "resnet34__resnet18", "dkd++")
    assert (r18["alpha"], r18["beta"], r18["nd_weight"], r18["warmup_epochs"], r18["warmup_nd"]) == (
        0.8,
        0.5,
        1.0,
        5,
        True,
    )
    assert r18["projector_init"] == "imagenet" and r18["temperature"] == 1.0
    mv1 = hp(imagenet, "resnet50__mobilenetv1", "kd++")
    assert (mv1["kd_weight"], mv1["nd_weight"], mv1["warmup_nd"]) == (4.0, 1.0, False)


def test_kdpp_runs_end_to_end_and_caches_means_beside_the_teacher(tiny_protocol_path, teacher_store, tmp_path):
    request = RunRequest(
        method="kd++",
        protocol=str(tiny_protocol_path),
        teachers=str(teacher_store),
        results=str(tmp_path),
        progress=False,
        wandb=False,
        measure_overhead=False,
        hparams={"warmup_epochs": 1},
        epochs=1,
    )
    record = run(request, say=lambda m: None)
    assert record["status"] == "finished" and record["adapter_params"] == 0
    assert record["stage_time_s"]["class_means"] >= 0
    assert record["metrics"]["top1"] > 30
    cached = list((teacher_store / "tinydigits").glob("resnet14.class_means-*.safetensors"))
    assert len(cached) == 1
    assert record["hparams"]["nd_weight"] == 1.0 and record["hparams"]["warmup_epochs"] == 1
    assert json.loads(next(tmp_path.rglob("seed0.json")).read_text())["run_id"] == record["run_id"]


def test_a_protocol_can_attach_nd_to_kd(tmp_path, teacher_store, tiny_protocol_path):
    import yaml

    data = yaml.safe_load(tiny_protocol_path.read_text())
    data["epochs"] = 1
    data["methods"]["kd"]["nd"] = {"weight": 1.0}
    path = write_protocol(tmp_path / "tinydigits.yaml", data)
    request = RunRequest(
        method="kd",
        protocol=str(path),
        teachers=str(teacher_store),
        results=str(tmp_path / "res"),
        progress=False,
        wandb=False,
        measure_overhead=False,
    )
    record = run(request, say=lambda m: None)
    assert record["status"] == "finished" and record["hparams"]["nd"]["weight"] == 1.0
    assert record["method"] == "kd" and len(list(teacher_store.rglob("resnet14.class_means-*"))) == 1


def test_embedding_widths_of_the_projector_pairs():
    """nd.md §2: the pairs that need a projector, D_S → D_T."""
    widths = {
        ("wrn_40_2", "wrn_40_1"): (64, 128),
        ("resnet50_cifar", "mobilenetv2"): (1280, 2048),
        ("resnet32x4", "shufflenet_v1"): (960, 256),
        ("resnet32x4", "shufflenet_v2"): (1024, 256),
        ("resnet56", "resnet20"): (64, 64),
    }
    for (teacher, student), expected in widths.items():
        got = tuple(embedding_width(create_model(a, num_classes=100, in_chans=3)) for a in (student, teacher))
        assert got == expected, (teacher, student)


def test_stored_teacher_logits_still_give_the_teacher_embedding():
    module = _module("kd++")
    live = module.losses(_batch())
    batch = {**_batch(), "teacher_logits": module.teacher.logits(_batch()["image"])}
    cached = module.losses(batch)
    assert cached["nd"].item() == pytest.approx(live["nd"].item(), rel=1e-6)
