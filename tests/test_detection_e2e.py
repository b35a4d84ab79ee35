"""A detection protocol end to end through the runner: teacher trained automatically, vanilla / kd / kd++
records with COCOeval AP, the leaderboard's detection table; protocol hashing and the shipped protocols."""

from __future__ import annotations

import json

import pytest
from distillbench.benchmark.errors import BenchmarkError
from distillbench.benchmark.protocol import ProtocolError, load_protocol
from distillbench.benchmark.results import load_record
from distillbench.benchmark.runner import RunRequest, run
from distillbench.leaderboards.build import build

from tests.conftest import write_protocol

TINY_DETECTOR = "fasterrcnn_mobilenet_v3_small_fpn_tiny"
TINY_SHAPES = {
    "name": "tinyshapes",
    "version": 1,
    "task": "detection",
    "description": "test-only shapes detection protocol",
    "dataset": {"name": "shapes", "val_size": 0, "split_seed": 0, "options": {"num_train": 4, "num_val": 2}},
    "input": {"size": 48, "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "augment": {"kind": "none", "flip": True},
    "batch_size": 2,
    "epochs": 1,
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1.0e-4},
    "schedule": {"name": "cosine", "interval": "step"},
    "teacher": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}, "schedule": {}},
    "pairs": [
        {"teacher": "fasterrcnn_mobilenet_v3_small_fpn_tiny", "student": "fasterrcnn_mobilenet_v3_small_fpn_tiny"}
    ],
    "metrics": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
    "seeds": [0],
}


def test_shipped_detection_protocols():
    shapes, coco = load_protocol("shapes"), load_protocol("coco")
    assert shapes.task == coco.task == "detection"
    assert coco.batch_size == 8 and coco.optimizer["lr"] == 0.01
    assert coco.pair().methods["kd++"] == {"kd_weight": 1.0, "nd_weight": 1.5, "temperature": 1.0}
    assert "task" in shapes.recipe(shapes.pair())  # detection is part of the hash ...
    digits = load_protocol("digits")
    assert "task" not in digits.recipe(digits.pair())  # ... classification is not (older hashes stay valid)


def test_bad_task_is_an_error(tmp_path):
    with pytest.raises(ProtocolError, match="task must be one of"):
        load_protocol(write_protocol(tmp_path / "bad.yaml", {**TINY_SHAPES, "task": "segmentation"}))


def test_detection_runs_end_to_end_and_render(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    protocol = write_protocol(tmp_path / "tinyshapes.yaml", TINY_SHAPES)
    common = {"protocol": str(protocol), "teachers": str(tmp_path / "teachers"), "results": str(tmp_path / "results")}
    common.update(progress=False, wandb=False)
    records = {
        m: run(RunRequest(method=m, measure_overhead=m == "kd++", **common), say=lambda *_: None)
        for m in ("vanilla", "kd", "kd++")
    }
    for method, record in records.items():
        assert record["status"] == "finished", record.get("error")
        assert record["task"] == "detection"
        assert set(record["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(0.0 <= v <= 100.0 for v in record["metrics"].values())
        path = tmp_path / "results" / "tinyshapes" / method
        (file,) = path.rglob("seed0.json")
        assert load_record(file)[1] == []  # a valid finished record
    kd, kdpp = records["kd"], records["kd++"]
    # cost columns as for classification: fvcore FLOPs of the detectors, the step-time overhead over the
    # detector's own losses (the vanilla student is the reference: 1.0)
    assert all(r["student"]["flops"] > 0 for r in records.values()) and kd["teacher"]["flops"] > 0
    assert records["vanilla"]["overhead_vs_student"] == 1.0 and kd["overhead_vs_student"] is None  # not measured
    assert kdpp["overhead_vs_student"] > 0 and kdpp["method_step_ms"] > 0 and kdpp["student_step_ms"] > 0
    assert kdpp["adapter_params"] == 0 and kdpp["adapter_flops"] == 0  # equal box-head widths: no projector
    assert kd["teacher"]["checkpoint_sha256"] == kdpp["teacher"]["checkpoint_sha256"]  # trained once, reused
    assert "AP" in kd["teacher"] and kd["hparams"] == {"temperature": 1.0, "kd_weight": 1.0}
    assert "class_means" in kdpp["stage_time_s"]
    assert {"kd", "nd", "cls", "box"} <= {k.split("/")[1] for k in kdpp["history"][0] if k.startswith("train/")}
    sidecar = json.loads(next((tmp_path / "teachers" / "tinyshapes").glob("*.json")).read_text())
    assert sidecar["task"] == "detection" and "AP" in sidecar and sidecar["top1"] is None
    boards = build(tmp_path / "results", tmp_path / "lb", png=False)
    md = (tmp_path / "lb" / "tinyshapes.md").read_text()
    assert "| AP | AP50 | AP75 | APs | APm | APl |" in md and "kd++" in md
    assert "| params | FLOPs |" in md and "Teacher AP " in md
    assert not boards["tinyshapes"].excluded
    assert "AP50_mean" in (tmp_path / "lb" / "tinyshapes.csv").read_text().splitlines()[0]
    with pytest.raises(BenchmarkError, match="several devices"):
        run(RunRequest(method="kd", devices=2, force=True, **common), say=lambda *_: None)
