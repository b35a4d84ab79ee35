"""GPU check: KD and OFA training-step throughput on cifar100 shapes, fp32 / bf16 / compiled, synthetic data.

    python -m distillbench.benchmark.gpu_check [--pair resnet32x4__resnet8x4] [--steps 30] [--modes fp32,bf16,compile]

For each mode and each of vanilla (the denominator), `--methods` (default kd, ofa): the method's module as a
run builds it (random-init student and teacher of the cifar100 pair; channels-last conv teacher on CUDA),
random 3×32×32 batches made on the device (no loader), `--warmup` untimed steps, then `--steps` timed ones
(CUDA-synchronised), and prints one table: ms per step, img/s, the split teacher forward / the rest, and
the overhead over vanilla in the same mode. Modes: fp32 (32-true), bf16 (bf16-mixed autocast), compile (fp32,
torch.compile of student and teacher, `--backend`, compile time reported apart). A few minutes on one GPU.

Without a CUDA GPU it says so and runs on the CPU (`--device cpu` asks for that outright): a dry run of the
script, not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .perf import Arm, synthetic_batches, synthetic_module
from .protocol import load_protocol
from .speed import COMPILE_BACKENDS, compile_module, uses_channels_last

MODES = {"fp32": "32-true", "bf16": "bf16-mixed", "compile": "32-true"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="resnet32x4__resnet8x4", help="a cifar100 pair (teacher__student)")
    parser.add_argument("--methods", default="kd,ofa")
    parser.add_argument("--modes", default="fp32,bf16,compile")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: the protocol's, 64)")
    parser.add_argument("--backend", default="inductor", choices=COMPILE_BACKENDS)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: a comma-separated subset of {', '.join(MODES)}, got {args.modes!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "vanilla"]
    if not methods:
        parser.error("--methods: name at least one distillation method")
    if args.steps < 1 or args.warmup < 1 or (args.batch is not None and args.batch < 1):
        parser.error("--steps, --warmup and --batch must be ≥ 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    args.mode_list, args.method_list = modes, methods
    return args


def measure(args, say=print) -> list[dict]:
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.device == "auto":
        say("gpu_check: no CUDA GPU found; a CPU dry run (these are not GPU figures)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; bf16 is its own mode
        torch.backends.cudnn.allow_tf32 = False
    protocol = load_protocol("cifar100")
    batches = synthetic_batches(protocol, device, batch=args.batch)
    rows = []
    for mode in args.mode_list:
        base = None
        for method in ["vanilla", *args.method_list]:
            module = synthetic_module(method, protocol, args.pair).to(device)
            if module.teacher is not None and uses_channels_last(device):
                module.teacher.to_channels_last()
            compile_s = None
            if mode == "compile":
                compile_module(module, args.backend)
            arm = Arm(method, module, batches, device, MODES[mode])
            if mode == "compile":
                start = time.perf_counter()
                arm.step()  # the first call compiles
                compile_s = round(time.perf_counter() - start, 1)
            arm.run(args.steps, args.warmup)
            s = arm.summary()
            base = s["step_ms"] if method == "vanilla" else base
            row = {
                "mode": mode,
                "method": method,
                "step_ms": s["step_ms"],
                "img_s": s["img_s"],
                "teacher_ms": s["teacher_forward_ms"],
                "overhead": round(s["step_ms"] / base, 3),
                "compile_s": compile_s,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            }
            rows.append(row)
            say(json.dumps(row))
            del module, arm
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], pair: str, batch: int) -> str:
    lines = [
        f"cifar100 shapes, pair {pair}, batch {batch}, device {rows[0]['device']}",
        "| mode | method | ms / step | img/s | teacher fwd ms | overhead vs vanilla | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['method']} | {r['step_ms']:.2f} | {r['img_s']:.0f} | {r['teacher_ms']:.2f} | "
            f"{r['overhead']:.2f} | {r['compile_s'] if r['compile_s'] is not None else '—'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = measure(args, say=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(rows, args.pair, args.batch or load_protocol("cifar100").batch_size))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
