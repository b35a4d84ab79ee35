"""Run records: schema validation, atomic writes, refusal to overwrite a finished run."""

from __future__ import annotations

import json

import pytest
from distillbench.benchmark.results import (
    REQUIRED_FIELDS,
    RecordExistsError,
    check_writable,
    record_path,
    save_record,
    validate_record,
    write_json_atomic,
)


def good_record(**changes) -> dict:
    record = {
        "schema_version": 1,
        "run_id": "abc",
        "status": "finished",
        "method": "kd",
        "variant": "",
        "hparams": {},
        "protocol": "digits",
        "protocol_version": 1,
        "protocol_hash": "h",
        "teacher": None,
        "student": {"arch": "resnet8", "params": 1, "flops": 2},
        "seed": 0,
        "metrics": {"top1": 90.0},
        "best_epoch_metrics": {"epoch": 0, "top1": 90.0},
        "epochs": 1,
        "world_size": 1,
        "precision": "32-true",
        "train_time_s": 1.0,
        "throughput_img_s": 1.0,
        "overhead_vs_student": 1.0,
        "peak_mem_mb": 1.0,
        "git_commit": None,
        "versions": {},
        "hardware": {},
        "wandb_run": None,
        "started_at": "t",
        "finished_at": "t",
    }
    record.update(changes)
    return record


def test_design_fields_are_required():
    design = [
        "schema_version",
        "run_id",
        "status",
        "method",
        "hparams",
        "protocol",
        "protocol_version",
        "protocol_hash",
        "teacher",
        "student",
        "seed",
        "metrics",
        "best_epoch_metrics",
        "epochs",
        "world_size",
        "precision",
        "train_time_s",
        "throughput_img_s",
        "overhead_vs_student",
        "peak_mem_mb",
        "git_commit",
        "versions",
        "hardware",
        "wandb_run",
        "started_at",
        "finished_at",
    ]
    assert set(design) <= set(REQUIRED_FIELDS)


def test_validate_record():
    assert validate_record(good_record()) == []
    assert "missing field 'seed'" in validate_record({k: v for k, v in good_record().items() if k != "seed"})
    assert any("type" in p for p in validate_record(good_record(seed="0")))
    assert any("top-1" in p for p in validate_record(good_record(metrics={})))
    assert any("status" in p for p in validate_record(good_record(status="done")))
    assert validate_record([1]) == ["not a JSON object"]


def test_record_path_layout(tmp_path):
    assert (
        record_path(tmp_path, "fmnist", "kd", "", "resnet20__resnet8", 2)
        == tmp_path / "fmnist" / "kd" / "resnet20__resnet8" / "seed2.json"
    )
    assert record_path(tmp_path, "fmnist", "ofa", "eps=1.5", "a__b", 0).parent.parent.name == "ofa@eps=1.5"


def test_atomic_write_leaves_no_temporary(tmp_path):
    path = tmp_path / "r" / "seed0.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["seed0.json"]
    with pytest.raises(ValueError):  # NaN is not JSON; the old file must survive
        write_json_atomic(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["seed0.json"]


def test_finished_record_is_not_overwritten(tmp_path):
    path = tmp_path / "seed0.json"
    save_record(path, good_record())
    with pytest.raises(RecordExistsError, match="FORCE=1"):
        check_writable(path, force=False)
    check_writable(path, force=True)


def test_unfinished_record_is_kept_aside(tmp_path):
    path = tmp_path / "seed0.json"
    save_record(path, good_record(status="failed", run_id="old"))
    check_writable(path, force=False)
    save_record(path, good_record(run_id="new"))
    assert json.loads(path.read_text())["run_id"] == "new"
    assert json.loads((tmp_path / "seed0.json.prev-old").read_text())["status"] == "failed"
