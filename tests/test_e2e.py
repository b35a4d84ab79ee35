"""End to end on the digits data: the runner, the teacher store and the CLI's error messages."""

from __future__ import annotations

import json
import shutil

import pytest
from distillbench.benchmark.cli import main
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.results import validate_record
from distillbench.benchmark.runner import RunRequest, make_datamodule, run
from distillbench.benchmark.teachers import TeacherError, load_teacher


def _request(protocol, teachers, results, **kw) -> RunRequest:
    return RunRequest(
        protocol=str(protocol),
        teachers=str(teachers),
        results=str(results),
        progress=False,
        wandb=False,
        **{"method": "kd", **kw},
    )


def test_digits_kd_run_writes_a_valid_record(tiny_protocol_path, teacher_store, tmp_path):
    record = run(_request(tiny_protocol_path, teacher_store, tmp_path), say=lambda m: None)
    path = tmp_path / "tinydigits" / "kd" / "resnet14__resnet8" / "seed0.json"
    on_disk = json.loads(path.read_text())
    assert validate_record(on_disk) == []
    assert on_disk["status"] == "finished" and on_disk["world_size"] == 1
    assert on_disk["metrics"]["top1"] > 30  # chance is 10 %
    sidecar = json.loads((teacher_store / "tinydigits" / "resnet14.json").read_text())
    assert on_disk["teacher"]["checkpoint_sha256"] == sidecar["sha256"]
    assert on_disk["teacher"]["top1"] == sidecar["top1"]
    assert on_disk["student"]["params"] == 77_754 and on_disk["student"]["flops"] > 0
    # timing is measured by benchmarks, not asserted here (it is noise on a loaded machine)
    assert on_disk["overhead_vs_student"] > 0
    assert len(on_disk["history"]) == 2 and on_disk["best_epoch_metrics"]["epoch"] in (0, 1)
    assert record["metrics"] == on_disk["metrics"]


def test_same_seed_gives_identical_results(tiny_protocol_path, teacher_store, tmp_path):
    first = run(_request(tiny_protocol_path, teacher_store, tmp_path, measure_overhead=False), say=lambda m: None)
    again = run(
        _request(tiny_protocol_path, teacher_store, tmp_path, measure_overhead=False, force=True), say=lambda m: None
    )
    assert first["history"] == again["history"]
    other = run(
        _request(tiny_protocol_path, teacher_store, tmp_path, measure_overhead=False, seed=1), say=lambda m: None
    )
    assert other["history"] != first["history"]


def test_vanilla_and_dkd_records(tiny_protocol_path, teacher_store, tmp_path):
    run(
        _request(tiny_protocol_path, teacher_store, tmp_path, method="vanilla", measure_overhead=False),
        say=lambda m: None,
    )
    vanilla = json.loads((tmp_path / "tinydigits/vanilla/none__resnet8/seed0.json").read_text())
    assert vanilla["teacher"] is None and vanilla["status"] == "finished"
    dkd = run(
        _request(tiny_protocol_path, teacher_store, tmp_path, method="dkd", measure_overhead=False), say=lambda m: None
    )
    assert dkd["hparams"]["warmup_epochs"] == 1 and dkd["hparams"]["beta"] == 8.0
    assert "train/dkd" in dkd["history"][-1]


def test_hparam_override_makes_a_variant(tiny_protocol_path, teacher_store, tmp_path):
    record = run(
        _request(tiny_protocol_path, teacher_store, tmp_path, hparams={"temperature": 2.0}, measure_overhead=False),
        say=lambda m: None,
    )
    assert record["variant"] == "temperature=2.0" and record["hparams"]["temperature"] == 2.0
    assert (tmp_path / "tinydigits" / "kd@temperature=2.0" / "resnet14__resnet8" / "seed0.json").exists()


def test_missing_teacher_is_trained_once_then_reused(tiny_protocol_path, tmp_path):
    said = []
    request = _request(tiny_protocol_path, tmp_path / "store", tmp_path / "res", measure_overhead=False)
    run(request, say=said.append)
    assert any("training it first" in m for m in said)
    sidecar = tmp_path / "store" / "tinydigits" / "resnet14.json"
    stamp = sidecar.stat().st_mtime_ns
    said.clear()
    run(
        _request(tiny_protocol_path, tmp_path / "store", tmp_path / "res", measure_overhead=False, seed=1),
        say=said.append,
    )
    assert not any("training it first" in m for m in said) and sidecar.stat().st_mtime_ns == stamp


def test_tampered_teacher_is_refused(tiny_protocol_path, teacher_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(teacher_store, store)
    ckpt = store / "tinydigits" / "resnet14.pt"
    data = bytearray(ckpt.read_bytes())
    data[-20] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    protocol = load_protocol(tiny_protocol_path)
    fingerprint = make_datamodule(protocol, seed=0).fingerprint()
    with pytest.raises(TeacherError, match="does not match its sidecar"):
        load_teacher(protocol, "resnet14", store, data_fingerprint=fingerprint)


def test_teacher_trained_on_other_data_is_refused(tiny_protocol_path, teacher_store):
    with pytest.raises(TeacherError, match="trained on other data"):
        load_teacher(load_protocol(tiny_protocol_path), "resnet14", teacher_store, data_fingerprint="0" * 16)


def test_wrong_architecture_checkpoint_is_refused(tiny_protocol_path, teacher_store, tmp_path):
    from distillbench.benchmark.teachers import load_state_dict_checked
    from distillbench.benchmark.zoo import create_model

    with pytest.raises(TeacherError, match="does not fit architecture 'resnet20'"):
        load_state_dict_checked(teacher_store / "tinydigits" / "resnet14.pt", create_model("resnet20"), "resnet20")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="not a loadable checkpoint"):
        load_state_dict_checked(tmp_path / "junk.pt", create_model("resnet14"), "resnet14")


def test_finished_run_is_not_overwritten(tiny_protocol_path, teacher_store, tmp_path, capsys):
    args = [
        "run",
        "--method",
        "vanilla",
        "--protocol",
        str(tiny_protocol_path),
        "--teachers",
        str(teacher_store),
        "--results",
        str(tmp_path),
        "--no-wandb",
        "--no-progress",
        "--no-overhead",
    ]
    assert main(args) == 0
    before = (tmp_path / "tinydigits/vanilla/none__resnet8/seed0.json").read_text()
    assert main(args) == 6  # results category (see README "Reliability")
    assert "already holds a finished run" in capsys.readouterr().err
    assert (tmp_path / "tinydigits/vanilla/none__resnet8/seed0.json").read_text() == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--method", "kdd"], "unknown method 'kdd' (did you mean 'kd'?); registered methods: "),
        (["--method", "kd", "--protocol", "cifar1000"], "unknown protocol 'cifar1000'; available: "),
        (["--method", "kd", "--pair", "x__y"], "no pair 'x__y'; valid pairs: resnet20__resnet8"),
        (["--method", "kd", "--devices", "3"], "not divisible by 3 devices"),
        (["--method", "kd", "--seeds", "a,b"], "SEEDS must be comma-separated integers"),
        (["--method", "kd", "--set", "temp=1"], "no hyper-parameter 'temp'"),
    ],
)
def test_cli_errors_are_specific(args, expected, capsys, tmp_path):
    assert main(["run", *args, "--results", str(tmp_path), "--no-wandb"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_list(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "kd" in out and "dkd" in out and "vanilla" in out
