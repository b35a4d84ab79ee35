"""Protocol loading, validation errors, hashing."""

from __future__ import annotations

import pytest
from distillbench.benchmark.protocol import ProtocolError, list_protocols, load_protocol

from tests.conftest import TINY_PROTOCOL, write_protocol


def test_shipped_protocols_load():
    assert {"digits", "fmnist"} <= set(list_protocols())
    for name in list_protocols():
        p = load_protocol(name)
        assert p.name == name and p.selection == "last"
        assert p.pair().name in p.pair_names()
        assert p.batch_size >= 1 and p.seeds


def test_unknown_protocol_lists_available():
    with pytest.raises(ProtocolError, match=r"unknown protocol 'nope'; available: .*digits.*fmnist"):
        load_protocol("nope")


def test_unknown_pair_lists_valid_pairs():
    with pytest.raises(ProtocolError, match=r"no pair 'a__b'; valid pairs: resnet20__resnet8"):
        load_protocol("digits").pair("a__b")


def test_unknown_key_is_an_error(tmp_path):
    bad = {**TINY_PROTOCOL, "epochz": 3}
    with pytest.raises(ProtocolError, match=r"unknown key\(s\) epochz"):
        load_protocol(write_protocol(tmp_path / "bad.yaml", bad))
    bad = {**TINY_PROTOCOL, "optimizer": {**TINY_PROTOCOL["optimizer"], "momentun": 0.9}}
    with pytest.raises(ProtocolError, match=r"optimizer: unknown key\(s\) momentun"):
        load_protocol(write_protocol(tmp_path / "bad2.yaml", bad))


def test_missing_and_mistyped_keys(tmp_path):
    bad = {k: v for k, v in TINY_PROTOCOL.items() if k != "epochs"}
    with pytest.raises(ProtocolError, match="missing required key 'epochs'"):
        load_protocol(write_protocol(tmp_path / "a.yaml", bad))
    bad = {**TINY_PROTOCOL, "batch_size": "big"}
    with pytest.raises(ProtocolError, match=r"batch_size: expected an integer"):
        load_protocol(write_protocol(tmp_path / "b.yaml", bad))


def test_malformed_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nepochs: [1, 2\n")
    with pytest.raises(ProtocolError, match="malformed YAML"):
        load_protocol(path)


def test_hash_is_stable_and_tracks_the_recipe():
    p = load_protocol("fmnist")
    assert p.hash(p.pair()) == load_protocol("fmnist").hash(p.pair())
    assert p.with_epochs(1).hash(p.pair()) != p.hash(p.pair())
    # the teacher's identity depends on its data and architecture, not on the student's epochs
    assert p.with_epochs(1).teacher_key("resnet20", "d1") == p.teacher_key("resnet20", "d1")
    assert p.teacher_key("resnet20", "d1") != p.teacher_key("resnet56", "d1")
    assert p.teacher_key("resnet20", "d1") != p.teacher_key("resnet20", "d2")


def test_with_epochs_drops_milestones_past_the_end():
    p = load_protocol("digits")
    q = p.__class__(**{**p.__dict__, "schedule": {"name": "multistep", "milestones": [2, 5, 9]}})
    assert q.with_epochs(6).schedule["milestones"] == [2, 5]


def test_default_pair_must_exist(tmp_path):
    bad = {**TINY_PROTOCOL, "default_pair": "x__y"}
    with pytest.raises(ProtocolError, match="default_pair 'x__y' is not one of"):
        load_protocol(write_protocol(tmp_path / "c.yaml", bad))


def test_teacher_archs_recipe_is_hashed_only_where_that_teacher_is_used(tmp_path):
    import copy

    data = copy.deepcopy(TINY_PROTOCOL)
    data["pairs"] = [{"teacher": "resnet14", "student": "resnet8"}, {"teacher": "resnet20", "student": "resnet8"}]
    base = load_protocol(write_protocol(tmp_path / "a.yaml", data))
    adamw = {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.05}
    data["teacher_archs"] = {"resnet20": {"optimizer": adamw, "schedule": {"name": "cosine", "warmup_epochs": 1}}}
    own = load_protocol(write_protocol(tmp_path / "b.yaml", data))

    recipe = own.teacher_recipe_for("resnet20")
    assert recipe.optimizer == adamw and recipe.epochs == 3 and recipe.schedule["warmup_epochs"] == 1
    assert own.teacher_recipe_for("resnet14") == base.teacher
    # the other teacher and its pair keep their key and hash; the overridden ones change
    assert own.teacher_key("resnet14", "d") == base.teacher_key("resnet14", "d")
    assert own.hash(own.pair("resnet14__resnet8")) == base.hash(base.pair("resnet14__resnet8"))
    assert own.teacher_key("resnet20", "d") != base.teacher_key("resnet20", "d")
    assert own.hash(own.pair("resnet20__resnet8")) != base.hash(base.pair("resnet20__resnet8"))
    assert own.with_teacher_epochs(1).teacher_recipe_for("resnet20").epochs == 1

    data["teacher_archs"] = {"resnet20": {"optimizer": {"name": "adamw"}}}
    with pytest.raises(ProtocolError, match=r"teacher_archs\.resnet20\.optimizer needs an 'lr'"):
        load_protocol(write_protocol(tmp_path / "c.yaml", data))
    data["teacher_archs"] = {"resnet20": {"lr": 0.1}}
    with pytest.raises(ProtocolError, match=r"teacher_archs\.resnet20"):
        load_protocol(write_protocol(tmp_path / "d.yaml", data))


def test_a_methods_default_pair_trains_with_that_pairs_own_epochs():
    # fmnist's MIM pair sets `epochs: 15` (the protocol's are 4); `dmae` reaches it through `method_pairs`, and
    # must train what its hash records whether or not PAIR is typed
    from distillbench.benchmark.runner import RunRequest, resolve

    implicit = resolve(RunRequest(method="dmae", protocol="fmnist"))
    explicit = resolve(RunRequest(method="dmae", protocol="fmnist", pair=implicit.pair.name))
    assert implicit.pair.name == "mae_vit_tiny_p4_28.mae__mae_vit_micro_p4_28" and implicit.pair.epochs == 15
    assert implicit.protocol.epochs == explicit.protocol.epochs == 15
    assert implicit.protocol_hash == explicit.protocol_hash
    assert resolve(RunRequest(method="kd", protocol="fmnist")).protocol.epochs == 4  # the default pair's
