"""Exact resume: atomic Lightning checkpoints, per-epoch RNG seeding and resumable training loaders.

A run killed at any point resumes from its last checkpoint and ends with the same weights and
metrics, bit for bit on CPU, as a run never interrupted. What makes that hold:

- model, optimizer, scheduler, loop counters and callback state: Lightning's own checkpoint;
- the data order and augmentation: functions of (seed, epoch, index) (`datasets.rng`), and the
  training loader (`datasets.resumable.ResumableLoader`) skips the batches of the current epoch
  already trained on;
- every global RNG (python, numpy, torch, CUDA): `EpochRNG` re-seeds them at each epoch start from
  (seed, epoch, rank) and restores the exact states saved in a mid-epoch checkpoint;
- nothing half-written: `AtomicCheckpointIO` writes to a temporary file, fsyncs and renames.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import CheckpointProblem


class CheckpointError(CheckpointProblem):
    """A checkpoint that cannot be read, or that belongs to another configuration."""


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, fsync, rename: a reader sees the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide checkpoints from the rest of a group
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written atomically (temp + fsync + rename) and read with `weights_only=True`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        torch_save_atomic(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(Path(path))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, or a `CheckpointError` that says what is wrong and what to do."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a loadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); it is "
            "truncated or corrupt — delete it to restart the run from scratch (or rerun with FORCE=1)"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state or "loops" not in state:
        raise CheckpointError(f"{path}: not a Lightning training checkpoint (no model state or loop state)")
    return state


class LastCheckpoint(ModelCheckpoint):
    """One file, `<dirpath>/last.ckpt`, rewritten at every epoch end and every `every_n_steps` steps.

    (Two stock `ModelCheckpoint`s — one per epoch, one per n steps — would each keep their own
    `last.ckpt`/`last-v1.ckpt`, and a resume could pick the older one.)
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int | None = None) -> None:
        super().__init__(dirpath=str(dirpath), save_last=True, save_top_k=0, enable_version_counter=False)
        self.every_n_steps = every_n_steps or 0

    def _save(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after validation and the epoch's history row (callbacks that checkpoint run last)
        self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # SIGTERM (preemption, `scancel`, `kill`) stops Lightning between two steps: keep every step done.
        # Not Ctrl-C: it can land inside an optimizer step.
        if isinstance(exception, SIGTERMException):
            self._save(trainer)


# -- RNG ---------------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    states = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_as_python_state(states["python"]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _numpy_state() -> tuple:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # as a tensor: checkpoints are read with weights_only=True, which refuses numpy arrays
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))


def _as_python_state(state: Any) -> tuple:
    version, internal, gauss = state  # a checkpoint round trip turns the inner tuple into a list
    return (version, tuple(internal), gauss)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 32-bit seed for (run seed, epoch, rank): distinct per epoch and rank, the same on every resume."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729 + 0x5EED) % (2**32)


class EpochRNG(Callback):
    """Exact resume of what Lightning's checkpoint leaves out: the global RNGs and the data position.

    At each training epoch start, python/numpy/torch RNGs are seeded from (seed, epoch, rank), so
    an epoch draws the same stream whatever consumed random numbers before it (loader start-up,
    evaluation, a resume). A checkpoint saved mid-epoch carries the RNG states of that moment and
    the number of batches already trained on; a run resumed into that epoch restores the states and
    tells the training loader to skip those batches. (Lightning restores resumable loaders itself
    only when the loader is built after the checkpoint is read; `configure_optimizers` asking for
    `estimated_stepping_batches` builds it earlier.)
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._trainer: L.Trainer | None = None
        self._resume: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning skips `on_train_epoch_start` when it resumes mid-epoch: continue from the saved point here
        saved, self._resume = self._resume, None
        if saved is not None and saved["batches"] > 0 and saved["epoch"] == trainer.current_epoch:
            set_rng_states(saved["rng"])
            loader = trainer.train_dataloader
            if callable(getattr(loader, "load_state_dict", None)):
                loader.load_state_dict({"epoch": saved["sampler_epoch"], "batches": saved["batches"]})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # also seeds every CUDA device

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is None:
            return {"seed": self.seed, "epoch": 0, "batches": 0, "sampler_epoch": 0, "rng": rng_states()}
        batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if batches >= trainer.num_training_batches:  # saved at the epoch's end: the next epoch starts afresh
            batches = 0
        sampler = getattr(getattr(trainer.train_dataloader, "batch_sampler", None), "sampler", None)
        return {
            "seed": self.seed,
            "epoch": trainer.current_epoch,
            "batches": batches,
            "sampler_epoch": int(getattr(sampler, "epoch", trainer.current_epoch)),
            "rng": rng_states(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)


# -- resume ------------------------------------------------------------------------------------
RESUME_MUST_MATCH = ("method", "protocol_hash", "hparams", "seed", "precision")


def resume_checkpoint(run: Any) -> Path:
    """Where a run keeps the checkpoint it resumes from: `<run folder>/checkpoints/last.ckpt`."""
    return Path(run.run_dir) / "checkpoints" / "last.ckpt"


def find_resume_point(run: Any, existing: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume `run` from and a summary of it, or None when there is none.

    `existing` is the run's current record: a checkpoint made under another configuration (method,
    protocol hash, hyper-parameters, seed, precision) is refused, as is an unreadable one.
    """
    ckpt = resume_checkpoint(run)
    if not ckpt.is_file():
        return None
    current = {
        "method": run.request.method,
        "protocol_hash": run.protocol.hash(run.pair, getattr(run, "extra_teachers", None)),
        "hparams": json.loads(json.dumps(run.hparams)),
        "seed": run.request.seed,
        "precision": run.request.precision,
    }
    for key in RESUME_MUST_MATCH:
        if existing.get(key) != current[key]:
            raise CheckpointError(
                f"cannot resume {run.path}: its checkpoint was made with {key} = {existing.get(key)!r}, this run has "
                f"{current[key]!r}; drop RESUME=1 to start over (the old run is kept aside)"
            )
    state = load_checkpoint(ckpt)
    shapes = {k: tuple(v.shape) for k, v in state["state_dict"].items()}
    info = {"path": str(ckpt), "epoch": state.get("epoch"), "global_step": state.get("global_step")}
    return ckpt, {**info, "shapes": shapes}


def check_checkpoint_fits(ckpt: Path, shapes: dict[str, tuple[int, ...]], module: torch.nn.Module) -> None:
    """Refuse a checkpoint whose weights do not fit `module` (another architecture or adapter)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(shapes)) if expected[k] != shapes[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{ckpt} does not fit this run's model: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} with other shapes {wrong[:3]}; "
            "drop RESUME=1 to start over"
        )


class RecordProgress(Callback):
    """Rank 0 rewrites the `running` record at every epoch end: a killed run keeps its history so far."""

    def __init__(self, path: Path, record: dict[str, Any], elapsed: Any) -> None:
        self.path, self.record, self.elapsed = path, record, elapsed

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from .callbacks import EpochHistory
        from .results import save_record

        history = next((cb for cb in trainer.callbacks if isinstance(cb, EpochHistory)), None)
        if history is not None:
            self.record["history"] = list(history.history)
        self.record["train_time_s"] = round(float(self.elapsed()), 2)
        self.record["last_checkpoint"] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        save_record(self.path, self.record)
