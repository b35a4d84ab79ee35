"""Build the published tables: records → `<out>/<protocol>.{md,tex,csv,html,png}`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..benchmark.errors import BenchmarkError
from .collect import Leaderboard, collect
from .render import plot, to_csv, to_html, to_latex, to_markdown

DEFAULT_REPORTED = Path(__file__).resolve().parent / "reported.yaml"
SUFFIXES = (".md", ".tex", ".csv", ".html", ".png")


class LeaderboardError(BenchmarkError):
    pass


def read_reported(path: Path | None) -> list[dict[str, Any]]:
    """Paper-reported numbers: a YAML list (or `{entries: [...]}`) of {protocol, teacher, student,
    method, top1, source, verified}; a missing default file means no reported numbers."""
    if path is None or not Path(path).exists():
        if path is not None and Path(path) != DEFAULT_REPORTED:
            raise LeaderboardError(f"reported numbers file {path} does not exist")
        return []
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise LeaderboardError(f"{path}: not valid YAML ({exc})") from None
    entries = data.get("entries", data.get("reported")) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise LeaderboardError(f"{path}: expected a list of reported numbers")
    for i, entry in enumerate(entries):
        missing = [k for k in ("protocol", "teacher", "student", "method", "top1") if k not in (entry or {})]
        if missing:
            raise LeaderboardError(f"{path}: entry {i} lacks {', '.join(missing)}")
    return entries


def build(
    results: str | Path,
    out: str | Path,
    *,
    protocols: list[str] | None = None,
    reported: Path | None = DEFAULT_REPORTED,
    command: str = "",
    png: bool = True,
) -> dict[str, Leaderboard]:
    results, out = Path(results), Path(out)
    if not results.is_dir():
        raise LeaderboardError(f"no results folder {results} (run `make bench ... RESULTS={results}` first)")
    boards = collect(results, read_reported(reported))
    if protocols:
        unknown = sorted(set(protocols) - set(boards))
        if unknown:
            raise LeaderboardError(
                f"no records for protocol(s) {', '.join(unknown)} under {results}; found: {', '.join(boards) or 'none'}"
            )
        boards = {name: boards[name] for name in protocols}
    if not boards:
        raise LeaderboardError(f"no run records (seed*.json) under {results}")
    out.mkdir(parents=True, exist_ok=True)
    for name, board in boards.items():
        (out / f"{name}.md").write_text(to_markdown(board, command))
        (out / f"{name}.tex").write_text(to_latex(board))
        (out / f"{name}.csv").write_text(to_csv(board))
        (out / f"{name}.html").write_text(to_html(board, command))
        if png and board.rows:
            plot(board, out / f"{name}.png")
    return boards
