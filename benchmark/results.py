"""Run records: one JSON file per (protocol, method, pair, seed), written atomically by rank 0.

Layout: `<results>/<protocol>/<method>[@<variant>]/<teacher>__<student>/seed<k>.json` (teacher is
`none` for methods without one). A finished record is never overwritten unless asked (`force`);
a replaced record and its run folder are kept beside it as `seed<k>.json.prev-<run_id>` and
`seed<k>.prev-<run_id>/`.
The leaderboard reads only these files; `validate_record` says what is wrong with one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ResultsError

SCHEMA_VERSION = 1
STATUSES = ("finished", "failed", "interrupted", "running")

REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "run_id": str,
    "status": str,
    "method": str,
    "variant": str,
    "hparams": dict,
    "protocol": str,
    "protocol_version": int,
    "protocol_hash": str,
    "teacher": (dict, type(None)),
    "student": dict,
    "seed": int,
    "metrics": dict,
    "best_epoch_metrics": dict,
    "epochs": int,
    "world_size": int,
    "precision": str,
    "train_time_s": (int, float, type(None)),
    "throughput_img_s": (int, float, type(None)),
    "overhead_vs_student": (int, float, type(None)),
    "peak_mem_mb": (int, float, type(None)),
    "git_commit": (str, type(None)),
    "versions": dict,
    "hardware": dict,
    "wandb_run": (dict, type(None)),
    "started_at": str,
    "finished_at": (str, type(None)),
}

_SAFE = re.compile(r"[^A-Za-z0-9_.=,+-]")


class RecordExistsError(ResultsError):
    pass


class RunInProgressError(ResultsError):
    pass


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def safe_label(text: str) -> str:
    return _SAFE.sub("-", text)


def method_label(method: str, variant: str = "") -> str:
    return f"{method}@{safe_label(variant)}" if variant else method


def record_path(results: str | Path, protocol: str, method: str, variant: str, pair: str, seed: int) -> Path:
    return Path(results) / protocol / method_label(method, variant) / pair / f"seed{seed}.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def process_alive(record: dict[str, Any]) -> bool:
    """Whether the process that wrote a `running` record still runs (checked on the same host only)."""
    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int) or host != platform.node() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def settle_stale(path: Path) -> dict[str, Any] | None:
    """The record at `path` (None if absent or unreadable), a stale `running` one rewritten as `interrupted`.

    A run writes a `running` record when it starts and updates it every epoch; a process killed
    outright (SIGKILL, out of memory, node failure) cannot record its end, so the next command that
    finds its record settles it. A `running` record whose process is alive is refused.
    """
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "running":
        return record
    if process_alive(record):
        raise RunInProgressError(
            f"{path} belongs to a run still in progress (pid {record['pid']} on {record['host']}); "
            "wait for it or stop it first"
        )
    record["status"] = "interrupted"
    record["error"] = {
        "type": "Killed",
        "message": "the process ended without recording an outcome (SIGKILL, out of memory, node failure); "
        "the record holds what was saved at the last epoch end — resume with RESUME=1",
    }
    write_json_atomic(path, record)
    return record


def check_writable(path: Path, force: bool) -> dict[str, Any] | None:
    """Fail early on an unwritable folder; settle a stale `running` record; refuse to replace a
    finished record unless `force`. Returns the existing record (None if there is none)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".probe"):
            pass
    except OSError as exc:
        raise ResultsError(
            f"cannot write run records to {path.parent}: {exc.strerror or exc}; choose another RESULTS folder"
        ) from None
    record = settle_stale(path)
    if path.exists() and not force:
        status = record.get("status") if isinstance(record, dict) else "unreadable"
        if status == "finished":
            raise RecordExistsError(f"{path} already holds a finished run; pass FORCE=1 (--force) to run it again")
    return record


def set_aside(path: Path) -> Path | None:
    """Move an existing record and its run folder to `<name>.prev-<run_id>`: a rerun never deletes a run."""
    if not path.exists():
        return None
    try:
        old_id = json.loads(path.read_text()).get("run_id", "unknown")
    except (OSError, ValueError):
        old_id = "unreadable"
    suffix = f"prev-{old_id}"
    run_dir = path.with_suffix("")
    if run_dir.is_dir():
        run_dir.replace(run_dir.with_name(f"{run_dir.name}.{suffix}"))
    moved = path.with_name(f"{path.name}.{suffix}")
    path.replace(moved)
    return moved


def save_record(path: Path, record: dict[str, Any]) -> None:
    """Atomically write `record`; a record of another run at `path` is set aside first, never lost."""
    if path.exists():
        try:
            same = json.loads(path.read_text()).get("run_id") == record["run_id"]
        except (OSError, ValueError):
            same = False
        if not same:
            set_aside(path)
    write_json_atomic(path, record)


def primary_metric(record: dict[str, Any]) -> str:
    """The record's reported number: COCOeval `AP` for detection runs (`task: detection`), else `top1`."""
    return "AP" if record.get("task") == "detection" else "top1"


def validate_record(record: Any) -> list[str]:
    """Problems with a record (empty list: valid)."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    problems = []
    for key, kind in REQUIRED_FIELDS.items():
        if key not in record:
            problems.append(f"missing field {key!r}")
        elif not isinstance(record[key], kind) or (kind is int and isinstance(record[key], bool)):
            problems.append(f"field {key!r} has type {type(record[key]).__name__}")
    if problems:
        return problems
    if record["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {record['schema_version']} (expected {SCHEMA_VERSION})")
    if record["status"] not in STATUSES:
        problems.append(f"status {record['status']!r} not one of {STATUSES}")
    if record["status"] == "finished":
        metric = primary_metric(record)
        value = record["metrics"].get(metric)
        if not isinstance(value, int | float) or not 0 <= value <= 100:
            problems.append(f"finished record without a {'top-1' if metric == 'top1' else metric} in [0, 100]")
    for key in ("arch", "params"):
        if key not in record["student"]:
            problems.append(f"student.{key} missing")
    return problems


def load_record(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return None, [f"unreadable: {exc}"]
    return record, validate_record(record)


# -- provenance -----------------------------------------------------------------------------
def git_commit(repo: Path | None = None) -> str | None:
    """HEAD of the source checkout, with `+dirty` when tracked files changed; None outside git."""
    cwd = repo or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import lightning
    import timm
    import torch
    import torchvision

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
    }
    try:
        from importlib.metadata import version

        out["distillbench"] = version("distillbench")
    except Exception:
        out["distillbench"] = "unknown"
    return out


def hardware(accelerator: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "accelerator": accelerator,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info
