"""The DistillModule contract: a frozen teacher outside the trainable tree, the loss dict, metrics."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.runner import make_datamodule
from distillbench.benchmark.zoo import create_model
from distillbench.methods import FrozenTeacher, NonFiniteLossError, get_method
from distillbench.methods.kd import KD


def _modules(protocol_path, method="kd"):
    protocol = load_protocol(protocol_path)
    teacher = FrozenTeacher(create_model("resnet14", num_classes=10, in_chans=1), info={"arch": "resnet14"})
    student = create_model("resnet8", num_classes=10, in_chans=1)
    spec = get_method(method)
    module = spec.module_cls(
        student,
        teacher,
        num_classes=10,
        hparams=spec.resolve_hparams(protocol.methods.get(method)),
        optimizer=protocol.optimizer,
        schedule=protocol.schedule,
        epochs=1,
    )
    return protocol, teacher, module


class _TeacherWatch(L.Callback):
    def __init__(self, teacher):
        self.teacher, self.modes = teacher, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.modes.append(self.teacher.model.training)


def test_teacher_frozen_and_in_eval_through_fit(tiny_protocol_path, tmp_path):
    protocol, teacher, module = _modules(tiny_protocol_path)
    teacher.model.train()  # even if someone flips it, the holder puts it back
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    watch = _TeacherWatch(teacher)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[watch],
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, make_datamodule(protocol, seed=0))
    assert watch.modes and not any(watch.modes)
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert not any(k.startswith("teacher") for k in module.state_dict())
    teacher_ids = {id(p) for p in teacher.model.parameters()}
    assert not teacher_ids & {id(p) for p in module.parameters()}


def test_teacher_moves_with_module():
    _, teacher, module = _modules_from_defaults()
    module.to(torch.float64)
    assert next(teacher.model.parameters()).dtype == torch.float64


def _modules_from_defaults():
    teacher = FrozenTeacher(create_model("resnet8", num_classes=10, in_chans=1))
    module = KD(
        create_model("resnet8", num_classes=10, in_chans=1),
        teacher,
        num_classes=10,
        hparams=get_method("kd").resolve_hparams(),
    )
    return None, teacher, module


def test_losses_dict_is_weighted_terms():
    import torch.nn.functional as F
    from distillbench.methods.kd import kd_loss

    _, teacher, module = _modules_from_defaults()
    module.eval()  # deterministic BN so the terms can be recomputed
    batch = {"image": torch.randn(8, 1, 8, 8), "label": torch.arange(8) % 10}
    terms = module.losses(batch)
    assert set(terms) == {"ce", "kd"}
    z_s, z_t = module.student(batch["image"]), teacher.model(batch["image"])
    torch.testing.assert_close(terms["ce"], 0.1 * F.cross_entropy(z_s, batch["label"]))
    torch.testing.assert_close(terms["kd"], 0.9 * kd_loss(z_s, z_t, 4.0))


def test_bf16_autocast_loss_matches_fp32():
    _, _, module = _modules_from_defaults()
    module.eval()  # BN in eval so both passes see the same statistics
    batch = {"image": torch.randn(16, 1, 8, 8), "label": torch.arange(16) % 10}
    fp32 = sum(module.losses(batch).values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = sum(module.losses(batch).values())
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_renormalisation_for_heterogeneous_teacher():
    model = torch.nn.Identity()
    model.eval()
    teacher = FrozenTeacher(model, input_stats=((0.5,), (0.25,)), teacher_stats=((0.1,), (0.2,)))
    x = torch.randn(2, 1, 3, 3)
    raw = x * 0.25 + 0.5
    torch.testing.assert_close(teacher.run(lambda m, v: m(v), x), (raw - 0.1) / 0.2)
    same = FrozenTeacher(model, input_stats=((0.5,), (0.25,)), teacher_stats=((0.5,), (0.25,)))
    assert same.renorm is None


def test_non_finite_loss_stops_with_step():
    _, _, module = _modules_from_defaults()

    class Broken(KD):
        def losses(self, batch):
            return {"ce": torch.tensor(float("nan"), requires_grad=True)}

    broken = Broken(module.student, module.teacher, num_classes=10, hparams=get_method("kd").resolve_hparams())
    broken.log = lambda *a, **k: None
    with pytest.raises(NonFiniteLossError, match="non-finite loss at global step 0"):
        broken.training_step({"image": torch.randn(2, 1, 8, 8), "label": torch.tensor([0, 1])}, 0)


def test_method_without_teacher_refuses_none():
    with pytest.raises(Exception, match="needs a teacher"):
        KD(
            create_model("resnet8", num_classes=10, in_chans=1),
            None,
            num_classes=10,
            hparams=get_method("kd").resolve_hparams(),
        )


def test_unknown_hparam_lists_valid_ones():
    with pytest.raises(Exception, match=r"no hyper-parameter 'temp'.*temperature"):
        get_method("kd").resolve_hparams({"temp": 2})


def test_adapter_parameters_exclude_student():
    _, _, module = _modules_from_defaults()
    assert module.adapter_parameters() == []
    module.proj = torch.nn.Linear(3, 4)
    assert sum(p.numel() for p in module.adapter_parameters()) == 16
