"""Leaderboard generator: validation, grouping, seed aggregation, ranks, Δ vs reported, every output format."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
from distillbench.benchmark.results import record_path, write_json_atomic
from distillbench.leaderboards.build import build
from distillbench.leaderboards.cli import main
from distillbench.leaderboards.collect import collect
from distillbench.leaderboards.render import to_csv
from distillbench.leaderboards.reported import load_reported

from tests.test_records import good_record

REPO = Path(__file__).resolve().parent.parent
PUBLISHED = ("digits", "fmnist")
BASELINES = ("vanilla", "kd", "dkd")
BASE_PAIR = ("resnet20", "resnet8")
PUBLISH_COMMAND = "python -m distillbench.leaderboards build --results leaderboards/records --out leaderboards"


def _teacher(top1: float = 95.0) -> dict:
    return {"arch": "resnet20", "checkpoint_sha256": "ab" * 32, "top1": top1}


def write(results: Path, method: str, seed: int, top1: float, *, phash="h1", teacher=True, **changes) -> Path:
    pair = "resnet20__resnet8" if teacher else "none__resnet8"
    record = good_record(
        method=method,
        seed=seed,
        protocol_hash=phash,
        run_id=f"{method}{seed}{phash}",
        metrics={"top1": top1, "top5": 99.0},
        best_epoch_metrics={"epoch": 1, "top1": top1 + 0.5},
        teacher=_teacher() if teacher else None,
        git_commit="0123456789abcdef",
        overhead_vs_student=1.8 if teacher else 1.0,
        **changes,
    )
    path = record_path(results, "digits", method, changes.get("variant", ""), pair, seed)
    write_json_atomic(path, record)
    return path


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    for seed, top1 in enumerate((90.0, 91.0, 93.0)):
        write(root, "kd", seed, top1)
    for seed, top1 in enumerate((88.0, 89.0)):
        write(root, "vanilla", seed, top1, teacher=False)
    write(root, "dkd", 0, 92.0)
    return root


def test_seeds_are_aggregated_and_ranked_per_pair(results):
    board = collect(results)["digits"]
    rows = {r.method: r for r in board.rows}
    kd = rows["kd"]
    assert (kd.n, kd.seeds) == (3, [0, 1, 2])
    assert kd.top1_mean == pytest.approx(274 / 3)
    assert kd.top1_std == pytest.approx(statistics.stdev([90.0, 91.0, 93.0]))  # sample std (n − 1)
    assert kd.top1_std == pytest.approx((7 / 3) ** 0.5)
    assert (kd.top1_min, kd.top1_max) == (90.0, 93.0)
    assert rows["dkd"].top1_std is None  # one seed: no std, never 0
    # vanilla (no teacher) is the reference row of the resnet20 → resnet8 cell
    assert rows["vanilla"].teacher == "resnet20" and rows["vanilla"].n == 2
    assert [(r.method, r.rank) for r in board.rows] == [("dkd", 1), ("kd", 2), ("vanilla", 3)]
    assert kd.teacher_sha256 == ["ab" * 6] and kd.teacher_top1 == [95.0] and kd.git_commits == ["0123456"]
    assert board.excluded == []


def test_another_protocol_hash_gets_its_own_cell(results):
    write(results, "kd", 3, 50.0, phash="h2")
    board = collect(results)["digits"]
    cells = {key[0]: [r.method for r in rows] for key, rows in board.cells()}
    assert set(cells) == {"h1", "h2"}
    assert cells["h2"] == ["kd"]  # no vanilla of hash h2: nothing is attached
    assert next(r for r in board.rows if r.protocol_hash == "h1" and r.method == "kd").n == 3


def test_invalid_failed_and_duplicate_records_are_listed_not_dropped(results, tmp_path):
    bad = write(results, "kd", 7, 80.0)
    data = json.loads(bad.read_text())
    del data["protocol_hash"]
    bad.write_text(json.dumps(data))
    write(results, "dkd", 1, 10.0, status="failed", error={"message": "loss is nan at step 3"})
    (results / "digits" / "kd" / "resnet20__resnet8" / "seed9.json").write_text("{not json")
    dup = results / "elsewhere" / "seed0.json"  # a copy of seed 0 of kd in another folder
    dup.parent.mkdir(parents=True)
    dup.write_text((results / "digits/kd/resnet20__resnet8/seed0.json").read_text())
    (results / "digits/kd/resnet20__resnet8/seed0.json.prev-old").write_text("{}")  # set aside: not a record

    board = collect(results)["digits"]
    reasons = {e.path: e.reasons for e in board.excluded}
    assert reasons["digits/kd/resnet20__resnet8/seed7.json"] == ("missing field 'protocol_hash'",)
    assert reasons["digits/dkd/resnet20__resnet8/seed1.json"] == ("status failed: loss is nan at step 3",)
    assert reasons["digits/kd/resnet20__resnet8/seed9.json"][0].startswith("unreadable")
    assert "already read from digits/kd/resnet20__resnet8/seed0.json" in reasons["elsewhere/seed0.json"][0]
    assert len(reasons) == 4 and bad.exists()
    assert next(r for r in board.rows if r.method == "kd").n == 3

    out = tmp_path / "out"
    build(results, out, reported=None)
    for suffix in (".md", ".html", ".tex"):
        text = (out / f"digits{suffix}").read_text()
        assert "seed7.json" in text and "missing field" in text and "elsewhere/seed0.json" in text
    assert "seed7" not in (out / "digits.csv").read_text()


def test_reported_numbers_and_delta(results, tmp_path):
    reported = tmp_path / "reported.yaml"
    reported.write_text(
        "schema_version: 1\n"
        "sources: {paper: 'a paper, Table 1', other: 'another paper'}\n"
        "results:\n"
        "  - {protocol: digits, teacher: resnet20, student: resnet8, method: kd, top1: 89.0, source: other,"
        " verified: false}\n"
        "  - {protocol: digits, teacher: resnet20, student: resnet8, method: kd, top1: 90.0, source: paper,"
        " verified: true}\n"
        "  - {protocol: digits, teacher: null, student: resnet8, method: vanilla, top1: 88.0, source: paper,"
        " verified: true}\n"
    )
    board = collect(results, load_reported(reported))["digits"]
    rows = {r.method: r for r in board.rows}
    assert rows["kd"].delta_vs_reported == pytest.approx(274 / 3 - 90.0)  # the verified number wins
    assert rows["kd"].reported_source == "a paper, Table 1" and rows["kd"].reported_verified is True
    assert rows["vanilla"].delta_vs_reported == pytest.approx(0.5)  # teacher-less: matches `teacher: null`
    assert rows["dkd"].reported_top1 is None
    table = {r["method"]: r for r in csv.DictReader(io.StringIO(to_csv(board)))}
    assert table["dkd"]["reported_top1"] == "" and table["kd"]["reported_verified"] == "true"
    assert float(table["kd"]["delta_vs_reported"]) == pytest.approx(1.3333, abs=1e-4)
    out = tmp_path / "out"
    build(results, out, reported=reported)
    assert "+1.33 (vs 90.00)" in (out / "digits.md").read_text()


def test_outputs(results, tmp_path):
    out = tmp_path / "out"
    build(results, out, reported=None, command="make leaderboard")
    rows = list(csv.DictReader((out / "digits.csv").open()))
    for col in ("protocol", "protocol_hash", "teacher", "student", "method", "n", "top1_mean", "top1_std"):
        assert col in rows[0]
    kd = next(r for r in rows if r["method"] == "kd")
    assert (kd["protocol"], kd["protocol_hash"], kd["n"], kd["seeds"]) == ("digits", "h1", "3", "0 1 2")
    assert float(kd["top1_mean"]) == pytest.approx(91.3333, abs=1e-4)
    assert float(kd["top1_std"]) == pytest.approx(1.5275, abs=1e-4)
    assert kd["teacher_sha256"] == "abababababab" and kd["teacher_top1"] == "95.00" and kd["git_commits"] == "0123456"

    md = (out / "digits.md").read_text()
    assert "| 2 | kd | 3 | 91.33 ± 1.53 | 90.00–93.00 |" in md and "**92.00**" in md
    assert "`make leaderboard`" in md and "hash h1" in md
    tex = (out / "digits.tex").read_text()
    assert tex.count("\\toprule") == tex.count("\\bottomrule") == 1 and "\\midrule" in tex
    assert "91.33 $\\pm$ 1.53" in tex and "\\textbf{92.00}" in tex
    page = (out / "digits.html").read_text()
    assert page.count('<tr data-method="') == 3
    for external in ("http:", "https:", "<link", " src=", "@import"):
        assert external not in page
    assert (out / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = tmp_path / "again"
    build(results, again, reported=None, command="make leaderboard")
    for suffix in (".md", ".tex", ".csv", ".html", ".png"):
        assert (out / f"digits{suffix}").read_bytes() == (again / f"digits{suffix}").read_bytes(), suffix


def test_latex_escapes_names(results, tmp_path):
    write(results, "kd", 0, 95.0, variant="t_2", phash="h_3")
    build(results, tmp_path / "o", reported=None)
    tex = (tmp_path / "o" / "digits.tex").read_text()
    assert "kd@t\\_2" in tex and "h\\_3" in tex


def test_cli(results, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["build", "--results", str(results), "--out", str(out), "--protocol", "digits", "--no-png"]) == 0
    assert (out / "digits.csv").exists() and not (out / "digits.png").exists()
    assert main(["build", "--results", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no results folder" in capsys.readouterr().err
    assert main(["build", "--results", str(results), "--out", str(out), "--protocol", "imagenet"]) == 2
    assert "no records for protocol(s) imagenet" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", PUBLISHED)
def test_published_tables_match_the_records(protocol, tmp_path):
    """Every published row is what the committed records give now (records added since publication
    only add rows; refresh with `make leaderboard RESULTS=leaderboards/records` and commit)."""
    build(REPO / "leaderboards" / "records", tmp_path, protocols=[protocol], command=PUBLISH_COMMAND, png=False)
    key = ("protocol_hash", "teacher", "student", "method")
    fresh = {tuple(r[k] for k in key): r for r in csv.DictReader((tmp_path / f"{protocol}.csv").open())}
    published = list(csv.DictReader((REPO / "leaderboards" / f"{protocol}.csv").open()))
    assert published, f"leaderboards/{protocol}.csv is empty"
    # the baselines published in the README; other engineers' cells are checked when they regenerate
    published = [r for r in published if r["method"] in BASELINES and (r["teacher"], r["student"]) == BASE_PAIR]
    assert published, f"leaderboards/{protocol}.csv has no baseline rows"
    for row in published:
        now = fresh.get(tuple(row[k] for k in key))
        assert now is not None, f"published row {row['method']} has no records any more: regenerate the tables"
        for col in ("n", "seeds", "top1_mean", "top1_std", "top1_min", "top1_max", "git_commits", "teacher_sha256"):
            assert row[col] == now[col], f"{protocol}.csv {row['method']}.{col} is stale: regenerate the tables"
    again = tmp_path / "again"  # and regenerating reproduces the text outputs byte for byte
    build(REPO / "leaderboards" / "records", again, protocols=[protocol], command=PUBLISH_COMMAND, png=False)
    for suffix in (".md", ".tex", ".csv", ".html"):
        assert (again / f"{protocol}{suffix}").read_text() == (tmp_path / f"{protocol}{suffix}").read_text()


def test_mim_table_joins_arms_across_hashes_and_answers_the_spec_questions(tmp_path):
    from distillbench.leaderboards.mim import mim_markdown
    from distillbench.leaderboards.render import to_markdown

    root = tmp_path / "results"
    for seed, (full, mae_only, gd, sd) in enumerate(((80.0, 78.0, 79.0, 81.0), (82.0, 78.5, 79.5, 81.5))):
        write(root, "dmae", seed, full, phash="d")
        write(root, "dmae", seed, mae_only, phash="d", variant="feat_weight=0")
        write(root, "g2sd", seed, full + 1.0, phash="g")  # the extra .ft teacher: another hash
        write(root, "g2sd", seed, gd, phash="g", variant="gd-only")
        write(root, "g2sd", seed, sd, phash="g", variant="sd-only")
        write(root, "mae_ft", seed, 70.0 + seed, phash="m", teacher=False, variant="epochs=25")  # scratch student
        write(root, "mae_ft", seed, 99.0, phash="p", variant="epochs=25,probe=true")  # a probe: not the scratch arm
    write(root, "kd", 0, 95.0)  # not a MIM arm
    board = collect(root)["digits"]
    assert len({r.protocol_hash for r in board.rows if r.method != "kd"}) == 4  # four cells in the main tables
    text = "\n".join(mim_markdown(board))
    assert text.count("## Masked image modelling: resnet20 → resnet8 (all arms)") == 1
    assert text.count("## Masked image modelling") == 1  # the teacher-less scratch arm joins its student's pair
    table = [line for line in text.splitlines() if line.startswith("| ") and "arm" not in line]
    assert [line.split(" | ")[0] for line in table] == [
        "| dmae",
        "| dmae@feat_weight=0",
        "| g2sd",
        "| g2sd@gd-only",
        "| g2sd@sd-only",
        "| mae_ft@epochs=25",
        "| mae_ft@epochs=25,probe=true",
    ]
    assert "| kd " not in text
    # 81.00 ± 1.41 vs 78.25 ± 0.35: +2.75; GD+SD 82.00 vs SD-only 81.25: +0.75; vs GD-only 79.25: +2.75
    assert "DMAE vs the MAE-only student: `dmae` 81.00 ± 1.41 (n = 2) beats `dmae@feat_weight=0` 78.25 ± 0.35" in text
    assert (
        "G2SD (GD+SD) vs specific stage only: `g2sd` 82.00 ± 1.41 (n = 2) "
        "beats `g2sd@sd-only` 81.25 ± 0.35 (n = 2): +0.75; higher in 1 of 2 paired seeds" in text
    )
    assert "vs generic stage only: `g2sd` 82.00 ± 1.41 (n = 2) beats `g2sd@gd-only` 79.25 ± 0.35 (n = 2): +2.75" in text
    assert "`mae_ft@epochs=25` 70.50 ± 0.71 (n = 2): +10.50; higher in 2 of 2 paired seeds" in text
    assert "DMAE vs the scratch student: `dmae` 81.00 ± 1.41 (n = 2) beats `mae_ft@epochs=25` 70.50 ± 0.71" in text
    assert "Not yet measured: DMAE at r = 0.75 vs r = 0.9; Hybrid vs the feature term only (T_c)" in text
    # and the generated Markdown carries it
    assert "## Masked image modelling" in to_markdown(board)
