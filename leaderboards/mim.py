"""The masked-image-modelling table: every MIM arm of one teacher → student pair side by side.

MIM arms land in different leaderboard cells (an extra teacher such as Hybrid's T_c or G2SD's fine-tuned
teacher, or a longer scratch run, changes the protocol hash), so the per-cell tables never show DMAE next
to the MAE-only student or G2SD next to its single stages. This table joins them by (teacher, student)
and answers the specs' questions (dmae.md, g2sd.md, hybrid.md §7): does the full method beat each
ablation, by how much (difference of the seed means, with both sample stds).
"""

from __future__ import annotations

import re

from .collect import Leaderboard, Row

#: methods whose rows form the table (their variants are the arms)
MIM_METHODS = ("dmae", "g2sd", "hybrid", "mae_ft")

#: (full method, ablation, question): each ablation lists the label regexes (full match) a run may carry, first
#: match wins; the scratch student is `mae_ft` at the distill + fine-tuning epochs, whatever the protocol's sum
COMPARISONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("dmae", (r"dmae@feat_weight=0(\.0)?",), "DMAE vs the MAE-only student"),
    ("dmae", (r"mae_ft@epochs=\d+", "mae_ft"), "DMAE vs the scratch student"),
    ("dmae", (r"dmae@mask_ratio=0\.9",), "DMAE at r = 0.75 vs r = 0.9"),
    ("g2sd", ("g2sd@gd-only",), "G2SD (GD+SD) vs generic stage only"),
    ("g2sd", ("g2sd@sd-only",), "G2SD (GD+SD) vs specific stage only"),
    ("hybrid", ("hybrid@feature-only",), "Hybrid vs the feature term only (T_c)"),
    ("hybrid", ("hybrid@relation-only",), "Hybrid vs the relation term only (T_m)"),
    ("hybrid", ("hybrid@random-mask",), "Hybrid's redundant-token masking vs random masking"),
    ("hybrid", ("hybrid@const-0.25",), "Hybrid's progressive ratios vs a constant 0.25"),
)


def _find(labels: list[str], patterns: tuple[str, ...]) -> str | None:
    """The first label matching the earliest pattern (labels in sorted order, so the choice is stable)."""
    for pattern in patterns:
        hits = sorted(label for label in labels if re.fullmatch(pattern, label))
        if hits:
            return hits[0]
    return None


def is_mim(row: Row) -> bool:
    return row.method.split("@", 1)[0] in MIM_METHODS


def _mean_std(row: Row) -> str:
    std = f"{row.top1_std:.2f}" if row.top1_std is not None else "–"
    return f"{row.top1_mean:.2f} ± {std}"


def paired_wins(ours: Row, base: Row) -> tuple[int, int]:
    """(seeds where `ours` is strictly higher, seeds both arms ran): the specs' "in ≥ 2 of 3 seeds" count."""
    theirs = dict(zip(base.seeds, base.top1, strict=True))
    pairs = [(a, theirs[s]) for s, a in zip(ours.seeds, ours.top1, strict=True) if s in theirs]
    return sum(a > b for a, b in pairs), len(pairs)


def comparison_lines(rows: list[Row]) -> list[str]:
    """One line per answerable question: full − ablation (seed means), both means ± std and n, and the
    seeds (paired by seed) in which the full method is higher."""
    by_label = {r.method: r for r in rows}
    lines = []
    for full, ablations, question in COMPARISONS:
        found = _find(list(by_label), ablations)
        if full not in by_label or found is None:
            continue
        ours, base = by_label[full], by_label[found]
        diff = ours.top1_mean - base.top1_mean
        verdict = "beats" if diff > 0 else "does not beat"
        wins, paired = paired_wins(ours, base)
        lines.append(
            f"- {question}: `{ours.method}` {_mean_std(ours)} (n = {ours.n}) {verdict} `{base.method}` "
            f"{_mean_std(base)} (n = {base.n}): {diff:+.2f}; higher in {wins} of {paired} paired seeds"
            + (" (one seed: not yet a result)" if min(ours.n, base.n) < 2 else "")
        )
    return lines


def mim_markdown(board: Leaderboard) -> list[str]:
    """Markdown sections (empty when the board has no MIM rows), one per teacher → student pair; teacher-less
    arms (the scratch student `mae_ft`) join every pair of their student, or form their own section."""
    mim = [row for row in board.rows if is_mim(row)]
    pairs: dict[tuple[str, str], list[Row]] = {}
    for row in mim:
        if row.has_teacher:
            pairs.setdefault((row.teacher, row.student), []).append(row)
    for row in mim:
        if not row.has_teacher:
            homes = [rows for (_, student), rows in pairs.items() if student == row.student]
            for rows in homes or [pairs.setdefault((row.teacher, row.student), [])]:
                rows.append(row)
    lines: list[str] = []
    for (teacher, student), rows in pairs.items():
        rows = sorted(rows, key=lambda r: (r.method.split("@", 1)[0], "@" in r.method, r.method))
        lines += [f"## Masked image modelling: {teacher} → {student} (all arms)", ""]
        lines += [
            "Every MIM arm of this pair, whatever cell its protocol hash puts it in (extra teachers and "
            "epoch changes alter the hash). Top-1: last-epoch test accuracy (%), mean ± sample std.",
            "",
            "| arm | n | top-1 | per seed | protocol hash |",
            "|---|---:|---:|---|---|",
        ]
        for row in rows:
            seeds = ", ".join(f"{t:.2f}" for t in row.top1)
            lines.append(f"| {row.method} | {row.n} | {_mean_std(row)} | {seeds} | {row.protocol_hash} |")
        lines.append("")
        answers = comparison_lines(rows)
        if answers:
            lines += [*answers, ""]
        labels = [r.method for r in rows]
        missing = [q for full, abl, q in COMPARISONS if full not in labels or _find(labels, abl) is None]
        if missing:
            lines += ["Not yet measured: " + "; ".join(missing) + ".", ""]
    return lines
