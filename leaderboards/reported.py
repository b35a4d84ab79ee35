"""Paper-reported numbers (`leaderboards/reported.yaml`), validated: shown beside measured ones, never mixed.

    from distillbench.leaderboards.reported import load_reported
    for r in load_reported():            # the shipped file; or load_reported("path/to/reported.yaml")
        print(r.protocol, r.teacher, r.student, r.method, r.top1, r.citation, r.verified)

The schema is documented at the top of the YAML file. Any problem is a `ReportedError` naming the file,
the entry and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..benchmark.errors import BenchmarkError

SCHEMA_VERSION = 1
REQUIRED = ("protocol", "teacher", "student", "method", "top1", "source", "verified")
OPTIONAL = ("note",)


class ReportedError(BenchmarkError):
    pass


@dataclass(frozen=True)
class ReportedResult:
    protocol: str
    teacher: str | None  # None: a model trained alone (method "vanilla")
    student: str
    method: str
    top1: float
    source: str  # a key of the file's `sources`
    citation: str  # the citation that key stands for
    verified: bool
    note: str = ""

    @property
    def pair(self) -> str:
        """`<teacher>__<student>` as in run records (`none__<student>` for vanilla)."""
        return f"{self.teacher or 'none'}__{self.student}"


def default_path() -> Path:
    return Path(str(resources.files("distillbench.leaderboards") / "reported.yaml"))


def _entry(raw: Any, i: int, sources: dict[str, str], where: str) -> ReportedResult:
    at = f"{where}: results[{i}]"
    if not isinstance(raw, dict):
        raise ReportedError(f"{at}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - set(REQUIRED) - set(OPTIONAL)
    if unknown:
        raise ReportedError(
            f"{at}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(REQUIRED + OPTIONAL)}"
        )
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ReportedError(f"{at}: missing key(s) {', '.join(missing)}")
    for key in ("protocol", "student", "method", "source"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ReportedError(f"{at}.{key}: expected a non-empty string, got {raw[key]!r}")
    teacher = raw["teacher"]
    if teacher is None and raw["method"] != "vanilla":
        raise ReportedError(f"{at}: teacher is null but method is {raw['method']!r} (only 'vanilla' has no teacher)")
    if teacher is not None and (not isinstance(teacher, str) or not teacher):
        raise ReportedError(f"{at}.teacher: expected an architecture name or null, got {teacher!r}")
    top1 = raw["top1"]
    if isinstance(top1, bool) or not isinstance(top1, int | float) or not 0.0 <= top1 <= 100.0:
        raise ReportedError(f"{at}.top1: expected a percentage in [0, 100], got {top1!r}")
    if not isinstance(raw["verified"], bool):
        raise ReportedError(f"{at}.verified: expected true or false, got {raw['verified']!r}")
    if raw["source"] not in sources:
        raise ReportedError(f"{at}.source: {raw['source']!r} is not one of the file's sources ({', '.join(sources)})")
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise ReportedError(f"{at}.note: expected a string, got {note!r}")
    return ReportedResult(
        protocol=raw["protocol"],
        teacher=teacher,
        student=raw["student"],
        method=raw["method"],
        top1=float(top1),
        source=raw["source"],
        citation=sources[raw["source"]],
        verified=raw["verified"],
        note=note,
    )


def load_reported(path: str | Path | None = None) -> list[ReportedResult]:
    """Every entry of a reported-numbers file (default: the shipped `leaderboards/reported.yaml`)."""
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        raise ReportedError(f"reported-numbers file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ReportedError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"schema_version", "sources", "results"}:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ReportedError(f"{path}: expected exactly the keys schema_version, sources, results; found {found}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ReportedError(f"{path}: schema_version {data['schema_version']!r} is not {SCHEMA_VERSION}")
    sources = data["sources"]
    if not isinstance(sources, dict) or not all(isinstance(v, str) and v for v in sources.values()):
        raise ReportedError(f"{path}: sources must map keys to non-empty citation strings")
    if not isinstance(data["results"], list):
        raise ReportedError(f"{path}: results must be a list")
    results = [_entry(raw, i, sources, str(path)) for i, raw in enumerate(data["results"])]
    seen: dict[tuple, int] = {}
    for i, r in enumerate(results):
        key = (r.protocol, r.teacher, r.student, r.method, r.source)
        if key in seen:
            raise ReportedError(f"{path}: results[{i}] repeats results[{seen[key]}] {key}")
        seen[key] = i
    return results
