"""Build the Lightning Trainer every run uses (distillation and teacher training alike)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from .callbacks import EpochHistory, Throughput
from .checkpointing import AtomicCheckpointIO, EpochRNG, LastCheckpoint

WANDB_PROJECT = "distillbench"


def resolve_accelerator(accelerator: str) -> str:
    if accelerator != "auto":
        return accelerator
    return "gpu" if torch.cuda.is_available() else "cpu"


def uses_sync_batchnorm(accelerator: str, world_size: int) -> bool:
    """Multi-GPU runs normalise with the statistics of the whole global batch (SyncBatchNorm), so
    the device count does not change what BatchNorm sees. torch has no CPU SyncBatchNorm: CPU DDP
    runs normalise per device."""
    return world_size > 1 and resolve_accelerator(accelerator) in ("gpu", "cuda")


def wandb_mode() -> str:
    """`WANDB_MODE` when set; otherwise online with an API key, offline without (no key needed)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def make_loggers(
    run_dir: Path,
    *,
    run_id: str,
    group: str,
    name: str,
    config: dict[str, Any],
    tags: list[str],
    use_wandb: bool = True,
) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(str(run_dir), name="", version="csv")]
    if use_wandb:
        os.environ.setdefault("WANDB_SILENT", "true")
        mode = wandb_mode()
        wandb_logger = WandbLogger(
            project=WANDB_PROJECT,
            group=group,
            name=name,
            id=run_id,
            save_dir=str(run_dir),
            offline=mode == "offline",
            mode=mode if mode == "disabled" else None,
            config=config,
            tags=tags,
            resume="allow",
        )
        # Lightning always forwards `anonymous`, which wandb ≥ 0.19 deprecates with a warning per run
        wandb_logger._wandb_init.pop("anonymous", None)
        loggers.append(wandb_logger)
    return loggers


def quiet_third_party() -> None:
    """Silence advertising tips and deprecation chatter that say nothing about the run."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for pattern in (
        r".*does not have many workers.*",
        r".*`srun` command is available.*",
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*torch.jit.script.*is deprecated.*",
        r".*Experiment logs directory .* exists and is not empty.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def build_trainer(
    run_dir: Path,
    *,
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    epochs: int,
    loggers: list[Logger] | None = None,
    progress: bool = True,
    checkpoint: bool = True,
    deterministic: bool | None = None,
    seed: int | None = None,
    checkpoint_every_n_steps: int | None = None,
    callbacks: list[Any] | None = None,
    gradient_clip_val: float | None = None,
) -> tuple[L.Trainer, EpochHistory, Throughput]:
    """`checkpoint`: keep `<run_dir>/checkpoints/last.ckpt` (every epoch end, and every
    `checkpoint_every_n_steps` optimizer steps when given) for exact resume; `seed`: re-seed the
    global RNGs at every epoch start (`EpochRNG`) so a resumed run draws what an uninterrupted one would."""
    accelerator = resolve_accelerator(accelerator)
    history, throughput = EpochHistory(), Throughput()
    callbacks = [history, throughput, *(callbacks or [])]
    if seed is not None:
        callbacks.append(EpochRNG(seed))
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    if checkpoint:
        callbacks.append(LastCheckpoint(Path(run_dir) / "checkpoints", every_n_steps=checkpoint_every_n_steps))
    if deterministic is None:
        deterministic = accelerator == "cpu"  # bit-exact on CPU; cuDNN autotuning stays on for GPU runs
    quiet_third_party()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        precision=precision,
        max_epochs=epochs,
        logger=loggers if loggers is not None else [CSVLogger(str(run_dir), name="", version="csv")],
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the DataModule shards the global batch itself
        sync_batchnorm=uses_sync_batchnorm(accelerator, devices * num_nodes),
        deterministic=deterministic,
        default_root_dir=str(run_dir),
        log_every_n_steps=10,
        plugins=[AtomicCheckpointIO()],
        gradient_clip_val=gradient_clip_val,  # the gradient norm over all trained parameters (timm's clip_grad)
    )
    return trainer, history, throughput
