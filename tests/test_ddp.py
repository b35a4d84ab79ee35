"""DDP on CPU (gloo), through the CLI in a subprocess as Lightning re-launches the command: the global
batch is split across ranks, results match a 1-process run of the same seed, metrics are reduced over
all ranks, only rank 0 writes, and the teacher stays outside DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.runner import RunRequest, make_datamodule, run
from torch import nn

from .conftest import TINY_PROTOCOL, write_protocol


class MLP(nn.Sequential):
    """A BatchNorm-free student: torch has no CPU SyncBatchNorm, and per-device BatchNorm statistics
    (32 images instead of 64) would make 1 and 2 processes differ for a reason unrelated to DDP."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__(nn.Flatten(), nn.Linear(in_chans * 64, 128), nn.GELU(), nn.Linear(128, num_classes))


# The CLI with MLP registered, plus a per-rank probe (written outside the results folder) of what DDP wraps.
WRAPPER = textwrap.dedent(
    """
    import json, os, sys
    from lightning.pytorch.callbacks import Callback
    from distillbench.benchmark import runner
    from distillbench.benchmark.cli import main
    from distillbench.benchmark.zoo import register_model
    sys.path.insert(0, os.environ["TESTS_PARENT"])
    from tests.test_ddp import MLP

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx:
                return
            wrapped = trainer.strategy.model
            teacher = {id(p) for p in pl_module.teacher.model.parameters()}
            probe = {
                "rank": trainer.global_rank,
                "world": trainer.world_size,
                "ddp": type(wrapped).__name__,
                "teacher_params_in_ddp": sum(id(p) in teacher for p in wrapped.parameters()),
                "teacher_training": pl_module.teacher.model.training,
                "batch": int(batch["image"].shape[0]),
                "first_index": int(batch["index"][0]),
            }
            path = os.path.join(os.environ["PROBE_DIR"], f"rank{trainer.global_rank}.json")
            with open(path, "w") as f:
                json.dump(probe, f)

    register_model("mlp_test", MLP)
    build = runner.build_trainer
    runner.build_trainer = lambda *a, **kw: build(*a, **{**kw, "callbacks": [*kw["callbacks"], Probe()]})
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture
def mlp_registered():
    from distillbench.benchmark import zoo

    zoo.register_model("mlp_test", MLP)
    yield
    zoo._MODELS.pop("mlp_test", None)


def _files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_two_processes_match_one(teacher_store, tmp_path, mlp_registered):
    protocol = write_protocol(
        tmp_path / "ddp.yaml", {**TINY_PROTOCOL, "pairs": [{"teacher": "resnet14", "student": "mlp_test"}]}
    )
    work, probes = tmp_path / "work", tmp_path / "probes"
    work.mkdir(), probes.mkdir()
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PROBE_DIR": str(probes),
        "TESTS_PARENT": str(os.path.dirname(os.path.dirname(__file__))),
    }
    cmd = [
        sys.executable, str(tmp_path / "wrapper.py"), "run", "--method", "kd", "--protocol", str(protocol),
        "--devices", "2", "--accelerator", "cpu", "--teachers", str(teacher_store), "--results", "results",
        "--no-progress", "--no-overhead",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # only rank 0 wrote: one record, one CSV log, one W&B run, one checkpoint, nothing outside the run folder
    files = _files(work)
    cell = "results/tinydigits/kd/resnet14__mlp_test"
    assert [f for f in files if not f.startswith(f"{cell}/seed0/")] == [f"{cell}/seed0.json"]
    assert [f for f in files if f.endswith(("metrics.csv", ".ckpt"))] == [
        f"{cell}/seed0/checkpoints/last.ckpt",
        f"{cell}/seed0/csv/metrics.csv",
    ]
    assert len(list((work / cell / "seed0").rglob("offline-run-*"))) == 1
    record = json.loads((work / cell / "seed0.json").read_text())
    assert record["status"] == "finished" and record["world_size"] == 2
    assert record["wandb_run"]["id"] == record["run_id"]

    # the global batch is split: each rank trains on 32 distinct images of the same 64; the teacher is outside DDP
    ranks = [json.loads((probes / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["rank"] for p in ranks] == [0, 1] and all(p["world"] == 2 for p in ranks)
    assert all(p["ddp"] == "DistributedDataParallel" and p["teacher_params_in_ddp"] == 0 for p in ranks)
    assert not any(p["teacher_training"] for p in ranks)
    assert [p["batch"] for p in ranks] == [32, 32] and ranks[0]["first_index"] != ranks[1]["first_index"]
    assert (record["per_device_batch"], record["global_batch"]) == (32, 64)

    # the same seed in one process: the same global batch and, up to float summation order, the same run
    single = run(
        RunRequest(
            method="kd",
            protocol=str(protocol),
            teachers=str(teacher_store),
            results=str(tmp_path / "single"),
            accelerator="cpu",
            wandb=False,
            progress=False,
            measure_overhead=False,
        ),
        say=lambda m: None,
    )
    assert (single["per_device_batch"], single["global_batch"]) == (64, 64)
    for one, two in zip(single["history"], record["history"], strict=True):
        assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-4)
        assert abs(two["test/top1"] - one["test/top1"]) <= 0.19  # at most one of 540 test images
    assert abs(record["metrics"]["top1"] - single["metrics"]["top1"]) <= 0.19

    # metrics are reduced over both ranks: the final weights, evaluated in one process, give the recorded top-1
    state = torch.load(work / cell / "seed0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    student = MLP()
    student.load_state_dict(
        {k.removeprefix("student."): v for k, v in state["state_dict"].items() if k.startswith("student.")}
    )
    student.eval()
    datamodule = make_datamodule(load_protocol(protocol), seed=0)
    correct = total = 0
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            correct += int((student(batch["image"]).argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
    assert total == 540
    assert 100.0 * correct / total == pytest.approx(record["metrics"]["top1"], abs=1e-4)
