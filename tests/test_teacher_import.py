"""`teachers import`: checkpoint formats, strict architecture check, measured accuracy, clear errors;
and a CIFAR-100-format run end to end with a teacher trained on the generated tree."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from distillbench.benchmark.cli import main
from distillbench.benchmark.protocol import PairSpec, load_protocol
from distillbench.benchmark.runner import RunRequest, make_datamodule, run
from distillbench.benchmark.teacher_import import import_teacher, read_checkpoint
from distillbench.benchmark.teachers import TeacherError, load_teacher, sha256_file
from distillbench.benchmark.zoo import create_model
from distillbench.datasets.cifar import CIFAR100
from distillbench.datasets.make_tiny import make_cifar

from tests.conftest import write_protocol


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar(CIFAR100, root)  # 1,000 train / 200 test images, 2 test images per class
    return root


def _biased_resnet56(num_classes: int = 100) -> dict[str, torch.Tensor]:
    """Weights whose prediction ignores the image: logits = fc.bias = [5, 4, 3, 2, 1, 0, …]."""
    model = create_model("resnet56", num_classes=num_classes)
    state = model.state_dict()
    state["fc.weight"].zero_()
    state["fc.bias"].zero_()
    state["fc.bias"][:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    return state


def test_mdistiller_checkpoint_is_imported_with_measured_accuracy(cifar_root, tmp_path):
    protocol = load_protocol("cifar100")
    ckpt = tmp_path / "ckpt_epoch_240.pth"
    # RepDistiller's layout (train_teacher.py): epoch, model, best_acc, optimizer
    torch.save({"epoch": 240, "model": _biased_resnet56(), "best_acc": torch.tensor(72.34), "optimizer": {}}, ckpt)
    info = import_teacher(protocol, "resnet56", str(ckpt), root=tmp_path / "store", data_root=str(cifar_root))
    # always class 0 → top-1 = its share of the test split (2/200); top-5 = classes 0..4 (10/200)
    assert (info["top1"], info["top5"], info["test_images"]) == (1.0, 5.0, 200)
    stored = tmp_path / "store" / "cifar100" / "resnet56.pt"
    assert info["sha256"] == sha256_file(stored) and info["imported_from"]["file_sha256"] == sha256_file(ckpt)
    assert info["source"] == "imported" and info["imported_from"]["format"] == "auto"
    fingerprint = make_datamodule(protocol, seed=0, data_root=str(cifar_root)).fingerprint()
    model, sidecar = load_teacher(protocol, "resnet56", tmp_path / "store", data_fingerprint=fingerprint)
    assert sidecar["top1"] == 1.0 and torch.equal(model.state_dict()["fc.bias"], _biased_resnet56()["fc.bias"])
    with pytest.raises(TeacherError, match=r"already stored.*--force"):
        import_teacher(protocol, "resnet56", str(ckpt), root=tmp_path / "store", data_root=str(cifar_root))


def test_checkpoint_layouts(tmp_path):
    state = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    for name, payload in [
        ("plain", state),
        ("net", {"net": state, "acc": 70.0}),
        ("dp", {f"module.{k}": v for k, v in state.items()}),
    ]:
        torch.save(payload, tmp_path / name)
        assert sorted(read_checkpoint(tmp_path / name, "auto")) == ["a.weight", "b.bias"], name
    with pytest.raises(TeacherError, match=r"holds its weights under .model. or .net."):
        read_checkpoint(tmp_path / "plain", "mdistiller")
    with pytest.raises(TeacherError, match=r"non-tensor entries \['net', 'acc'\]"):
        read_checkpoint(tmp_path / "net", "state_dict")


def test_corrupt_and_unsafe_checkpoints_are_refused(tmp_path):
    torch.save({"model": _biased_resnet56()}, tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:5000])
    with pytest.raises(TeacherError, match=r"not a loadable checkpoint.*truncated, corrupt"):
        read_checkpoint(tmp_path / "cut.pth", "auto")
    torch.save({"model": _biased_resnet56(), "args": argparse.Namespace(lr=0.05)}, tmp_path / "ns.pth")
    with pytest.raises(TeacherError, match="only weights_only files are read"):
        read_checkpoint(tmp_path / "ns.pth", "auto")
    with pytest.raises(TeacherError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth", "auto")


def test_architecture_mismatch_lists_keys(cifar_root, tmp_path):
    protocol = load_protocol("cifar100")
    torch.save({"model": create_model("resnet20", num_classes=100).state_dict()}, tmp_path / "r20.pth")
    with pytest.raises(
        TeacherError, match=r"does not fit architecture 'resnet56': 216 missing key\(s\) \['stages\.0\.3\.bn1"
    ):
        import_teacher(protocol, "resnet56", str(tmp_path / "r20.pth"), root=tmp_path, data_root=str(cifar_root))
    torch.save(_biased_resnet56(num_classes=10), tmp_path / "c10.pth")
    with pytest.raises(TeacherError, match=r"shape mismatch \['fc.weight: \(10, 64\) ≠ \(100, 64\)'"):
        import_teacher(protocol, "resnet56", str(tmp_path / "c10.pth"), root=tmp_path, data_root=str(cifar_root))
    with pytest.raises(TeacherError, match="'resnet20' is not a teacher of protocol 'cifar100'"):
        import_teacher(protocol, "resnet20", str(tmp_path / "r20.pth"), root=tmp_path, data_root=str(cifar_root))
    with pytest.raises(TeacherError, match=r"pinned tag '<arch>.<tag>'"):
        import_teacher(protocol, "resnet56", "resnet34.tv_in1k", fmt="timm", root=tmp_path, data_root=str(cifar_root))


def test_cli_import_and_errors(cifar_root, tmp_path, capsys):
    torch.save({"model": _biased_resnet56()}, tmp_path / "t.pth")
    base = ["teachers", "import", "--protocol", "cifar100", "--teachers", str(tmp_path / "s")]
    base += ["--data-root", str(cifar_root), "--accelerator", "cpu"]
    assert main([*base, "--arch", "resnet56", "--checkpoint", str(tmp_path / "t.pth")]) == 0
    assert "measured test top-1 1.00" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tmp_path / "t.pth")]) == 2
    assert "exactly one --arch" in capsys.readouterr().err


def test_cifar100_format_kd_run_end_to_end(tmp_path):
    """The acceptance path in small: CIFAR-100 files → teacher trained on them (1 epoch) → KD → record."""
    cifar_root = tmp_path / "data"
    make_cifar(CIFAR100, cifar_root, train_per_class=3, test_per_class=1)
    data = load_protocol("cifar100")
    small = {
        "name": "tinycifar",
        "version": 1,
        "description": "test-only: the cifar100 recipe on a generated tree with small networks",
        "dataset": {"name": "cifar100", "val_size": 100, "split_seed": 0},
        "input": {"size": 32, "channels": 3, "mean": list(data.input.mean), "std": list(data.input.std)},
        "augment": dict(data.augment),
        "batch_size": 64,
        "epochs": 3,
        "optimizer": dict(data.optimizer),
        "schedule": {"name": "multistep", "milestones": [2], "gamma": 0.1},
        "teacher": {"epochs": 5, "optimizer": dict(data.optimizer), "schedule": {"name": "constant"}},
        "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
        "methods": {"kd": dict(data.methods["kd"])},
    }
    path = write_protocol(tmp_path / "tinycifar.yaml", small)
    request = RunRequest(
        method="kd",
        protocol=str(path),
        epochs=1,
        teacher_epochs=1,
        teachers=str(tmp_path / "store"),
        results=str(tmp_path / "res"),
        data_root=str(cifar_root),
        progress=False,
        wandb=False,
        measure_overhead=False,
    )
    record = run(request, say=lambda m: None)
    assert record["status"] == "finished" and record["variant"] == "epochs=1,teacher_epochs=1"
    sidecar = json.loads((tmp_path / "store" / "tinycifar" / "resnet14.json").read_text())
    assert (
        sidecar["epochs"] == 1
        and sidecar["data_fingerprint"]
        == make_datamodule(load_protocol(path), seed=0, data_root=str(cifar_root)).fingerprint()
    )
    assert record["teacher"]["checkpoint_sha256"] == sidecar["sha256"] and record["student"]["flops"] > 0


def _bn(prefix):
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


# Module names of RepDistiller's models/resnet.py and models/wrn.py, written out by hand
REPDISTILLER_RESNET8 = [
    "conv1.weight",
    *_bn("bn1"),
    "layer1.0.conv1.weight",
    *_bn("layer1.0.bn1"),
    "layer1.0.conv2.weight",
    *_bn("layer1.0.bn2"),
    *[
        key
        for s in (2, 3)
        for key in (
            f"layer{s}.0.conv1.weight",
            *_bn(f"layer{s}.0.bn1"),
            f"layer{s}.0.conv2.weight",
            *_bn(f"layer{s}.0.bn2"),
            f"layer{s}.0.downsample.0.weight",
            *_bn(f"layer{s}.0.downsample.1"),
        )
    ],
    "fc.weight",
    "fc.bias",
]
REPDISTILLER_WRN_16_1 = [
    "conv1.weight",
    *[
        key
        for s in (1, 2, 3)
        for i in (0, 1)
        for key in (
            *_bn(f"block{s}.layer.{i}.bn1"),
            f"block{s}.layer.{i}.conv1.weight",
            *_bn(f"block{s}.layer.{i}.bn2"),
            f"block{s}.layer.{i}.conv2.weight",
            *([f"block{s}.layer.{i}.convShortcut.weight"] if s > 1 and i == 0 else []),
        )
    ],
    *_bn("bn1"),
    "fc.weight",
    "fc.bias",
]


@pytest.mark.parametrize(("arch", "official"), [("resnet8", REPDISTILLER_RESNET8), ("wrn_16_1", REPDISTILLER_WRN_16_1)])
def test_repdistiller_checkpoints_import_into_the_zoo(arch, official, cifar_root, tmp_path):
    """A checkpoint with the reference module names imports into the zoo model, each tensor in its place."""
    model = create_model(arch, num_classes=100)
    ours = model.state_dict()
    assert len(official) == len(ours)
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in zip(official, ours.values(), strict=True)}
    store, ckpt = tmp_path / "store", tmp_path / "ckpt.pth"
    torch.save({"epoch": 240, "model": state}, ckpt)
    protocol = dataclasses.replace(load_protocol("cifar100"), pairs=(PairSpec(teacher=arch, student="resnet8"),))
    import_teacher(protocol, arch, str(ckpt), fmt="mdistiller", root=store, data_root=str(cifar_root))
    loaded = torch.load(store / "cifar100" / f"{arch}.pt", weights_only=True)
    assert list(loaded) == list(ours)
    for name, value in zip(official, loaded.values(), strict=True):
        assert torch.equal(state[name], value), name
