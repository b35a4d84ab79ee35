"""Log each protocol's leaderboard to W&B as a `wandb.Table`, inside a versioned artifact.

One run per build (project `distillbench`, job type `leaderboard`, group `leaderboards`). The mode
follows the suite's rule (`WANDB_MODE`, else online with an API key, else offline); an offline run can
be uploaded later with `wandb sync <dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .collect import Leaderboard
from .render import CSV_COLUMNS, csv_values


def table_rows(board: Leaderboard) -> list[list[str]]:
    return [[csv_values(row)[c] for c in CSV_COLUMNS] for row in board.rows]


def push_tables(boards: dict[str, Leaderboard], wandb_dir: str | Path = ".") -> str:
    """Log one `leaderboard-<protocol>` artifact per protocol; returns a one-line summary."""
    import wandb

    from ..benchmark.trainer import WANDB_PROJECT, wandb_mode

    mode = wandb_mode()
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=WANDB_PROJECT,
        job_type="leaderboard",
        group="leaderboards",
        name="leaderboard",
        mode=mode,
        dir=str(wandb_dir),
        config={"protocols": sorted(boards)},
    )
    where = run.url if mode == "online" else str(Path(run.dir).parent)
    try:
        for name, board in boards.items():
            table = wandb.Table(columns=list(CSV_COLUMNS), data=table_rows(board))
            artifact = wandb.Artifact(f"leaderboard-{name}", type="leaderboard")
            artifact.add(table, name)
            run.log_artifact(artifact)
            run.log({f"leaderboard/{name}": table})
    finally:
        run.finish()
    return f"W&B ({mode}): {len(boards)} leaderboard table(s) logged → {where}"
