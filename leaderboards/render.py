"""Render a `Leaderboard` as Markdown, LaTeX (booktabs), CSV, a static sortable HTML page and a PNG plot.

Outputs are deterministic functions of the records (no timestamps), so regenerating the committed
tables from the committed records reproduces them byte for byte.
"""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from .collect import Excluded, Leaderboard, Row
from .mim import mim_markdown

CSV_COLUMNS = (
    "protocol",
    "protocol_version",
    "protocol_hash",
    "teacher",
    "student",
    "method",
    "rank",
    "n",
    "seeds",
    "top1_mean",
    "top1_std",
    "top1_min",
    "top1_max",
    "top5_mean",
    "best_epoch_top1_mean",
    "reported_top1",
    "delta_vs_reported",
    "reported_source",
    "reported_verified",
    "student_params",
    "student_flops",
    "adapter_params",
    "adapter_flops",
    "throughput_img_s",
    "overhead_vs_student",
    "peak_mem_mb",
    "train_time_s",
    "teacher_top1",
    "teacher_sha256",
    "git_commits",
)


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def csv_values(row: Row) -> dict[str, str]:
    return {
        "protocol": row.protocol,
        "protocol_version": str(row.protocol_version),
        "protocol_hash": row.protocol_hash,
        "teacher": row.teacher,
        "student": row.student,
        "method": row.method,
        "rank": str(row.rank),
        "n": str(row.n),
        "seeds": " ".join(map(str, row.seeds)),
        "top1_mean": _num(row.top1_mean, 4),
        "top1_std": _num(row.top1_std, 4),
        "top1_min": _num(row.top1_min, 4),
        "top1_max": _num(row.top1_max, 4),
        "top5_mean": _num(_mean(row.top5), 4),
        "best_epoch_top1_mean": _num(_mean(row.best_top1), 4),
        "reported_top1": _num(row.reported_top1),
        "delta_vs_reported": _num(row.delta_vs_reported, 4),
        "reported_source": row.reported_source,
        "reported_verified": "" if row.reported_verified is None else str(bool(row.reported_verified)).lower(),
        "student_params": "" if row.student_params is None else str(row.student_params),
        "student_flops": "" if row.student_flops is None else str(row.student_flops),
        "adapter_params": "" if row.adapter_params is None else str(row.adapter_params),
        "adapter_flops": "" if row.adapter_flops is None else str(row.adapter_flops),
        "throughput_img_s": _num(row.throughput_img_s, 1),
        "overhead_vs_student": _num(row.overhead_vs_student, 3),
        "peak_mem_mb": _num(row.peak_mem_mb, 1),
        "train_time_s": _num(row.train_time_s, 1),
        "teacher_top1": " ".join(_num(t) for t in row.teacher_top1),
        "teacher_sha256": " ".join(row.teacher_sha256),
        "git_commits": " ".join(row.git_commits),
    }


#: a detection board's extra CSV columns (its `top1_*` columns then hold COCOeval AP, percent)
DETECTION_CSV_COLUMNS = ("metric", "AP50_mean", "AP75_mean", "APs_mean", "APm_mean", "APl_mean")


def detection_csv_values(row: Row) -> dict[str, str]:
    values = {"metric": row.metric}
    values.update({f"{name}_mean": _num(_mean(row.extra.get(name, [])), 4) for name in DETECTION_METRICS})
    return values


def to_csv(board: Leaderboard) -> str:
    detection = any(r.is_detection for r in board.rows)
    out = io.StringIO()
    columns = CSV_COLUMNS + (DETECTION_CSV_COLUMNS if detection else ())
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in board.rows:
        writer.writerow({**csv_values(row), **(detection_csv_values(row) if detection else {})})
    return out.getvalue()


# -- human-readable cells ---------------------------------------------------------------------
def _si(value: int | None) -> str:
    if value is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def top1_text(row: Row) -> str:
    std = row.top1_std
    return f"{row.top1_mean:.2f} ± {std:.2f}" if std is not None else f"{row.top1_mean:.2f}"


def delta_text(row: Row) -> str:
    if row.reported_top1 is None:
        return "—"
    return f"{row.delta_vs_reported:+.2f} (vs {row.reported_top1:.2f})"


def provenance_text(row: Row) -> str:
    parts = [
        f"seeds {','.join(map(str, row.seeds))}",
        f"v{row.protocol_version} {row.protocol_hash}",
        f"git {','.join(row.git_commits) or '?'}",
    ]
    if row.teacher_sha256:
        top1 = ",".join(f"{t:.2f}" for t in row.teacher_top1) or "?"
        parts.append(f"teacher {','.join(row.teacher_sha256)} ({top1})")
    return " · ".join(parts)


#: the columns every cell starts with, and the cost/provenance columns it ends with
LEAD_COLUMNS = (
    ("rank", "#", lambda r: str(r.rank)),
    ("method", "method", lambda r: r.method),
    ("n", "n", lambda r: str(r.n)),
)
COST_COLUMNS = (
    ("params", "params", lambda r: _si(r.student_params)),
    ("flops", "FLOPs", lambda r: _si(r.student_flops)),
    ("adapter", "adapter params", lambda r: _si(r.adapter_params)),
    ("adapter_flops", "adapter FLOPs", lambda r: _si(r.adapter_flops)),
    ("imgs", "img/s", lambda r: _num(r.throughput_img_s, 0) or "—"),
    ("overhead", "overhead ×", lambda r: _num(r.overhead_vs_student) or "—"),
    ("mem", "peak MB", lambda r: _num(r.peak_mem_mb, 0) or "—"),
    ("prov", "provenance", provenance_text),
)

DISPLAY = (
    *LEAD_COLUMNS,
    ("top1", "top-1 (%)", top1_text),
    ("range", "min–max", lambda r: f"{r.top1_min:.2f}–{r.top1_max:.2f}"),
    ("best", "best-epoch top-1", lambda r: _num(_mean(r.best_top1)) or "—"),
    ("delta", "Δ vs reported", delta_text),
    *COST_COLUMNS,
)


DETECTION_METRICS = ("AP50", "AP75", "APs", "APm", "APl")

#: a detection cell's columns: COCOeval AP (mean ± std, in `top1`) then AP50 … APl means (percent); no
#: adapter-FLOPs column
DETECTION_DISPLAY = (
    *LEAD_COLUMNS,
    ("top1", "AP", top1_text),
    *((name, name, lambda r, n=name: _num(_mean(r.extra.get(n, []))) or "—") for name in DETECTION_METRICS),
    ("best", "best-epoch AP", lambda r: _num(_mean(r.best_top1)) or "—"),
    *(column for column in COST_COLUMNS if column[0] != "adapter_flops"),
)


def display_for(rows: list[Row]) -> tuple:
    return DETECTION_DISPLAY if rows and rows[0].is_detection else DISPLAY


def cell_title(rows: list[Row]) -> str:
    r = rows[0]
    teacher = f"{r.teacher} → {r.student}" if r.teacher != "—" else f"{r.student} (no teacher)"
    return f"{teacher} · protocol {r.protocol} v{r.protocol_version} · hash {r.cell}"


def teacher_text(rows: list[Row]) -> str:
    distilled = [r for r in rows if r.teacher_sha256]
    if not distilled:
        return ""
    top1 = sorted({t for r in distilled for t in r.teacher_top1})
    sha = sorted({s for r in distilled for s in r.teacher_sha256})
    what = "AP" if distilled[0].is_detection else "top-1"
    return f"Teacher {what} {', '.join(f'{t:.2f}' for t in top1)} % (checkpoint sha256 {', '.join(sha)})"


def _best(rows: list[Row]) -> float:
    return max(r.top1_mean for r in rows)


NOTES = (
    "Top-1: last-epoch test accuracy (%), mean ± sample std over seeds (n). Best-epoch top-1 is shown "
    "for comparison only. Δ = ours − paper-reported. Overhead = the method's training step time / the "
    "same student's plain CE step on the same hardware. Params/FLOPs: student (fvcore, one image)."
)


DETECTION_NOTES = (
    "Detection cells: AP is COCOeval's box AP@[.5:.95] (%) on the evaluation split at the last epoch, mean ± "
    "sample std over seeds (n); AP50/AP75/APs/APm/APl are seed means. Best-epoch AP is for comparison only."
)


def notes_for(board: Leaderboard) -> str:
    return NOTES + (" " + DETECTION_NOTES if any(r.is_detection for r in board.rows) else "")


def to_markdown(board: Leaderboard, command: str = "") -> str:
    lines = [f"# distillbench leaderboard — `{board.protocol}`", ""]
    if command:
        lines += [f"Generated from the run records by `{command}`.", ""]
    lines += [notes_for(board), ""]
    for _, rows in board.cells():
        lines += [f"## {cell_title(rows)}", ""]
        if teacher_text(rows):
            lines += [teacher_text(rows) + ".", ""]
        display = display_for(rows)
        lines.append("| " + " | ".join(head for _, head, _ in display) + " |")
        lines.append("|" + "|".join("---:" if key not in ("method", "prov") else "---" for key, _, _ in display) + "|")
        best = _best(rows)
        for row in rows:
            cells = [fn(row) for _, _, fn in display]
            if row.top1_mean == best:
                cells[3] = f"**{cells[3]}**"
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines += mim_markdown(board)
    lines += excluded_markdown(board.excluded)
    return "\n".join(lines).rstrip() + "\n"


def excluded_markdown(excluded: list[Excluded]) -> list[str]:
    lines = ["## Excluded records", ""]
    if not excluded:
        return [*lines, "None: every record found was valid and finished.", ""]
    lines += ["Not aggregated (the files are kept as they are):", ""]
    lines += [f"- `{e.path}`: {'; '.join(e.reasons)}" for e in excluded]
    return [*lines, ""]


# -- LaTeX --------------------------------------------------------------------------------------
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in text).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")


def to_latex(board: Leaderboard) -> str:
    """A booktabs table per protocol; one block per cell, the best mean in bold."""
    metric = "AP (\\%)" if any(r.is_detection for r in board.rows) else "Top-1 (\\%)"
    head = ["Teacher", "Student", "Method", "$n$", metric, "$\\Delta$ rep.", "FLOPs", "Overhead"]
    lines = [
        f"% distillbench leaderboard for protocol {tex_escape(board.protocol)}; generated from run records",
        "% requires \\usepackage{booktabs}",
        "\\begin{tabular}{lllrrrrr}",
        "\\toprule",
        " & ".join(head) + " \\\\",
    ]
    for _, rows in board.cells():
        lines.append("\\midrule")
        lines.append(
            f"\\multicolumn{{8}}{{l}}{{\\emph{{{tex_escape(board.protocol)} v{rows[0].protocol_version}, "
            f"hash {tex_escape(rows[0].cell)}}}}} \\\\"
        )
        best = _best(rows)
        for row in rows:
            std = row.top1_std
            top1 = f"{row.top1_mean:.2f}" + (f" $\\pm$ {std:.2f}" if std is not None else "")
            if row.top1_mean == best:
                top1 = f"\\textbf{{{top1}}}"
            delta = f"{row.delta_vs_reported:+.2f}" if row.reported_top1 is not None else "--"
            cells = [
                tex_escape(row.teacher if row.teacher != "—" else "--"),
                tex_escape(row.student),
                tex_escape(row.method),
                str(row.n),
                top1,
                delta,
                _si(row.student_flops).replace("—", "--"),
                _num(row.overhead_vs_student) or "--",
            ]
            lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if board.excluded:
        lines.append(f"% {len(board.excluded)} excluded record(s):")
        lines += [f"%   {e.path}: {'; '.join(e.reasons)}" for e in board.excluded]
    return "\n".join(lines) + "\n"


# -- HTML ---------------------------------------------------------------------------------------
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin-bottom:2em}
th,td{border-bottom:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
th{cursor:pointer;background:#f4f4f4;user-select:none}
th[data-dir=asc]::after{content:" ▲"} th[data-dir=desc]::after{content:" ▼"}
td.t,th.t{text-align:left} tr.best td{font-weight:bold}
.note{max-width:60em;color:#555}
"""

# Click a header to sort its table (again to reverse). `#sort=<column>:<asc|desc>` in the URL sorts every
# table on load. Cells sort by their data-v attribute: a number when it parses as one, else text.
_SCRIPT = """
function sortTable(table, key, dir) {
  const head = table.tHead.rows[0];
  const idx = Array.from(head.cells).findIndex(c => c.dataset.key === key);
  if (idx < 0) return;
  const body = table.tBodies[0];
  const val = r => { const v = r.cells[idx].dataset.v; const n = parseFloat(v);
                     return v !== "" && !isNaN(n) ? n : v; };
  const rows = Array.from(body.rows);
  rows.sort((a, b) => { const x = val(a), y = val(b);
    const c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
    return dir === "asc" ? c : -c; });
  rows.forEach(r => body.appendChild(r));
  Array.from(head.cells).forEach(c => c.removeAttribute("data-dir"));
  head.cells[idx].dataset.dir = dir;
}
document.querySelectorAll("table.lb").forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach(th => th.addEventListener("click", () =>
    sortTable(table, th.dataset.key, th.dataset.dir === "asc" ? "desc" : "asc")));
});
const m = /sort=([A-Za-z0-9_]+):(asc|desc)/.exec(location.hash);
if (m) document.querySelectorAll("table.lb").forEach(t => sortTable(t, m[1], m[2]));
"""

_SORT_VALUE = {
    "rank": lambda r: r.rank,
    "n": lambda r: r.n,
    "top1": lambda r: round(r.top1_mean, 4),
    "range": lambda r: round(r.top1_min, 4),
    "best": lambda r: _num(_mean(r.best_top1), 4),
    "delta": lambda r: _num(r.delta_vs_reported, 4),
    "params": lambda r: r.student_params,
    "flops": lambda r: r.student_flops,
    "adapter": lambda r: r.adapter_params,
    "adapter_flops": lambda r: r.adapter_flops,
    "imgs": lambda r: r.throughput_img_s,
    "overhead": lambda r: r.overhead_vs_student,
    "mem": lambda r: r.peak_mem_mb,
}


def to_html(board: Leaderboard, command: str = "") -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>distillbench leaderboard — {e(board.protocol)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>distillbench leaderboard — <code>{e(board.protocol)}</code></h1>",
        f'<p class="note">{e(notes_for(board))} Click a column header to sort.</p>',
    ]
    if command:
        out.append(f'<p class="note">Generated from the run records by <code>{e(command)}</code>.</p>')
    for _, rows in board.cells():
        out.append(f"<h2>{e(cell_title(rows))}</h2>")
        if teacher_text(rows):
            out.append(f'<p class="note">{e(teacher_text(rows))}.</p>')
        display = display_for(rows)
        out.append('<table class="lb"><thead><tr>')
        for key, head, _ in display:
            cls = ' class="t"' if key in ("method", "prov") else ""
            out.append(f'<th data-key="{key}"{cls}>{e(head)}</th>')
        out.append("</tr></thead><tbody>")
        best = _best(rows)
        for row in rows:
            attrs = f' data-method="{e(row.method)}"' + (' class="best"' if row.top1_mean == best else "")
            out.append(f"<tr{attrs}>")
            for key, _, fn in display:
                value = _SORT_VALUE.get(key, fn)(row)
                cls = ' class="t"' if key in ("method", "prov") else ""
                out.append(f'<td{cls} data-v="{e("" if value is None else str(value))}">{e(fn(row))}</td>')
            out.append("</tr>")
        out.append("</tbody></table>")
    out.append("<h2>Excluded records</h2>")
    if board.excluded:
        out.append('<ul id="excluded">')
        out += [f"<li><code>{e(x.path)}</code>: {e('; '.join(x.reasons))}</li>" for x in board.excluded]
        out.append("</ul>")
    else:
        out.append('<p id="excluded">None: every record found was valid and finished.</p>')
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(out) + "\n"


# -- plot ---------------------------------------------------------------------------------------
def plot(board: Leaderboard, path: Path) -> None:
    """Top-1 (mean ± std) against student FLOPs and against training cost (overhead ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    methods = sorted({r.method for r in board.rows})
    markers = "osD^v<>pP*hX"
    for i, method in enumerate(methods):
        rows = [r for r in board.rows if r.method == method]
        for ax, xkey in zip(axes, ("student_flops", "overhead_vs_student"), strict=True):
            pts = [(getattr(r, xkey), r.top1_mean, r.top1_std or 0.0) for r in rows if getattr(r, xkey) is not None]
            if pts:
                xs, ys, es = zip(*pts, strict=True)
                ax.errorbar(xs, ys, yerr=es, fmt=markers[i % len(markers)], capsize=3, label=method)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("student FLOPs (fvcore, one image)")
    axes[1].set_xlabel("training cost: step time / vanilla student's")
    metric = "AP" if any(r.is_detection for r in board.rows) else "top-1"
    axes[0].set_ylabel(f"{metric} (%), mean ± std over seeds")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="best", fontsize="small")
    fig.suptitle(f"distillbench — {board.protocol}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
