"""The bad-input catalogue: every user error gets one specific, actionable message and its exit status
(README "Reliability"), and leaves every existing record, run folder, teacher and protocol untouched."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import pytest
import torch
from distillbench.benchmark.cli import main
from distillbench.benchmark.runner import RunRequest, resolve

from .conftest import TINY_PROTOCOL, write_protocol
from .test_records import good_record

CELL = "tinydigits/kd/resnet14__resnet8"


def _tree(*roots: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def world(tmp_path, teacher_store, tiny_protocol_path):
    """A results folder holding an interrupted run of the kd cell (record + checkpoint) and a finished
    vanilla record; a private copy of the teacher store; the tiny protocol."""
    results, store = tmp_path / "results", tmp_path / "teachers"
    shutil.copytree(teacher_store, store)
    protocol = tmp_path / "tinydigits.yaml"
    shutil.copy(tiny_protocol_path, protocol)
    r = resolve(RunRequest(method="kd", protocol=str(protocol)))
    interrupted = good_record(
        status="interrupted",
        run_id="old",
        protocol="tinydigits",
        protocol_hash=r.protocol.hash(r.pair),
        hparams=r.hparams,
        seed=0,
        precision="32-true",
        pid=1,
        host=platform.node() + "-elsewhere",
    )
    (results / CELL / "seed0" / "checkpoints").mkdir(parents=True)
    (results / CELL / "seed0.json").write_text(json.dumps(interrupted))
    (results / CELL / "seed0" / "checkpoints" / "last.ckpt").write_bytes(b"\x00" * 64)
    (results / "tinydigits/vanilla/none__resnet8").mkdir(parents=True)
    (results / "tinydigits/vanilla/none__resnet8/seed0.json").write_text(json.dumps(good_record()))
    return {"results": results, "store": store, "protocol": protocol, "root": tmp_path}


def _cli(world, *extra: str) -> list[str]:
    base = {"--method": "kd", "--protocol": str(world["protocol"])}
    args = ["run"]
    for flag, value in base.items():
        if flag not in extra:
            args += [flag, value]
    return [
        *args,
        "--teachers",
        str(world["store"]),
        "--results",
        str(world["results"]),
        "--no-wandb",
        "--no-progress",
        "--no-overhead",
        *extra,
    ]


def _protocol(world, filename: str, **changes) -> str:
    """The tiny protocol with some top-level keys changed, written beside the others."""
    return str(write_protocol(world["root"] / f"{filename}.yaml", {**copy.deepcopy(TINY_PROTOCOL), **changes}))


# -- the catalogue: (case, how to provoke it → extra CLI args, exit status, message) ----------------
def unknown_method(world, monkeypatch):
    return ["--method", "kdd"]


def unknown_protocol(world, monkeypatch):
    return ["--protocol", "cifar1000"]


def unknown_pair(world, monkeypatch):
    return ["--pair", "x__y"]


def unknown_model(world, monkeypatch):
    return ["--protocol", _protocol(world, "badmodel", pairs=[{"teacher": "resnet14", "student": "resnet8x"}])]


def malformed_yaml(world, monkeypatch):
    path = world["root"] / "broken.yaml"
    path.write_text("name: tinydigits\npairs: [unclosed\n")
    return ["--protocol", str(path)]


def unknown_key(world, monkeypatch):
    return ["--protocol", _protocol(world, "typo", epochz=3)]


def unknown_hparam(world, monkeypatch):
    return ["--set", "temp=1"]


def batch_not_divisible(world, monkeypatch):
    return ["--devices", "3"]


def too_many_devices(world, monkeypatch):
    return ["--protocol", _protocol(world, "huge", batch_size=4096), "--devices", "4096", "--accelerator", "cpu"]


def no_gpu(world, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return ["--accelerator", "gpu"]


def _fmnist_protocol(world) -> str:
    return _protocol(
        world,
        "tinyfmnist",
        name="tinyfmnist",
        dataset={"name": "fmnist", "val_size": 0.1, "split_seed": 0},
        input={"size": 28, "channels": 1, "mean": [0.286], "std": [0.353]},
    )


def missing_dataset(world, monkeypatch):
    monkeypatch.setattr("distillbench.datasets.fmnist.SYSTEM_DIR", world["root"] / "no-such-dir")
    monkeypatch.delenv("DATA_ROOT", raising=False)
    return ["--protocol", _fmnist_protocol(world)]


def _fake_fmnist(world) -> Path:
    import numpy as np

    from .conftest import write_idx

    folder = world["root"] / "data" / "fashion-mnist"
    folder.mkdir(parents=True)
    for split, n in (("train", 100), ("t10k", 40)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def truncated_idx_gz(world, monkeypatch):
    folder = _fake_fmnist(world)
    data = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    return ["--protocol", _fmnist_protocol(world), "--data-root", str(folder.parent)]


def truncated_idx_raw(world, monkeypatch):
    folder = _fake_fmnist(world)
    gz = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(gz.read_bytes())
    gz.unlink()
    (folder / "t10k-images-idx3-ubyte").write_bytes(raw[:-100])
    return ["--protocol", _fmnist_protocol(world), "--data-root", str(folder.parent)]


def truncated_cifar_batch(world, monkeypatch):
    from distillbench.datasets.cifar import CIFAR10
    from distillbench.datasets.make_tiny import make_cifar

    folder = make_cifar(CIFAR10, world["root"] / "data", train_per_class=2, test_per_class=1)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-500])
    protocol = _protocol(
        world,
        "tinycifar",
        name="tinycifar",
        dataset={"name": "cifar10", "val_size": 0.1, "split_seed": 0},
        input={"size": 32, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    )
    return ["--protocol", protocol, "--data-root", str(folder.parent)]


def _rewrite_teacher(world, state_or_bytes) -> None:
    from distillbench.benchmark.teachers import sha256_file

    ckpt = world["store"] / "tinydigits" / "resnet14.pt"
    if isinstance(state_or_bytes, bytes):
        ckpt.write_bytes(state_or_bytes)
    else:
        torch.save(state_or_bytes, ckpt)
    sidecar = ckpt.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    info["sha256"] = sha256_file(ckpt)  # a consistent sidecar: only the checkpoint itself is wrong
    sidecar.write_text(json.dumps(info))


def teacher_sha_mismatch(world, monkeypatch):
    ckpt = world["store"] / "tinydigits" / "resnet14.pt"
    data = bytearray(ckpt.read_bytes())
    data[-20] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    return []


def teacher_truncated(world, monkeypatch):
    data = (world["store"] / "tinydigits" / "resnet14.pt").read_bytes()
    _rewrite_teacher(world, data[: len(data) // 3])
    return []


def teacher_wrong_architecture(world, monkeypatch):
    from distillbench.benchmark.zoo import create_model

    _rewrite_teacher(world, create_model("resnet8", num_classes=10, in_chans=1).state_dict())
    return []


def resume_checkpoint_corrupt(world, monkeypatch):
    return ["--resume"]  # the interrupted run's last.ckpt holds 64 zero bytes


def resume_config_mismatch(world, monkeypatch):
    return ["--resume", "--set", "temperature=2.0", "--variant", ""]


def results_parent_is_a_file(world, monkeypatch):
    blocker = world["root"] / "not-a-folder"
    blocker.write_text("x")
    return ["--results", str(blocker / "results")]


def results_read_only(world, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders")
    (world["results"] / "tinydigits").chmod(0o555)
    return []


def finished_record_exists(world, monkeypatch):
    return ["--method", "vanilla"]


CASES = [
    (unknown_method, 2, "unknown method 'kdd' (did you mean 'kd'?); registered methods:"),
    (unknown_protocol, 2, "unknown protocol 'cifar1000'; available: "),
    (unknown_pair, 2, "protocol 'tinydigits' has no pair 'x__y'; valid pairs: resnet14__resnet8"),
    (unknown_model, 2, "pair 'resnet14__resnet8x' of protocol 'tinydigits': student unknown model 'resnet8x'"),
    (malformed_yaml, 2, "broken.yaml: malformed YAML"),
    (unknown_key, 2, "unknown key(s) epochz; valid:"),
    (unknown_hparam, 2, "method 'kd' has no hyper-parameter 'temp'; valid: ce_weight, kd_weight, nd, temperature"),
    (batch_not_divisible, 2, "the global batch 64 of protocol 'tinydigits' is not divisible by 3 devices"),
    (too_many_devices, 2, "DEVICES=4096 but only"),
    (no_gpu, 2, "DEVICES=1 but only 0 gpu device(s) are available"),
    (missing_dataset, 4, "dataset 'fmnist' not found. Searched:"),
    (truncated_idx_gz, 4, "train-images-idx3-ubyte.gz: cannot read IDX data"),
    (truncated_idx_raw, 4, "t10k-images-idx3-ubyte: header says shape (40, 28, 28)"),
    (truncated_cifar_batch, 4, "data_batch_3: not a valid dataset pickle"),
    (teacher_sha_mismatch, 5, "does not match its sidecar"),
    (teacher_truncated, 5, "resnet14.pt: not a loadable checkpoint"),
    (teacher_wrong_architecture, 5, "does not fit architecture 'resnet14'"),
    (resume_checkpoint_corrupt, 5, "last.ckpt: not a loadable checkpoint"),
    (resume_config_mismatch, 5, "its checkpoint was made with hparams ="),
    (results_parent_is_a_file, 6, "cannot write run records to"),
    (results_read_only, 6, "cannot write run records to"),
    (finished_record_exists, 6, "already holds a finished run; pass FORCE=1"),
]


@pytest.mark.parametrize(("provoke", "status", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_refused_with_a_specific_message(provoke, status, message, world, monkeypatch, capsys):
    extra = provoke(world, monkeypatch)
    before = _tree(world["root"])
    assert main(_cli(world, *extra)) == status
    err = " ".join(capsys.readouterr().err.split())
    assert message in err
    assert "Traceback" not in err
    assert _tree(world["root"]) == before  # nothing existing was modified


def test_non_finite_loss_stops_at_once_and_records_the_step(world, capsys):
    protocol = _protocol(world, "explode", optimizer={"name": "sgd", "lr": 1.0e30, "momentum": 0.9})
    kept = _tree(world["store"], world["results"] / "tinydigits/vanilla")
    assert main(_cli(world, "--protocol", protocol)) == 3
    assert "non-finite loss at global step" in capsys.readouterr().err
    record = json.loads((world["results"] / CELL / "seed0.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "NonFiniteLossError"
    assert record["error"]["epoch"] == 0 and 1 <= record["error"]["step"] < 5  # stopped at the first bad step
    assert record["history"] == []  # no epoch completed
    assert json.loads((world["results"] / CELL / "seed0.json.prev-old").read_text())["status"] == "interrupted"
    assert _tree(world["store"], world["results"] / "tinydigits/vanilla") == kept
