"""W&B: a tiny fit in offline mode, read back from the offline run's own `.wandb` log (group, name,
tags, the resolved config, the record's metrics as summary); leaderboard tables as wandb.Table artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from distillbench.benchmark.runner import RunRequest, run
from distillbench.benchmark.wandb_offline import WandbLogError, iter_chunks, read_offline_run


def test_offline_run_config_and_summary(tiny_protocol_path, teacher_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    request = RunRequest(
        method="kd",
        protocol=str(tiny_protocol_path),
        teachers=str(teacher_store),
        results=str(tmp_path),
        progress=False,
        measure_overhead=False,
    )
    record = run(request, say=lambda m: None)
    info = record["wandb_run"]
    assert info and "error" not in info, info
    run_dir = Path(info["dir"]).parent
    assert run_dir.name.startswith("offline-run-") and tmp_path in run_dir.parents  # inside the run folder
    logged = read_offline_run(run_dir)
    assert logged["run"]["project"] == "distillbench"
    assert logged["run"]["group"] == "tinydigits/resnet14__resnet8"
    assert logged["run"]["name"] == "kd-s0" and logged["run"]["id"] == record["run_id"]
    assert set(logged["run"]["tags"]) == {"tinydigits", "kd", "resnet8"}
    config = logged["config"]
    for key in ("method", "hparams", "protocol", "protocol_version", "protocol_hash", "seed", "precision"):
        assert config[key] == record[key], key
    assert config["teacher"]["checkpoint_sha256"] == record["teacher"]["checkpoint_sha256"]
    assert config["recipe"]["epochs"] == 2
    summary = logged["summary"]
    assert summary["final/top1"] == pytest.approx(record["metrics"]["top1"])
    assert summary["best/top1"] == pytest.approx(record["best_epoch_metrics"]["top1"])
    assert summary["student_params"] == record["student"]["params"]
    assert summary["student_flops"] == record["student"]["flops"]
    assert summary["teacher_flops"] == record["teacher"]["flops"] > 0
    assert summary["throughput_img_s"] == pytest.approx(record["throughput_img_s"])
    assert summary["status"] == "finished"


def test_leaderboard_tables_are_logged_as_artifacts(tmp_path, monkeypatch):
    from distillbench.leaderboards.collect import collect
    from distillbench.leaderboards.render import CSV_COLUMNS
    from distillbench.leaderboards.wandb_tables import push_tables

    from tests.test_leaderboard import write

    monkeypatch.setenv("WANDB_MODE", "offline")
    for seed, top1 in enumerate((90.0, 92.0)):
        write(tmp_path / "results", "kd", seed, top1)
    message = push_tables(collect(tmp_path / "results"), tmp_path / "wb")
    assert message.startswith("W&B (offline): 1 leaderboard table(s)")
    run_dir = next((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    logged = read_offline_run(run_dir)
    assert logged["run"]["group"] == "leaderboards" and logged["config"]["protocols"] == ["digits"]
    assert logged["summary"]["leaderboard/digits"]["_type"] == "table-file"
    table = json.loads((run_dir / "files" / logged["summary"]["leaderboard/digits"]["path"]).read_text())
    assert table["columns"] == list(CSV_COLUMNS)
    row = dict(zip(table["columns"], table["data"][0], strict=True))
    assert (row["method"], row["n"], row["top1_mean"]) == ("kd", "2", "91.0000")


def test_reader_rejects_other_files(tmp_path):
    with pytest.raises(WandbLogError, match="not a W&B transaction log"):
        list(iter_chunks(b"PK\x03\x04 not wandb"))
    with pytest.raises(WandbLogError, match=r"no \.wandb file"):
        read_offline_run(tmp_path)
    (tmp_path / "run-x.wandb").write_bytes(b":W&B\x00\x00\x01")  # header only: core still writing
    with pytest.raises(WandbLogError, match="no exit record"):
        read_offline_run(tmp_path, timeout=0.3)
