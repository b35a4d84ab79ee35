"""Heterogeneous pairs (OFA-KD, ofa.md §4, §8): one vanilla run per student recipe, shared by every pair of
that student, and shown in each pair's leaderboard cell."""

from __future__ import annotations

import json
from pathlib import Path

from distillbench.benchmark.cost import count_adapter_flops, count_flops
from distillbench.benchmark.protocol import load_protocol
from distillbench.benchmark.results import record_path, write_json_atomic
from distillbench.benchmark.runner import RunRequest, resolve, run
from distillbench.benchmark.zoo import create_model
from distillbench.leaderboards.collect import collect
from distillbench.leaderboards.render import cell_title, provenance_text
from distillbench.methods import FrozenTeacher, get_method
from distillbench.methods.ofa import OFA

from tests.test_records import good_record

REPO = Path(__file__).resolve().parent.parent
HETERO = "vit_micro_p4_28__resnet8"


def test_vanilla_of_a_hetero_pair_is_the_vanilla_of_its_student():
    p = load_protocol("fmnist")
    assert p.reference_pair(p.pair(HETERO)).name == "resnet20__resnet8"
    # a token student has its own recipe (AdamW), so its vanilla is its own pair's
    token = p.pair("resnet20__vit_micro_p4_28")
    assert p.reference_pair(token) is token and p.reference_pair(p.pair()) is p.pair()
    shared, own = (
        resolve(RunRequest(method="vanilla", protocol="fmnist", pair=HETERO)),
        resolve(RunRequest(method="vanilla", protocol="fmnist")),
    )
    assert shared.path == own.path and shared.path.parent.name == "none__resnet8"
    assert shared.protocol.hash(shared.pair) == own.protocol.hash(own.pair)
    committed = REPO / "leaderboards/records/fmnist/vanilla/none__resnet8/seed0.json"
    assert own.protocol.hash(own.pair) == json.loads(committed.read_text())["protocol_hash"]
    # distilled runs keep their own pair and hash
    kd = resolve(RunRequest(method="kd", protocol="fmnist", pair=HETERO))
    assert kd.path.parent.name == HETERO and kd.protocol.hash(kd.pair) != own.protocol.hash(own.pair)


def test_a_second_pair_reuses_the_finished_vanilla_record(tmp_path):
    r = resolve(RunRequest(method="vanilla", protocol="fmnist", results=str(tmp_path)))
    write_json_atomic(r.path, good_record(method="vanilla", protocol="fmnist", run_id="v0"))
    said = []
    record = run(RunRequest(method="vanilla", protocol="fmnist", pair=HETERO, results=str(tmp_path)), say=said.append)
    assert record["run_id"] == "v0" and "serves this pair too" in said[0]


def _write(root: Path, method: str, pair: str, phash: str, top1: float, seed: int = 0, **changes) -> None:
    teacher, student = pair.split("__")
    record = good_record(
        method=method,
        protocol="fmnist",
        protocol_hash=phash,
        seed=seed,
        run_id=f"{method}{pair}{seed}",
        metrics={"top1": top1},
        teacher=None if teacher == "none" else {"arch": teacher, "checkpoint_sha256": "cd" * 32, "top1": 90.0},
        student={"arch": student, "params": 1, "flops": 2},
        **changes,
    )
    write_json_atomic(record_path(root, "fmnist", method, "", pair, seed), record)


def test_the_hetero_cell_shows_the_one_vanilla_row_of_its_student(tmp_path):
    p = load_protocol("fmnist")
    base, hetero = p.hash(p.pair()), p.hash(p.pair(HETERO))
    _write(tmp_path, "vanilla", "none__resnet8", base, 88.0, reference_hash=base)
    _write(tmp_path, "kd", "resnet20__resnet8", base, 90.0)  # an older record: no reference_hash (YAML fallback)
    _write(tmp_path, "kd", HETERO, hetero, 89.0, reference_hash=base)
    _write(tmp_path, "ofa", HETERO, hetero, 89.5)  # YAML fallback
    _write(tmp_path, "kd", "x__resnet8", "other", 70.0)  # another recipe: no vanilla of its own
    board = collect(tmp_path)["fmnist"]
    cells = {(key[0], key[2]): rows for key, rows in board.cells()}
    assert [r.method for r in cells[(base, "resnet20")]] == ["kd", "vanilla"]
    rows = cells[(hetero, "vit_micro_p4_28")]
    assert [(r.method, r.rank) for r in rows] == [("ofa", 1), ("kd", 2), ("vanilla", 3)]
    vanilla = rows[-1]
    assert vanilla.protocol_hash == base and vanilla.paths == ["fmnist/vanilla/none__resnet8/seed0.json"]
    assert f"hash {hetero}" in cell_title(rows) and base in provenance_text(vanilla)
    assert [r.method for r in cells[("other", "x")]] == ["kd"]
    assert sum(r.method == "vanilla" for r in board.rows) == 2  # one record, shown in the two cells of resnet8


def test_adapter_flops_are_counted_apart_from_the_students():
    """OFA's branch heads are adapters: their FLOPs are reported beside the student's, never in them."""
    hp = get_method("ofa").resolve_hparams()
    student = create_model("resnet8", num_classes=5)
    teacher = FrozenTeacher(create_model("resnet20", num_classes=5))
    shape = (3, 32, 32)
    last = OFA(student, teacher, num_classes=5, hparams={**hp, "stages": [3]})
    # stage 3 of resnet8 at 32 px is 64 × 8 × 8; its head is a 1×1 conv 64 → D = 64, pool, Linear(64 → 5)
    assert count_adapter_flops(last, shape) == 8 * 8 * 64 * 64 + 64 * 5
    every = OFA(student, teacher, num_classes=5, hparams=hp)
    feats = {1: (16, 32, 32), 2: (32, 16, 16), 3: (64, 8, 8)}
    per_head = [count_flops(every.heads[str(s)], feats[s]) for s in (1, 2, 3)]
    assert count_adapter_flops(every, shape) == sum(per_head) > per_head[-1]
    assert count_flops(student, shape) == count_flops(create_model("resnet8", num_classes=5), shape)
    assert every.training  # the count leaves the module's mode alone

    class Silent(OFA):  # adapters, but no word on what they read
        def adapter_inputs(self, x):
            return []

    assert count_adapter_flops(Silent(student, teacher, num_classes=5, hparams=hp), shape) is None
    plain = get_method("kd").module_cls(student, teacher, num_classes=5, hparams=get_method("kd").resolve_hparams())
    assert count_adapter_flops(plain, shape) == 0
