"""FKD and FerKD: losses against hand-computed values, calibration, SelfMix, and end-to-end runs from the
soft-label store, including KD with TEACHER_CACHE (ferkd.md §7, tests 3, 7, 8, 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.runner import RunRequest, resolve, run
from distillbench.benchmark.zoo import create_model
from distillbench.methods import MethodError
from distillbench.methods.ferkd import HARD, NORMAL, FerKD, calibrate, crop_categories, self_mix
from distillbench.methods.fkd import FKD, cutmix_box, mix_pairs, soft_cross_entropy
from distillbench.methods.registry import get_method

from .conftest import TINY_PROTOCOL, write_protocol


# -- losses --------------------------------------------------------------------------------------
def test_soft_cross_entropy_reference_values():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 5, generator=g), dim=1)
    assert soft_cross_entropy(torch.zeros(4, 5), p).item() == pytest.approx(math.log(5), abs=1e-6)
    logits, y = torch.randn(6, 5, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(y, 5).float()), F.cross_entropy(logits, y))
    # by hand: log softmax([0, ln 3]) = [ln 1/4, ln 3/4]; −½(ln ¼ + ln ¾) = 0.8369882
    value = soft_cross_entropy(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.5, 0.5]]))
    assert value.item() == pytest.approx(0.5 * (math.log(4) + math.log(4 / 3)), abs=1e-6)


# -- FerKD calibration ---------------------------------------------------------------------------
def test_quantile_rule_marks_exactly_the_least_confident_crops():
    g = torch.Generator().manual_seed(1)
    gt_prob = torch.rand(5, 8, generator=g)
    cats = crop_categories(gt_prob, "quantile", q_hard=0.25)
    assert cats.dtype == torch.int8 and cats.shape == (5, 8)
    for i in range(5):
        lowest = set(gt_prob[i].argsort()[:2].tolist())
        assert set(torch.nonzero(cats[i] == HARD).flatten().tolist()) == lowest
    assert (crop_categories(gt_prob, "quantile", q_hard=0.0) == NORMAL).all()
    assert torch.equal(crop_categories(gt_prob, "threshold", tau_hard=0.3) == HARD, gt_prob < 0.3)
    easy = crop_categories(gt_prob, "quantile", q_hard=0.25, q_easy=0.25) == 2
    assert torch.equal(easy.sum(1), torch.full((5,), 2))
    for i in range(5):
        assert set(torch.nonzero(easy[i]).flatten().tolist()) == set(gt_prob[i].argsort()[-2:].tolist())
    with pytest.raises(MethodError, match="unknown rule"):
        crop_categories(gt_prob, "median")


def test_calibrate_replaces_hard_crops_by_smoothed_ground_truth():
    soft = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    out = calibrate(soft, torch.tensor([HARD, NORMAL, HARD], dtype=torch.int8), torch.tensor([2, 0, 1]), 4, 0.1)
    torch.testing.assert_close(out[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    torch.testing.assert_close(out[1], soft[1])
    torch.testing.assert_close(out[2], torch.tensor([0.025, 0.925, 0.025, 0.025]))


# -- SelfMix -------------------------------------------------------------------------------------
class _FixedRng:
    """A stand-in generator: λ and the box centre are chosen by the test."""

    def __init__(self, lam: float, centre: int = 0):
        self.lam, self.centre = lam, centre

    def beta(self, a, b):
        return self.lam

    def integers(self, n):
        return self.centre

    def random(self):
        return 0.0


def test_self_mix_pairs_crops_of_the_same_image():
    b_img, n = 3, 2
    image_id = torch.arange(b_img).repeat(n)  # crop-major: images 0,1,2 then 0,1,2
    images = image_id.float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone() * 10 + torch.arange(n).repeat_interleave(
        b_img
    ).float().view(-1, 1, 1, 1)
    soft = F.one_hot(torch.arange(b_img * n) % 4, 4).float()
    rng = np.random.default_rng(0)
    for mode in ("cutmix", "mixup", "switch"):
        mixed, labels = self_mix(images, soft, n, rng, mode)
        assert torch.equal((mixed // 10).long().view(len(mixed), -1).unique(dim=1).flatten(), image_id)
        torch.testing.assert_close(labels.sum(1), torch.ones(b_img * n))
    same, same_labels = self_mix(images, soft, n, _FixedRng(1.0), "cutmix")
    assert torch.equal(same, images) and torch.equal(same_labels, soft)
    with pytest.raises(MethodError, match="SelfMix needs"):
        self_mix(images, soft, 1, rng)


def test_cutmix_area_sets_lambda_and_mixup_blends():
    assert cutmix_box(8, 8, 0.75, _FixedRng(0.75, centre=4)) == (2, 6, 2, 6)
    x = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    soft = torch.eye(2)
    mixed, labels, lam = mix_pairs(x, soft, torch.tensor([1, 0]), _FixedRng(0.75, centre=4), "cutmix")
    assert lam == 0.75 and mixed[0].sum() == 16 and torch.allclose(labels[0], torch.tensor([0.75, 0.25]))
    mixed, labels, lam = mix_pairs(x, soft, torch.tensor([1, 0]), _FixedRng(0.3), "mixup")
    assert torch.allclose(mixed[0], torch.full((1, 8, 8), 0.7)) and torch.allclose(labels[1], torch.tensor([0.7, 0.3]))


# -- modules -------------------------------------------------------------------------------------
def _batch(n_img=4, n=2, k=10):
    g = torch.Generator().manual_seed(3)
    index = torch.arange(n_img).repeat(n)
    return {
        "image": torch.randn(n_img * n, 1, 8, 8, generator=g),
        "label": index % k,
        "index": index,
        "crop": torch.arange(n).repeat_interleave(n_img),
        "soft_target": torch.softmax(torch.randn(n_img * n, k, generator=g), 1),
    }


def _module(cls, name, **hp):
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=10, in_chans=1)
    hparams = get_method(name).resolve_hparams(hp)
    confidence = torch.rand(4, 2, generator=torch.Generator().manual_seed(4))
    artifacts = {"soft_labels": {"categories": crop_categories(confidence, q_hard=hparams.get("q_hard", 0.0))}}
    return cls(student, object(), num_classes=10, hparams=hparams, artifacts=artifacts)


def test_ferkd_without_calibration_and_selfmix_is_fkd():
    batch = _batch()
    fkd = _module(FKD, "fkd")
    ferkd = _module(FerKD, "ferkd", q_hard=0.0, selfmix=False)
    ferkd.log = fkd.log = lambda *a, **k: None
    assert torch.equal(fkd.losses(batch)["soft_ce"], ferkd.losses(batch)["soft_ce"])
    calibrated = _module(FerKD, "ferkd", selfmix=False, q_hard=0.5)
    calibrated.log = lambda *a, **k: None
    assert not torch.equal(calibrated.losses(batch)["soft_ce"], fkd.losses(batch)["soft_ce"])
    with pytest.raises(MethodError, match="num_crops ≥ 2"):
        _module(FerKD, "ferkd", num_crops=1)


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_protocol(tmp_path_factory):
    data = {
        **TINY_PROTOCOL,
        "epochs": 3,
        "soft_labels": {
            "num_crops": 4,
            "k": 3,
            "scale": [0.25, 1.0],
            "ratio": [0.75, 1.3333],
            "flip": False,
        },
    }
    return write_protocol(tmp_path_factory.mktemp("protocols") / "tinydigits.yaml", data)


def _request(protocol, teachers, results, method, **kw):
    return RunRequest(
        method=method,
        protocol=str(protocol),
        teachers=str(teachers),
        results=str(results),
        progress=False,
        wandb=False,
        **kw,
    )


def test_fkd_ferkd_and_cached_kd_train_from_the_store(store_protocol, teacher_store, tmp_path):
    fkd = run(_request(store_protocol, teacher_store, tmp_path, "fkd"), say=lambda m: None)
    assert fkd["status"] == "finished" and fkd["teacher_source"] == "store"
    assert fkd["soft_labels"]["num_crops"] == 4 and fkd["soft_labels"]["crops_per_image"] == 2
    assert fkd["protocol_hash"] != load_protocol(store_protocol).hash(load_protocol(store_protocol).pair())
    assert fkd["overhead_vs_student"] > 0  # measured; its size is the cache_overhead benchmark's job
    ferkd = run(_request(store_protocol, teacher_store, tmp_path, "ferkd", measure_overhead=False), say=lambda m: None)
    assert ferkd["status"] == "finished" and ferkd["protocol_hash"] == fkd["protocol_hash"]
    assert ferkd["hparams"]["q_hard"] == 0.1 and ferkd["hparams"]["selfmix"] is True
    cached = run(
        _request(store_protocol, teacher_store, tmp_path, "kd", teacher_cache="1", measure_overhead=False),
        say=lambda m: None,
    )
    assert cached["variant"] == "teacher_cache=1" and cached["teacher_source"] == "store"
    assert cached["protocol_hash"] == fkd["protocol_hash"] and cached["metrics"]["top1"] > 30
    live = resolve(_request(store_protocol, teacher_store, tmp_path, "vanilla", augment="store"))
    assert live.variant == "augment=store" and live.protocol.hash(live.pair) == fkd["protocol_hash"]
    expected = {"kind": "rrc", "scale": [0.25, 1.0], "ratio": [0.75, 1.3333], "flip": False, "crop_pct": 1.0}
    assert live.protocol.train_augment == expected


def test_softlabels_command_builds_a_partial_store_and_checks_it(store_protocol, teacher_store, tmp_path, capsys):
    from distillbench.benchmark.cli import main

    args = ["softlabels", "--protocol", str(store_protocol), "--teachers", str(teacher_store), "--no-progress"]
    assert main([*args, "--limit", "40", "--crops", "2", "--verify", "8", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "40 images × 2 crops" in out and '"topk_indices_equal": 1.0' in out
    assert main([*args, "--limit", "40", "--crops", "3", "--out", str(tmp_path / "s")]) == 4  # data category
    assert "does not match this run (num_crops: store 2 ≠ run 3)" in " ".join(capsys.readouterr().err.split())
