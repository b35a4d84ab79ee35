"""The KD³ web-proxy table: every arm's last-epoch test top-1 over seeds, with selection diagnostics.

    python -m distillbench.leaderboards.webproxy leaderboards/records/webproxy-digits

reads `<folder>/<method[@variant]>/<pair>/seed<k>.json` (finished runs only; others are listed) and
prints Markdown: top-1 mean ± sample std and per seed, and for KD³ arms with selection the mean
selection precision / recall / kept fraction over the epochs whose α is 0 (the second half, where
selection is student-driven), the pool's in-distribution base rate and the mean selection-pass time.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def load_records(folder: Path) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """{arm: records sorted by seed}, [problems]. An arm is `method[@variant]/pair`."""
    arms: dict[str, list[dict[str, Any]]] = {}
    problems = []
    for path in sorted(Path(folder).glob("*/*/seed*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError as exc:
            problems.append(f"{path}: unreadable ({exc})")
            continue
        if record.get("status") != "finished":
            problems.append(f"{path}: status {record.get('status')}")
            continue
        arms.setdefault(f"{path.parent.parent.name}/{path.parent.name}", []).append(record)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in arms.items()}, problems


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def selection_summary(record: dict[str, Any]) -> dict[str, float] | None:
    """Means over the epochs with α = 0 of the logged selection diagnostics (None without selection)."""
    rows = [r for r in record.get("history", []) if "select/precision" in r]
    if not rows:
        return None
    late = [r for r in rows if r.get("select/alpha", 1.0) == 0.0] or rows
    keys = ("precision", "recall", "kept_fraction", "base_rate", "time_s", "fallback")
    return {k: statistics.mean(r[f"select/{k}"] for r in late if f"select/{k}" in r) for k in keys}


def render(arms: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| arm | n | test top-1 (%) | per seed | sel. precision (α=0) | sel. recall | kept | pool base rate "
        "| sel. pass (s) | adapter params | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, records in sorted(arms.items()):
        top1 = [r["metrics"]["top1"] for r in records]
        sel = [s for s in (selection_summary(r) for r in records) if s]

        def col(key: str, fmt: str = "{:.3f}", sel=sel) -> str:
            return fmt.format(statistics.mean(s[key] for s in sel)) if sel else "–"

        lines.append(
            f"| `{arm}` | {len(records)} | {_mean_std(top1)} | {', '.join(f'{v:.2f}' for v in top1)} "
            f"| {col('precision')} | {col('recall')} | {col('kept_fraction')} | {col('base_rate')} "
            f"| {col('time_s', '{:.2f}')} | {records[0].get('adapter_params', '–')} "
            f"| {statistics.mean(r['train_time_s'] for r in records):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m distillbench.leaderboards.webproxy <records/<protocol> folder>", file=sys.stderr)
        return 2
    arms, problems = load_records(Path(args[0]))
    print(render(arms))
    for problem in problems:
        print(f"not included: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
