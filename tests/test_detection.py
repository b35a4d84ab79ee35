"""Detection distillation: ROI KD / ND losses against independent values, the detector zoo, the frozen teacher
inside the detector's training loop, and ND's (K+1)-class box-head means."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from distillbench.benchmark.zoo import create_model
from distillbench.datasets.coco import CocoDetection, collate
from distillbench.datasets.shapes import make_shapes
from distillbench.methods import FrozenTeacher, get_method
from distillbench.methods.detection import (
    DetectionKD,
    DetectionKDND,
    DetectionVanilla,
    detection_class_means,
    roi_kd_loss,
    roi_nd_loss,
    student_roi_pass,
    teacher_roi_outputs,
)
from distillbench.methods.errors import MethodError

TINY = "fasterrcnn_mobilenet_v3_small_fpn_tiny"


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    root = make_shapes(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=2, image_size=48, seed=3)
    return CocoDetection(root, "train"), CocoDetection(root, "val")


def _batch(dataset, n=2):
    return collate([dataset[i] for i in range(n)])


def _detector(seed: int, name: str = TINY):
    torch.manual_seed(seed)
    return create_model(name, num_classes=3, image_size=48)


# -- losses -----------------------------------------------------------------------------------------
def test_roi_kd_equals_numpy_kl_over_k_plus_one_classes():
    rng = np.random.default_rng(0)
    zs, zt = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    for t in (1.0, 2.0):
        ps = np.exp(zs / t) / np.exp(zs / t).sum(1, keepdims=True)
        pt = np.exp(zt / t) / np.exp(zt / t).sum(1, keepdims=True)
        expected = (t * t * (pt * (np.log(pt) - np.log(ps))).sum(1)).mean()
        got = roi_kd_loss(torch.tensor(zs), torch.tensor(zt), t)
        assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(roi_kd_loss(torch.tensor(zt), torch.tensor(zt), 1.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(MethodError, match="K\\+1"):
        roi_kd_loss(torch.zeros(5, 4), torch.zeros(5, 3))


def test_roi_nd_hand_values_with_a_background_centre():
    # class 0 = background with centre (0, 5), class 2 with centre (2, 0) (nd.md §7 hand values)
    means = torch.tensor([[0.0, 5.0], [1.0, 1.0], [2.0, 0.0]])
    s = torch.tensor([[3.0, 4.0], [3.0, 4.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 10.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([2, 2, 0])
    # ℓ = 1 − ⟨s, e_y⟩ / max(‖s‖, ‖t‖): 1 − 3/10 = 0.7; 1 − 3/5 = 0.4; background e = (0, 1): 1 − 4/5 = 0.2
    assert float(roi_nd_loss(s, t, means, y)) == pytest.approx((0.7 + 0.4 + 0.2) / 3, abs=1e-6)
    with pytest.raises(MethodError, match="outside"):
        roi_nd_loss(s, t, means, torch.tensor([2, 3, 0]))
    with pytest.raises(MethodError, match="labels must be"):
        roi_nd_loss(s, t, means, torch.tensor([2, 0]))


# -- zoo and registry -----------------------------------------------------------------------------------
def test_detectors_are_built_by_name_with_k_plus_one_outputs():
    model = create_model("fasterrcnn_resnet18_fpn_tiny", num_classes=3, image_size=64)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.transform.min_size == (64,)
    assert all(p.requires_grad for p in model.parameters())  # random init: everything trains
    full = create_model("fasterrcnn_resnet18_fpn", num_classes=80)
    assert full.roi_heads.box_predictor.cls_score.in_features == 1024
    with pytest.raises(ValueError, match="in_chans"):
        create_model(TINY, num_classes=3, in_chans=1)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small", "mobilenet_v3_large"])
def test_tiny_detectors_see_small_objects_from_stride_4(backbone):
    # a 64 px image: FPN maps at strides 4, 8, 16, 32 (+ pool), anchors from 8 px, whatever the backbone
    model = create_model(f"fasterrcnn_{backbone}_fpn_tiny", num_classes=3, image_size=64).eval()
    with torch.no_grad():
        maps = model.backbone(torch.zeros(1, 3, 64, 64))
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert [s[0] for s in model.rpn.anchor_generator.sizes] == [8, 16, 32, 64, 128]


def test_full_mobilenet_detector_keeps_torchvisions_two_taps():
    model = create_model("fasterrcnn_mobilenet_v3_large_fpn", num_classes=80).eval()
    with torch.no_grad():
        maps = model.backbone(torch.zeros(1, 3, 320, 320))
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(10, 10), (10, 10), (5, 5)]


def test_detection_methods_are_registered_beside_classification_ones():
    assert get_method("kd", task="detection").module_cls is DetectionKD
    assert get_method("kd++", task="detection").module_cls is DetectionKDND
    assert get_method("vanilla", task="detection").module_cls is DetectionVanilla
    assert get_method("kd").module_cls is not DetectionKD
    assert get_method("kd++", task="detection").defaults["nd_weight"] == 1.5
    with pytest.raises(MethodError, match="registered for detection"):
        get_method("ofa", task="detection")


# -- detector passes ----------------------------------------------------------------------------------
def test_student_pass_matches_torchvision_losses_and_teacher_sees_the_same_boxes(shapes_set):
    train, _ = shapes_set
    images, targets = _batch(train)
    student = _detector(0).train()
    roi = student_roi_pass(student, images, targets)
    torch.manual_seed(1)
    roi = student_roi_pass(student, images, targets)
    torch.manual_seed(1)
    ref = student(list(images), [{k: t[k] for k in ("boxes", "labels")} for t in targets])
    assert float(roi.losses["cls"].detach()) == pytest.approx(float(ref["loss_classifier"].detach()), rel=1e-5)
    assert float(roi.losses["box"].detach()) == pytest.approx(float(ref["loss_box_reg"].detach()), rel=1e-5)
    r = sum(len(p) for p in roi.proposals)
    assert roi.class_logits.shape == (r, 4) and roi.embeddings.shape == (r, 256) and roi.labels.shape == (r,)
    assert set(roi.labels.tolist()) <= {0, 1, 2, 3} and (roi.labels > 0).any()  # gt boxes are proposals too
    teacher = _detector(1).eval()
    with torch.no_grad():
        emb, logits = teacher_roi_outputs(teacher, images, roi.proposals, roi.image_sizes)
    assert emb.shape == (r, 256) and logits.shape == (r, 4)


def _module(cls, teacher, means=None):
    return cls(
        _detector(0),
        FrozenTeacher(teacher) if teacher is not None else None,
        num_classes=3,
        hparams=get_method(cls.method_name, task="detection").defaults,
        optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9},
        artifacts={"class_means": means} if means is not None else {},
    )


def test_teacher_stays_frozen_through_a_training_step(shapes_set):
    train, _ = shapes_set
    teacher = _detector(1)
    teacher.train()  # whatever mode it arrives in, the module must run it frozen
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = _module(DetectionKD, teacher)
    module.train()  # Lightning calls train() on the module every epoch
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    terms = module.losses(_batch(train))
    assert set(terms) == {"rpn_cls", "rpn_box", "cls", "box", "kd"}
    assert float(terms["kd"]) > 0
    loss = sum(terms.values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in module.parameters()}
    changed = [k for k, v in module.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert changed  # the student did train


def test_class_means_have_a_background_row_and_feed_kdpp(shapes_set):
    train, _ = shapes_set
    teacher = _detector(1).train()
    batches = [_batch(train, 2), collate([train[2], train[3]])]
    means = detection_class_means(teacher, batches, num_classes=3)
    assert means.shape == (4, 256) and torch.isfinite(means).all()
    assert teacher.training  # its previous mode is given back
    again = detection_class_means(teacher, batches, num_classes=3)
    assert torch.equal(means, again)  # the sampler's RNG is fixed: a property of the teacher
    with pytest.raises(MethodError, match="no sampled proposal"):
        detection_class_means(teacher, batches, num_classes=5)
    module = _module(DetectionKDND, teacher, means)
    terms = module.losses(_batch(train))
    assert set(terms) == {"rpn_cls", "rpn_box", "cls", "box", "kd", "nd"}
    assert 0.0 <= float(terms["nd"]) / 1.5 <= 2.0 and math.isfinite(float(terms["kd"]))
    with pytest.raises(MethodError, match="K \\+ 1"):
        _module(DetectionKDND, teacher, means[:3])


def test_evaluation_scores_the_student_with_cocoeval(shapes_set):
    _, val = shapes_set
    module = _module(DetectionVanilla, None)
    module.coco_gt = val.coco
    module.eval()
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    with torch.no_grad():
        module.validation_step(_batch(val), 0)
    module._log_eval_metrics()
    assert set(logged) == {f"test/{m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert all(0.0 <= v <= 100.0 for v in logged.values())
