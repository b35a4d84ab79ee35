"""Run records → leaderboard rows: validate, group by (protocol hash, teacher, student), aggregate seeds.

Every `seed*.json` under the results folder is read and checked with
`distillbench.benchmark.results.load_record`. A record that is invalid, not `finished`, or a second
record of a seed already in its cell is *excluded* with the reason; exclusions are rendered in every
output, never dropped silently. Records set aside by a rerun (`seed<k>.json.prev-<run_id>`) are not
run records of the leaderboard and are not read.

A cell is (protocol, protocol hash, teacher, student); within it each method (with its variant) is
one row: top-1 mean ± sample std over seeds, n, min, max, and the rank of the method in the cell.
Teacher-less records (`vanilla`) are the reference row of every cell of the same protocol and student
whose reference hash (the hash of that student's teacher-less run: `Protocol.reference_pair`, so a
heterogeneous pair ViT → resnet8 shows the one vanilla resnet8 row of resnet20 → resnet8) equals the
vanilla record's protocol hash; with no distilled cell for that student they form a cell of their own
(teacher `—`). Records that predate the `reference_hash` field get it from the protocol's YAML when
their hash is one of its pairs' hashes, else their own hash.
"""

from __future__ import annotations

import functools
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..benchmark.errors import BenchmarkError
from ..benchmark.protocol import load_protocol
from ..benchmark.results import load_record, method_label, primary_metric
from .reported import ReportedResult

NO_TEACHER = "—"


@dataclass(frozen=True)
class Excluded:
    """A record file the leaderboard does not aggregate, and why."""

    path: str
    protocol: str
    reasons: tuple[str, ...]


@dataclass
class Row:
    protocol: str
    protocol_version: int
    protocol_hash: str
    teacher: str
    student: str
    method: str
    seeds: list[int]
    top1: list[float]
    top5: list[float]
    best_top1: list[float]
    teacher_sha256: list[str]
    teacher_top1: list[float]
    git_commits: list[str]
    student_params: int | None = None
    student_flops: int | None = None
    adapter_params: int | None = None
    adapter_flops: int | None = None  # training-only adapters (e.g. OFA's branch heads), per image
    throughput_img_s: float | None = None
    overhead_vs_student: float | None = None
    peak_mem_mb: float | None = None
    train_time_s: float | None = None
    reference_hash: str = ""  # the protocol hash of this student's teacher-less (vanilla) run
    cell_hash: str = ""  # the hash of the cell a row is shown in, when not its own (vanilla in a hetero cell)
    rank: int = 0
    reported_top1: float | None = None
    reported_source: str = ""
    reported_verified: bool | None = None
    has_teacher: bool = True
    paths: list[str] = field(default_factory=list)
    #: the reported metric held in `top1` (and `best_top1`, `teacher_top1`): "top1", or "AP" for detection
    metric: str = "top1"
    #: detection: AP50, AP75, APs, APm, APl per seed (percent), beside AP in `top1`
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def is_detection(self) -> bool:
        return self.metric == "AP"

    @property
    def cell(self) -> str:
        return self.cell_hash or self.protocol_hash

    @property
    def n(self) -> int:
        return len(self.top1)

    @property
    def top1_mean(self) -> float:
        return statistics.fmean(self.top1)

    @property
    def top1_std(self) -> float | None:
        """Sample standard deviation (n − 1); undefined for one seed."""
        return statistics.stdev(self.top1) if self.n > 1 else None

    @property
    def top1_min(self) -> float:
        return min(self.top1)

    @property
    def top1_max(self) -> float:
        return max(self.top1)

    @property
    def delta_vs_reported(self) -> float | None:
        return None if self.reported_top1 is None else self.top1_mean - self.reported_top1


@dataclass
class Leaderboard:
    protocol: str
    rows: list[Row]
    excluded: list[Excluded]

    def cells(self) -> list[tuple[tuple[str, int, str, str], list[Row]]]:
        """Rows grouped by (protocol hash, version, teacher, student), in row order."""
        groups: dict[tuple[str, int, str, str], list[Row]] = {}
        for row in self.rows:
            groups.setdefault((row.cell, row.protocol_version, row.teacher, row.student), []).append(row)
        return list(groups.items())


def find_records(results: Path) -> list[Path]:
    return sorted(p for p in Path(results).rglob("seed*.json") if p.is_file())


def _protocol_from_path(path: Path, results: Path) -> str:
    parts = path.relative_to(results).parts
    return parts[0] if len(parts) > 1 else "unknown"


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, int | float)]
    return round(statistics.fmean(values), 4) if values else None


def _one(values: list[Any]) -> Any:
    """The value shared by all seeds (params, FLOPs), or None when they disagree or are missing."""
    distinct = {v for v in values if v is not None}
    return distinct.pop() if len(distinct) == 1 else None


def collect(results: str | Path, reported: list[ReportedResult] | None = None) -> dict[str, Leaderboard]:
    """Read every record under `results` and return one leaderboard per protocol name."""
    results = Path(results)
    excluded: list[Excluded] = []
    # (protocol, hash, version, teacher, student, method label) -> [(record, relative path)]
    runs: dict[tuple, list[tuple[dict[str, Any], str]]] = defaultdict(list)
    for path in find_records(results):
        rel = path.relative_to(results).as_posix()
        record, problems = load_record(path)
        protocol = record.get("protocol") if isinstance(record, dict) else None
        protocol = protocol if isinstance(protocol, str) else _protocol_from_path(path, results)
        if not problems and record["status"] != "finished":
            error = (record.get("error") or {}).get("message") if isinstance(record.get("error"), dict) else None
            problems = [f"status {record['status']}" + (f": {error}" if error else "")]
        if problems:
            excluded.append(Excluded(rel, protocol, tuple(problems)))
            continue
        teacher = (record["teacher"] or {}).get("arch") or NO_TEACHER
        key = (
            protocol,
            record["protocol_hash"],
            record["protocol_version"],
            teacher,
            record["student"]["arch"],
            method_label(record["method"], record["variant"]),
        )
        if any(r["seed"] == record["seed"] for r, _ in runs[key]):
            first = next(p for r, p in runs[key] if r["seed"] == record["seed"])
            excluded.append(Excluded(rel, protocol, (f"seed {record['seed']} of this cell already read from {first}",)))
            continue
        runs[key].append((record, rel))

    rows = [_row(key, entries) for key, entries in runs.items()]
    rows = _attach_references(rows)
    _rank(rows)
    _set_reported(rows, reported or [])
    boards: dict[str, Leaderboard] = {}
    for row in sorted(rows, key=_row_order):
        boards.setdefault(row.protocol, Leaderboard(row.protocol, [], [])).rows.append(row)
    for item in sorted(excluded, key=lambda e: e.path):
        boards.setdefault(item.protocol, Leaderboard(item.protocol, [], [])).excluded.append(item)
    return dict(sorted(boards.items()))


def _row(key: tuple, entries: list[tuple[dict[str, Any], str]]) -> Row:
    protocol, phash, version, teacher, student, method = key
    entries = sorted(entries, key=lambda e: e[0]["seed"])
    recs = [r for r, _ in entries]
    teachers = [r["teacher"] or {} for r in recs]
    metric = primary_metric(recs[0])
    extra = {}
    if metric == "AP":
        for name in ("AP50", "AP75", "APs", "APm", "APl"):
            extra[name] = [float(r["metrics"][name]) for r in recs if isinstance(r["metrics"].get(name), int | float)]
    return Row(
        metric=metric,
        extra=extra,
        protocol=protocol,
        protocol_version=version,
        protocol_hash=phash,
        teacher=teacher,
        student=student,
        method=method,
        seeds=[r["seed"] for r in recs],
        top1=[float(r["metrics"][metric]) for r in recs],
        top5=[float(r["metrics"]["top5"]) for r in recs if isinstance(r["metrics"].get("top5"), int | float)],
        best_top1=[
            float(r["best_epoch_metrics"][metric])
            for r in recs
            if isinstance(r["best_epoch_metrics"].get(metric), int | float)
        ],
        teacher_sha256=sorted({t["checkpoint_sha256"][:12] for t in teachers if t.get("checkpoint_sha256")}),
        teacher_top1=sorted({float(t[metric]) for t in teachers if isinstance(t.get(metric), int | float)}),
        git_commits=sorted({_short_commit(r["git_commit"]) for r in recs if r["git_commit"]}),
        student_params=_one([r["student"].get("params") for r in recs]),
        student_flops=_one([r["student"].get("flops") for r in recs]),
        adapter_params=_one([r.get("adapter_params") for r in recs]),
        adapter_flops=_one([r.get("adapter_flops") for r in recs]),
        throughput_img_s=_mean([r["throughput_img_s"] for r in recs]),
        overhead_vs_student=_mean([r["overhead_vs_student"] for r in recs]),
        peak_mem_mb=max((r["peak_mem_mb"] for r in recs if r["peak_mem_mb"] is not None), default=None),
        train_time_s=_mean([r["train_time_s"] for r in recs]),
        has_teacher=teacher != NO_TEACHER,
        paths=[p for _, p in entries],
        reference_hash=_one([r.get("reference_hash") for r in recs]) or _yaml_reference(protocol, phash),
    )


@functools.cache
def _yaml_references(protocol: str) -> dict[str, str]:
    """{pair hash: reference hash} of the protocol's current YAML (empty when it is not a known protocol)."""
    try:
        p = load_protocol(protocol)
    except (BenchmarkError, OSError):
        return {}
    return {p.hash(pair): p.hash(p.reference_pair(pair)) for pair in p.pairs}


def _yaml_reference(protocol: str, phash: str) -> str:
    return _yaml_references(protocol).get(phash, phash)


def _short_commit(commit: str) -> str:
    return commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")


def _attach_references(rows: list[Row]) -> list[Row]:
    """Copy each teacher-less row into every distilled cell of the same protocol and student whose
    reference hash is the teacher-less row's hash (shown in that cell, with its own hash as provenance)."""
    out = [r for r in rows if r.teacher != NO_TEACHER]
    cells = {(r.protocol, r.protocol_hash, r.teacher, r.student, r.reference_hash) for r in out}
    for ref in (r for r in rows if r.teacher == NO_TEACHER):
        targets = sorted(c for c in cells if (c[0], c[4], c[3]) == (ref.protocol, ref.protocol_hash, ref.student))
        if not targets:
            out.append(ref)
        for _, phash, teacher, _, _ in targets:
            out.append(Row(**{**ref.__dict__, "teacher": teacher, "cell_hash": phash}))
    return out


def _rank(rows: list[Row]) -> None:
    """Rank per cell by mean top-1 (1 = best); ties share the better rank."""
    cells: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        cells[(row.protocol, row.cell, row.teacher, row.student)].append(row)
    for members in cells.values():
        for row in members:
            row.rank = 1 + sum(other.top1_mean > row.top1_mean for other in members)


def _set_reported(rows: list[Row], reported: list[ReportedResult]) -> None:
    """Match (protocol, teacher, student, method); a teacher-less row matches a `teacher: null` entry.

    Where several sources report the same cell, a verified number is preferred, then file order.
    """
    index: dict[tuple, ReportedResult] = {}
    for entry in sorted(reported, key=lambda e: not e.verified):
        index.setdefault((entry.protocol, entry.teacher, entry.student, entry.method), entry)
    for row in rows:
        entry = index.get((row.protocol, row.teacher if row.has_teacher else None, row.student, row.method))
        if entry is not None:
            row.reported_top1 = entry.top1
            row.reported_source = entry.citation
            row.reported_verified = entry.verified


def _row_order(row: Row) -> tuple:
    return (row.protocol, row.cell, row.teacher, row.student, row.rank, row.method)
