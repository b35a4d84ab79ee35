"""Exact resume: a run SIGKILLed mid-epoch and resumed from its last checkpoint ends bit-identical
(weights, optimizer state, metrics, history) to the same run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from distillbench.benchmark.runner import RunRequest, run

# Runs the CLI with one extra Lightning callback that sends the process a signal after optimizer step N:
# a real kill at a reproducible point (no test hook in the suite's own code).
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from lightning.pytorch.callbacks import Callback
    from distillbench.benchmark import runner
    from distillbench.benchmark.cli import main

    class KillAt(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), getattr(signal, os.environ["KILL_SIGNAL"]))

    build = runner.build_trainer
    runner.build_trainer = lambda *a, **kw: build(*a, **{**kw, "callbacks": [*kw["callbacks"], KillAt()]})
    sys.exit(main(sys.argv[1:]))
    """
)
STEPS_PER_EPOCH = 17  # tinydigits: 1,131 training images // global batch 64
CKPT_EVERY, KILL_AT = 5, 23  # last checkpoint before the kill: step 20, i.e. 3 batches into epoch 1


def _request(protocol, teachers, results, **kw) -> RunRequest:
    return RunRequest(
        method="kd",
        protocol=str(protocol),
        teachers=str(teachers),
        results=str(results),
        progress=False,
        wandb=False,
        measure_overhead=False,
        checkpoint_every_n_steps=CKPT_EVERY,
        **kw,
    )


def _final_state(results):
    ckpt = torch.load(
        results / "tinydigits/kd/resnet14__resnet8/seed0/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    return ckpt["state_dict"], ckpt["optimizer_states"][0]["state"], ckpt["global_step"]


@pytest.fixture(scope="module")
def reference(tiny_protocol_path, teacher_store, tmp_path_factory):
    """The run never interrupted: its record and final checkpoint."""
    results = tmp_path_factory.mktemp("reference")
    return run(_request(tiny_protocol_path, teacher_store, results), say=lambda m: None), results


# SIGKILL: nothing runs after the kill, the last checkpoint is step 20 (3 batches into epoch 1), the record
# stays `running` until the resume settles it. SIGTERM (preemption): Lightning stops after the step and
# checkpoints it, the record says `interrupted`, the CLI exits 143.
@pytest.mark.parametrize(
    ("signame", "exit_status", "status_after_kill", "checkpoint_step"),
    [("SIGKILL", -signal.SIGKILL, "running", 20), ("SIGTERM", 143, "interrupted", KILL_AT)],
)
def test_killed_run_resumes_bit_exact(
    signame, exit_status, status_after_kill, checkpoint_step, reference, tiny_protocol_path, teacher_store, tmp_path
):
    reference_record, reference_results = reference
    killed = tmp_path / "b"
    cmd = [
        sys.executable, "-c", KILLER, "run", "--method", "kd", "--protocol", str(tiny_protocol_path),
        "--teachers", str(teacher_store), "--results", str(killed), "--checkpoint-every", str(CKPT_EVERY),
        "--no-wandb", "--no-progress", "--no-overhead",
    ]  # fmt: skip
    env = {**os.environ, "KILL_AT_STEP": str(KILL_AT), "KILL_SIGNAL": signame}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == exit_status, proc.stderr[-2000:]
    path = killed / "tinydigits/kd/resnet14__resnet8/seed0.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["status"] == status_after_kill and len(on_disk["history"]) == 1  # epoch 0 was recorded
    assert _final_state(killed)[2] == checkpoint_step  # mid-epoch

    resumed = run(_request(tiny_protocol_path, teacher_store, killed, resume=True), say=lambda m: None)
    assert resumed["status"] == "finished" and resumed["run_id"] == on_disk["run_id"]
    assert resumed["resumes"][0]["checkpoint"]["global_step"] == checkpoint_step
    assert resumed["history"] == reference_record["history"]
    assert resumed["metrics"] == reference_record["metrics"]
    weights_a, optim_a, step_a = _final_state(reference_results)
    weights_b, optim_b, step_b = _final_state(killed)
    assert step_a == step_b == 2 * STEPS_PER_EPOCH
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    for key in optim_a:
        assert torch.equal(optim_a[key]["momentum_buffer"], optim_b[key]["momentum_buffer"]), key


def test_stale_running_record_is_settled_as_interrupted(tmp_path):
    import platform

    from distillbench.benchmark.results import RunInProgressError, check_writable, save_record

    from .test_records import good_record

    path = tmp_path / "seed0.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    save_record(path, good_record(status="running", pid=int(dead.stdout), host=platform.node()))
    check_writable(path, force=False)  # a killed run's record: settled, then replaceable
    settled = json.loads(path.read_text())
    assert settled["status"] == "interrupted" and settled["error"]["type"] == "Killed"

    save_record(path, good_record(run_id="live", status="running", pid=os.getppid(), host=platform.node()))
    with pytest.raises(RunInProgressError, match="still in progress"):
        check_writable(path, force=True)
    assert json.loads(path.read_text())["status"] == "running"
