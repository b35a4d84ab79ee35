"""The masked-image-modelling table: every MIM arm of one teacher → student pair side by side.

MIM arms land in different leaderboard cells (an extra teacher such as Hybrid's T_c or G2SD's fine-tuned
teacher, or a longer scratch run, changes the protocol hash), so the per-cell tables never show DMAE next
to the MAE-only student or G2SD next to its single stages. This table joins them by (teacher, student)
and answers the specs' questions (dmae.md, g2sd.md, hybrid.md §7): does the full method beat each
ablation, by how much (difference of the seed means, with both sample stds).
"""

from __future__ import annotations

from .collect import Leaderboard, Row

#: methods whose rows form the table (their variants are the arms)
MIM_METHODS = ("dmae", "g2sd", "hybrid", "mae_ft")

#: (full method, ablation, question): each ablation label lists the spellings a run may carry
COMPARISONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("dmae", ("dmae@feat_weight=0", "dmae@feat_weight=0.0"), "DMAE vs the MAE-only student"),
    ("dmae", ("mae_ft@epochs=8", "mae_ft"), "DMAE vs the scratch student"),
    ("g2sd", ("g2sd@gd-only",), "G2SD (GD+SD) vs generic stage only"),
    ("g2sd", ("g2sd@sd-only",), "G2SD (GD+SD) vs specific stage only"),
    ("hybrid", ("hybrid@feature-only",), "Hybrid vs the feature term only (T_c)"),
    ("hybrid", ("hybrid@relation-only",), "Hybrid vs the relation term only (T_m)"),
)


def is_mim(row: Row) -> bool:
    return row.method.split("@", 1)[0] in MIM_METHODS


def _mean_std(row: Row) -> str:
    std = f"{row.top1_std:.2f}" if row.top1_std is not None else "–"
    return f"{row.top1_mean:.2f} ± {std}"


def comparison_lines(rows: list[Row]) -> list[str]:
    """One line per answerable question: full − ablation (seed means), both means ± std and n."""
    by_label = {r.method: r for r in rows}
    lines = []
    for full, ablations, question in COMPARISONS:
        base = next((by_label[a] for a in ablations if a in by_label), None)
        if full not in by_label or base is None:
            continue
        ours = by_label[full]
        diff = ours.top1_mean - base.top1_mean
        verdict = "beats" if diff > 0 else "does not beat"
        lines.append(
            f"- {question}: `{ours.method}` {_mean_std(ours)} (n = {ours.n}) {verdict} `{base.method}` "
            f"{_mean_std(base)} (n = {base.n}): {diff:+.2f}"
            + (" (one seed: not yet a result)" if min(ours.n, base.n) < 2 else "")
        )
    return lines


def mim_markdown(board: Leaderboard) -> list[str]:
    """Markdown sections (empty when the board has no MIM rows)."""
    pairs: dict[tuple[str, str], list[Row]] = {}
    for row in board.rows:
        if is_mim(row):
            pairs.setdefault((row.teacher, row.student), []).append(row)
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
        labels = {r.method for r in rows}
        missing = [q for full, abl, q in COMPARISONS if full not in labels or not labels & set(abl)]
        if missing:
            lines += ["Not yet measured: " + "; ".join(missing) + ".", ""]
    return lines
