"""`make perf` (benchmark/perf.py) and the GPU check script: method list from the registry, tables written,
CPU fallback and argument handling of gpu_check."""

from __future__ import annotations

import pytest
import torch
from distillbench.benchmark import gpu_check, perf
from distillbench.benchmark.protocol import load_protocol
from distillbench.methods import list_methods


def test_every_registered_method_is_timed_or_gets_a_reason():
    fmnist = load_protocol("fmnist")
    reasons = {m: perf.not_per_step(m, fmnist) for m in list_methods()}
    timed = {m for m, why in reasons.items() if why is None}
    assert {"vanilla", "kd", "dkd", "ofa", "kd++", "dkd++"} <= timed
    assert "soft-label store" in reasons["fkd"] and "soft-label store" in reasons["ferkd"]
    assert "web pool" in reasons["kd3"] and "search" in reasons["diswot"]
    for mim in ("dmae", "g2sd", "hybrid", "mae_ft"):
        assert "MAE pair" in reasons[mim]


def test_perf_writes_the_tables(tiny_protocol_path, teacher_store, tmp_path):
    out = tmp_path / "performance.md"
    args = ["--protocol", str(tiny_protocol_path), "--teachers", str(teacher_store), "--only", "protocol,framework"]
    args += ["--steps", "1", "--rounds", "1", "--warmup", "1", "--fw-steps", "2", "--out", str(out)]
    assert perf.main([*args, "--json", str(tmp_path / "raw.json")]) == 0
    rendered = tmp_path / "rendered.md"
    assert perf.main(["--render", str(tmp_path / "raw.json"), "--out", str(rendered)]) == 0
    assert rendered.read_text().split("## 1.")[1] == out.read_text().split("## 1.")[1]  # same tables from the JSON
    text = out.read_text()
    for method in ("vanilla", "kd", "dkd", "ofa", "kd++", "dkd++"):
        assert f"| {method} |" in text
    assert "`fkd`: replays the soft-label store" in text
    assert "plain loop" in text and "Load average" in text and "GPU figures: not measured" in text
    row = next(line for line in text.splitlines() if line.startswith("| vanilla | "))
    assert row.endswith("| 1.00 |")  # the denominator


def test_perf_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        perf.main(["--only", "nonsense"])
    with pytest.raises(SystemExit):
        perf.main(["--steps", "0"])


def test_gpu_check_cpu_dry_run(capsys):
    args = gpu_check.parse_args(["--pair", "resnet56__resnet20", "--modes", "fp32,bf16", "--methods", "kd"])
    args.steps, args.warmup, args.batch = 1, 1, 4
    said = []
    rows = gpu_check.measure(args, say=said.append)
    if not torch.cuda.is_available():
        assert said[0].startswith("gpu_check: no CUDA GPU found") and rows[0]["device"] == "cpu"
    expected = [("fp32", "vanilla"), ("fp32", "kd"), ("bf16", "vanilla"), ("bf16", "kd")]
    assert [(r["mode"], r["method"]) for r in rows] == expected
    assert rows[0]["overhead"] == 1.0 and rows[1]["teacher_ms"] > 0 and rows[1]["img_s"] > 0
    assert "| bf16 | kd |" in gpu_check.table(rows, args.pair, 4)


@pytest.mark.parametrize(
    "argv", [["--modes", "fp8"], ["--methods", "vanilla"], ["--steps", "0"], ["--device", "cuda"], ["--backend", "x"]]
)
def test_gpu_check_refuses_bad_arguments(argv):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
