"""DDP throughput of one KD training step at the protocol's fixed global batch, 1 or N processes.

    python -m distillbench.benchmark.perf_ddp --protocol fmnist --devices 2 [--steps 8] [--accelerator cpu]

The module is the one a run builds (`costbench.timed_module`); the Trainer is the run's (`build_trainer`:
`ddp` for more than one device, gloo on CPU, NCCL on GPU; each of the N processes takes global batch / N
images). Rank 0 prints one JSON line: img/s and ms per optimizer step over the steps after `--warmup`,
from the end of the last warm-up batch to the end of the last batch. Lightning re-launches this command
for ranks ≥ 1, so it must run as a command (`make perf` does so), not inside another process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

from .costbench import timed_module
from .runner import RunRequest
from .trainer import build_trainer


class Window(L.Callback):
    def __init__(self, warmup: int, total: int):
        self.warmup, self.total, self.start, self.end = warmup, total, None, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.warmup - 1:
            self.start = time.perf_counter()
        elif batch_idx == self.total - 1:
            self.end = time.perf_counter()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="fmnist")
    parser.add_argument("--method", default="kd")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--teachers", default=None)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if args.devices < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--devices, --steps and --warmup must be ≥ 1")
    request = RunRequest(
        method=args.method,
        protocol=args.protocol,
        teachers=args.teachers,
        data_root=args.data_root,
        accelerator=args.accelerator,
        devices=args.devices,
        wandb=False,
        progress=False,
    )
    total = args.warmup + args.steps
    window = Window(args.warmup, total)
    with (
        timed_module(request, say=lambda m: print(m, file=sys.stderr)) as (module, datamodule, r, _),
        tempfile.TemporaryDirectory() as tmp,
        contextlib.redirect_stdout(sys.stderr),
    ):
        trainer, _, _ = build_trainer(
            Path(tmp),
            accelerator=args.accelerator,
            devices=args.devices,
            epochs=1,
            progress=False,
            checkpoint=False,
            callbacks=[window],
        )
        trainer.limit_train_batches, trainer.limit_val_batches = total, 0
        trainer.fit(module, datamodule)
        rank0 = trainer.is_global_zero
    if rank0:
        seconds = window.end - window.start
        out = {
            "devices": args.devices,
            "method": args.method,
            "global_batch": r.protocol.batch_size,
            "steps": args.steps,
            "step_ms": round(1000 * seconds / args.steps, 2),
            "img_s": round(r.protocol.batch_size * args.steps / seconds, 1),
        }
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
