"""Build the published tables: records → `<out>/<protocol>.{md,tex,csv,html,png}`."""

from __future__ import annotations

from pathlib import Path

from ..benchmark.errors import BenchmarkError
from .collect import Leaderboard, collect
from .render import plot, to_csv, to_html, to_latex, to_markdown
from .reported import load_reported

SUFFIXES = (".md", ".tex", ".csv", ".html", ".png")


class LeaderboardError(BenchmarkError):
    pass


def build(
    results: str | Path,
    out: str | Path,
    *,
    protocols: list[str] | None = None,
    reported: str | Path | None = None,
    command: str = "",
    png: bool = True,
) -> dict[str, Leaderboard]:
    results, out = Path(results), Path(out)
    if not results.is_dir():
        raise LeaderboardError(f"no results folder {results} (run `make bench ... RESULTS={results}` first)")
    boards = collect(results, load_reported(reported))
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
