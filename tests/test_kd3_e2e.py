"""KD³ and the web-pool baselines end to end on a tiny digits web proxy: records, selection diagnostics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.results import validate_record
from distillbench.benchmark.runner import RunRequest, make_datamodule, run
from distillbench.benchmark.teachers import train_teacher
from distillbench.benchmark.zoo import create_model
from distillbench.methods import FrozenTeacher, MethodError, get_method
from distillbench.methods.kd3 import selection_alpha

from .conftest import TINY_PROTOCOL, write_protocol

TINY_WEB = {
    **TINY_PROTOCOL,
    "name": "tinyweb",
    "dataset": {
        "name": "webproxy",
        "val_size": 0.1,
        "split_seed": 0,
        "options": {"base": "digits", "heldout_size": 450, "distractor_fraction": 0.4},
    },
    "methods": {"kd3": {"p_cutoff": 0.95}, "kd_pool": {"temperature": 4.0}},
}


@pytest.fixture(scope="module")
def web_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    path = write_protocol(root / "tinyweb.yaml", TINY_WEB)
    train_teacher(load_protocol(path), "resnet14", root=root / "teachers", progress=False, data_root=str(root))
    return path, root


def _request(web_setup, tmp_path, **kw):
    path, root = web_setup
    return RunRequest(
        protocol=str(path),
        teachers=str(root / "teachers"),
        data_root=str(root),
        results=str(tmp_path),
        progress=False,
        wandb=False,
        **{"method": "kd3", **kw},
    )


def test_kd3_run_record_selection_history_and_deployed_student(web_setup, tmp_path):
    record = run(_request(web_setup, tmp_path), say=lambda m: None)
    on_disk = json.loads((tmp_path / "tinyweb/kd3/resnet14__resnet8/seed0.json").read_text())
    assert validate_record(on_disk) == [] and on_disk["status"] == "finished"
    assert record["metrics"]["top1"] > 10  # deployed path evaluated (teacher classifier)
    last = on_disk["history"][-1]
    for key in ("select/precision", "select/recall", "select/kept", "select/alpha", "select/base_rate", "train/feat"):
        assert key in last, key
    assert last["select/base_rate"] == pytest.approx(0.6) and 64 <= last["select/kept"] <= 750
    assert [row["select/epoch"] for row in on_disk["history"]] == [1, 2]  # a fresh selection every epoch
    assert [row["select/alpha"] for row in on_disk["history"]] == [selection_alpha(1, 2), selection_alpha(2, 2)]
    assert on_disk["student"]["deployed"] == "KD3Deployed"
    # projector 64→32→32→64: 1×1 (2,048) + BN (64) + 3×3 (9,216) + BN (64) + 1×1 (2,048) + BN (128) = 13,568
    # deployed: resnet8 without its head (77,754 − 650) + projector + the teacher's classifier (650)
    assert on_disk["student"]["params"] == 77_754 - 650 + 13_568 + 650
    assert on_disk["adapter_params"] == 13_568 + 650 + 2 * (64 * 128 + 128)  # + e_S, e_T
    assert on_disk["overhead_vs_student"] > 0  # measured, not a timing gate


def test_kd_pool_trains_on_the_pool(web_setup, tmp_path):
    pool = run(
        _request(web_setup, tmp_path, method="kd_pool", hparams={"confidence": 0.9}, measure_overhead=False),
        say=lambda m: None,
    )
    assert pool["status"] == "finished" and pool["variant"] == "confidence=0.9" and "train/kd" in pool["history"][-1]


def test_pool_methods_refuse_a_protocol_without_a_pool(tiny_protocol_path, teacher_store, tmp_path):
    request = RunRequest(
        method="kd_pool",
        protocol=str(tiny_protocol_path),
        teachers=str(teacher_store),
        results=str(tmp_path),
        progress=False,
        wandb=False,
    )
    with pytest.raises(MethodError, match=r"unlabelled web pool.*webproxy"):
        run(request, say=lambda m: None)


def test_selection_with_an_untrained_teacher_keeps_at_least_a_batch(web_setup):
    path, root = web_setup
    protocol = load_protocol(path)
    dm = make_datamodule(protocol, seed=0, data_root=str(root))
    dm.setup()
    teacher = FrozenTeacher(
        create_model("resnet14", num_classes=10, in_chans=1), info={"input": {"size": 8, "channels": 1}}
    )
    spec = get_method("kd3")
    module = spec.module_cls(
        create_model("resnet8", num_classes=10, in_chans=1),
        teacher,
        num_classes=10,
        hparams=spec.resolve_hparams({"p_cutoff": 1.0}),
        epochs=4,
    )
    module.trainer = SimpleNamespace(training=True, world_size=1, current_epoch=0)
    kept = module.select_pool_indices(dm)
    stats = module._selection_stats
    assert len(kept) >= dm.global_batch and kept.unique().numel() == len(kept)
    assert 0 <= stats["precision"] <= 1 and stats["kept"] == len(kept) and "fallback" in stats
    assert stats["alpha"] == selection_alpha(1, 4) and stats["base_rate"] == pytest.approx(0.6)
    assert sum(stats[f"kept_class{c}"] for c in range(10)) == len(kept)
    assert module.training  # the pass restores the module's mode
    ablation = spec.module_cls(
        create_model("resnet8", num_classes=10, in_chans=1),
        teacher,
        num_classes=10,
        hparams=spec.resolve_hparams({"selection": False}),
    )
    assert ablation.select_pool_indices(dm) is None  # no selection: the whole pool every epoch


def test_two_process_ddp_selects_what_one_process_selects(web_setup, tmp_path):
    path, root = web_setup
    one = run(_request(web_setup, tmp_path / "one", measure_overhead=False), say=lambda m: None)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "DATA_ROOT": str(root)}
    cmd = [sys.executable, "-m", "distillbench.benchmark", "run", "--method", "kd3", "--protocol", str(path)]
    cmd += ["--devices", "2", "--accelerator", "cpu", "--teachers", str(root / "teachers")]
    cmd += ["--results", str(tmp_path / "two"), "--no-progress", "--no-overhead"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record_path,) = (tmp_path / "two").rglob("seed*.json")
    two = json.loads(record_path.read_text())
    assert two["status"] == "finished" and two["world_size"] == 2
    # the sharded, all-gathered pass scores the same pool with the same initial weights: the same subset
    first = {k: v for k, v in one["history"][0].items() if k.startswith("select/") and k != "select/time_s"}
    assert first == {k: two["history"][0][k] for k in first}
