"""A 2-process CPU DDP run (gloo) through the CLI in a subprocess, as Lightning re-launches the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_two_process_ddp_writes_exactly_one_record(tiny_protocol_path, teacher_store, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "distillbench.benchmark",
        "run",
        "--method",
        "kd",
        "--protocol",
        str(tiny_protocol_path),
        "--devices",
        "2",
        "--accelerator",
        "cpu",
        "--teachers",
        str(teacher_store),
        "--results",
        str(tmp_path),
        "--no-progress",
        "--no-overhead",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sorted(tmp_path.rglob("seed*.json"))
    assert [p.relative_to(tmp_path).as_posix() for p in records] == ["tinydigits/kd/resnet14__resnet8/seed0.json"]
    record = json.loads(records[0].read_text())
    assert record["status"] == "finished" and record["world_size"] == 2
    assert record["metrics"]["top1"] > 30
