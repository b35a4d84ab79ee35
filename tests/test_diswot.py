"""DisWOT (../shared/methods/diswot.md §6): metrics against hand values and closed forms, the score's
gradient hygiene, Gaussian init, search spaces, aging evolution and the reconstructed distiller."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from distillbench.benchmark.zoo import create_model
from distillbench.methods import MethodError
from distillbench.methods.diswot import (
    aging_evolution,
    diswot_score,
    gaussian_init,
    ickd_loss,
    probe,
    relation_metric,
    score_probes,
    search_space,
    semantic_metric,
)
from torch import nn


# -- 1. relation metric ---------------------------------------------------------------------------
def test_relation_metric_hand_value_and_invariances():
    ft = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(relation_metric(ft, fs)) == pytest.approx((2 - math.sqrt(2)) / 2, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 16, 8, 8, generator=g), torch.randn(6, 64, 2, 2, generator=g)  # any widths
    assert float(relation_metric(a, a)) == 0.0
    base = float(relation_metric(a, b))
    assert base > 0
    assert float(relation_metric(3.0 * a, 0.5 * b)) == pytest.approx(base, rel=1e-5)
    perm = torch.randperm(6, generator=g)
    assert float(relation_metric(a[perm], b[perm])) == pytest.approx(base, rel=1e-5)
    with pytest.raises(MethodError, match="batch"):
        relation_metric(a, b[:5])


# -- 2. semantic metric ---------------------------------------------------------------------------
def test_semantic_metric_hand_values_and_closed_form():
    gt = torch.tensor([[1.0, 1.0]])
    assert float(semantic_metric(gt, torch.tensor([[1.0, -1.0]]))) == pytest.approx(2.0, abs=1e-6)
    for gs in (gt, 3 * gt, -gt):
        assert float(semantic_metric(gt, gs)) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    k, c = 10, 64
    t, s = torch.randn(k, c, generator=g, dtype=torch.float64), torch.randn(k, c, generator=g, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(t, s, dim=1)
    closed = 2 - 2 / (k * c) * ((torch.sign(t) * torch.sign(s)).sum(1) * cos).sum()
    assert float(semantic_metric(t, s)) == pytest.approx(float(closed), abs=1e-6)


def test_semantic_metric_unequal_widths_need_gram():
    t, s = torch.randn(5, 64), torch.randn(5, 32)
    with pytest.raises(MethodError, match="gram"):
        semantic_metric(t, s)
    value = float(semantic_metric(t, s, mode="gram"))
    assert 0 < value < 4
    # gram: H = g gᵀ with rows normalised; identical class-Gram → 0 (an orthogonal map keeps it)
    q, _ = torch.linalg.qr(torch.randn(64, 64))
    assert float(semantic_metric(t, t @ q, mode="gram")) == pytest.approx(0.0, abs=1e-5)


# -- 3. Gaussian init --------------------------------------------------------------------------------
def test_gaussian_init_unit_normal_weights():
    model = nn.Sequential(nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128), nn.Linear(512, 256), nn.LayerNorm(8))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
            nn.init.constant_(m.weight, 3.0), nn.init.constant_(m.bias, 2.0)
    gaussian_init(model, torch.Generator().manual_seed(0))
    for m in (model[0], model[2]):
        w = m.weight.detach()
        assert abs(float(w.mean())) < 0.02 and abs(float(w.std()) - 1) < 0.02
        assert torch.all(m.bias == 0)
    for m in (model[1], model[3]):
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


# -- 4. the score ------------------------------------------------------------------------------------
def _net(name: str, seed: int) -> nn.Module:
    return gaussian_init(create_model(name, num_classes=10, in_chans=1), torch.Generator().manual_seed(seed))


def test_diswot_score_is_reproducible_and_restores_state():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    teacher = _net("resnet14", 0).eval()
    teacher.requires_grad_(False)
    a, b = _net("resnet_depth_111", 1), _net("resnet8", 2)
    s_a = diswot_score(teacher, a, x, y)
    assert diswot_score(teacher, a, x, y) == pytest.approx(s_a, rel=1e-6)  # no gradient accumulation
    s_b = diswot_score(teacher, b, x, y)
    assert diswot_score(teacher, a, x, y) == pytest.approx(s_a, rel=1e-6)
    assert s_a != pytest.approx(s_b)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in (*teacher.parameters(), *a.parameters()))
    # cached probes give the same value; identical networks score 0
    pt, pa = probe(teacher, x, y), probe(a, x, y)
    assert score_probes(pt, pa)["score"] == pytest.approx(s_a, rel=1e-6)
    twin = _net("resnet14", 0)
    assert diswot_score(teacher, twin, x, y) == pytest.approx(0.0, abs=1e-6)


def test_probe_gradient_is_the_full_backprop_fc_gradient():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    net = _net("resnet8", 5)
    ref = create_model("resnet8", num_classes=10, in_chans=1)
    ref.load_state_dict(net.state_dict())
    ref.train()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    assert torch.allclose(probe(net, x, y).fc_grad, ref.fc.weight.grad, atol=1e-6)


# -- 6. zoo / spaces ----------------------------------------------------------------------------------
def test_search_spaces_build_with_64_channels_and_depth():
    s1 = search_space("cifar-resnet-depth")
    assert len(s1) == 64 and s1[0] == "resnet_depth_111" and s1[-1] == "resnet_depth_777" and s1 == sorted(s1)
    small = search_space("small-resnet-depth-width")
    assert len(small) == 54 and len(search_space("small-resnet-depth-width", subset=True)) == 16
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(create_model("resnet_depth_333")) == count(create_model("resnet20"))
    for name in s1[::9] + small[::5]:
        model = create_model(name, num_classes=10)
        digits = [int(c) for c in name.split("_")[2]]
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert model.num_features == 64 and len(convs) + 1 == 2 * sum(digits) + 2
    with pytest.raises(MethodError, match="unknown search space"):
        search_space("nb201")


# -- 7. aging evolution ---------------------------------------------------------------------------
def test_aging_evolution_on_a_toy_space():
    space = [(a, b) for a in range(6) for b in range(6)]

    def mutate(c, rng):
        i = rng.randrange(2)
        new = rng.choice([v for v in range(6) if v != c[i]])
        return (new, c[1]) if i == 0 else (c[0], new)

    calls = []

    def score(c):
        calls.append(c)
        return -((c[0] - 4) ** 2) - (c[1] - 1) ** 2

    def budget(c):
        return c[0] + c[1] <= 7

    result = aging_evolution(
        space, mutate, score, population=8, sample=3, evaluations=30, rng=random.Random(0), budget=budget
    )
    assert len(set(result.initial)) == 8
    assert all(budget(c) for c, _ in result.history)
    assert result.best_score == max(s for _, s in result.history)
    assert result.best == (4, 1)
    assert len(result.history) == 30 and len(calls) == len(set(calls))  # scores cached


# -- 8. reconstructed DisWOT† ------------------------------------------------------------------------
def test_diswot_distiller_terms_and_adapter():
    f = torch.randn(4, 64, 2, 2)
    assert float(ickd_loss(f, f)) == pytest.approx(0.0, abs=1e-7)
    assert float(relation_metric(f, f)) == 0.0
    # ICKD per sample equals the relation metric's formula on the channel axis, scaled by C/(C·B)
    b, c = 2, 3
    x = torch.randn(b, c, 5)
    manual = sum(float(relation_metric(x[i], x[i].flip(0))) * c * c for i in range(b)) / (c * b)
    assert float(ickd_loss(x, x.flip(1))) == pytest.approx(manual, rel=1e-5)

    from distillbench.methods import FrozenTeacher, get_method

    spec = get_method("diswot")
    teacher = FrozenTeacher(create_model("resnet14", num_classes=10, in_chans=1))
    for student_name, has_adapter in (("resnet_depth_111", False), ("resnet8x4", True)):
        hp = spec.resolve_hparams({"distill": "kd+diswot"})
        module = spec.module_cls(
            create_model(student_name, num_classes=10, in_chans=1), teacher, num_classes=10, hparams=hp
        )
        assert (module.adapter is not None) == has_adapter
        batch = {"image": torch.randn(8, 1, 8, 8), "label": torch.randint(0, 10, (8,))}
        terms = module.losses(batch)
        assert set(terms) == {"ce", "kd", "ickd", "sp"} and all(torch.isfinite(v) for v in terms.values())


# -- the runner's Stage mechanism, `search` and `rankstudy` end to end (tiny digits) -------------------
def test_bench_diswot_searches_then_distils_the_chosen_student(tiny_protocol_path, teacher_store, tmp_path):
    from distillbench.benchmark.runner import RunRequest, run

    hp = {"max_params": 60_000, "distill": "kd+diswot"}  # 3 small-space candidates fit: a quick search
    record = run(
        RunRequest(
            method="diswot",
            protocol=str(tiny_protocol_path),
            teachers=str(teacher_store),
            results=str(tmp_path),
            progress=False,
            wandb=False,
            measure_overhead=False,
            hparams=hp,
        ),
        say=lambda m: None,
    )
    search = json.loads(
        (
            tmp_path
            / "tinydigits"
            / "diswot@distill=kd+diswot,max_params=60000"
            / "resnet14__resnet8"
            / "seed0"
            / "search.json"
        ).read_text()
    )
    assert record["status"] == "finished" and record["student"]["arch"] == search["chosen"]
    assert all(c["params"] <= 60_000 for c in search["candidates"]) and len(search["candidates"]) >= 2
    assert search["candidates"][0]["score"] == max(c["score"] for c in search["candidates"])
    assert record["hparams"]["distill"] == "kd+diswot" and "train/ickd" in json.dumps(record["history"])


def test_search_and_rankstudy_cli(tiny_protocol_path, tmp_path, capsys):
    import csv

    from distillbench.benchmark.cli import main

    assert (
        main(
            [
                "search",
                "--method",
                "diswot",
                "--protocol",
                str(tiny_protocol_path),
                "--budget",
                "params=60K",
                "--results",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "chosen:" in capsys.readouterr().out
    assert main(["search", "--method", "kd", "--protocol", str(tiny_protocol_path)]) == 2
    assert "no search stage" in capsys.readouterr().err
    names = search_space("small-resnet-depth-width", subset=True)
    gt = tmp_path / "gt.csv"
    with gt.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "kd", "vanilla"])
        for i, n in enumerate(names):
            w.writerow([n, 80 + i, 79 + (i * 7) % 16])
    out = tmp_path / "lb"
    args = [
        "rankstudy",
        "--space",
        "small-resnet-depth-width",
        "--protocol",
        str(tiny_protocol_path),
        "--teacher",
        "resnet14",
        "--gt",
        str(gt),
        "--proxy-seeds",
        "2",
        "--batch",
        "16",
        "--bootstrap",
        "50",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    study = json.loads((out / "rankstudy-tinydigits-small-resnet-depth-width.json").read_text())
    proxies = study["analysis"]["proxies"]
    assert set(proxies) == {"diswot", "M_s only", "M_r only", "params", "flops", "random"}
    lo, hi = proxies["diswot"]["kd"]["tau_ci"]
    assert -1 <= lo <= hi <= 1 and len(study["candidates"]) == 16
    (out / "bad.csv").write_text("name,kd\nresnet_depth_111,80\n")
    assert main([*args[:-4], "--gt", str(out / "bad.csv"), "--out", str(out)]) == 2
    assert "lacks ground truth" in capsys.readouterr().err


def test_rankstudy_trains_ground_truth_through_the_runner(tiny_protocol_path, teacher_store, tmp_path, monkeypatch):
    from distillbench.benchmark.protocol import PairSpec, load_protocol
    from distillbench.benchmark.rankstudy import train_ground_truth

    monkeypatch.setenv("DISTILLBENCH_TEACHERS", str(teacher_store))
    names = ["resnet_depth_111_w50", "resnet_depth_111"]
    protocol = load_protocol(tiny_protocol_path)
    acc, wall = train_ground_truth(protocol, "resnet14", names, ["kd"], [0], str(tmp_path), say=lambda m: None)
    assert set(acc["kd"]) == set(names) and all(len(v) == 1 and 0 <= v[0] <= 100 for v in acc["kd"].values())
    record = json.loads((tmp_path / "tinydigits" / "kd" / "resnet14__resnet_depth_111" / "seed0.json").read_text())
    expected = protocol.hash(PairSpec("resnet14", "resnet_depth_111"))
    assert record["status"] == "finished" and record["protocol_hash"] == expected
    again, _ = train_ground_truth(protocol, "resnet14", names, ["kd"], [0], str(tmp_path), say=lambda m: None)
    assert again == acc  # finished records are reused, not retrained
    assert wall["kd"] > 0
