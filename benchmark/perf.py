"""`make perf`: distillation cost side by side, written to leaderboards/performance.md.

    python -m distillbench.benchmark.perf [--protocol fmnist] [--steps 3] [--rounds 3] [--out FILE.md]

One command, four tables (figures are medians over `rounds` alternating rounds, so a background load
hits every arm alike; warm-up steps are excluded):

1. Every registered method on `--protocol` (its default pair, the stored teacher, real data): the step split
   of `costbench.step_split` — data / teacher forward / student forward+backward / optimizer — img/s and
   the overhead ratio over the vanilla student's step timed in the same rounds. The method list comes from
   the registry; a method that is not a per-step method on this pair gets its reason instead of numbers.
2. The same on cifar100-shaped synthetic tensors (the cifar100 protocol's `--cifar-pair`, random-init
   networks, 3×32×32 batches of the protocol's 64): the CIFAR step without the dataset.
3. Framework overhead: the same vanilla and KD steps in a plain PyTorch loop against our Lightning module
   under the Trainer every run uses (`trainer.build_trainer`), same loader, same optimizer.
4. Live vs cached KD (`cache_overhead.measure`): data + step against the vanilla student.
DDP scaling (1 vs 2 CPU processes, gloo) is `perf_ddp.py` (`--ddp` here runs it as a fifth table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..methods import FrozenTeacher, get_method, list_methods
from ..methods.optim import build_optimizer
from .costbench import PARTS, _Clock, _timed_teacher, timed_module
from .protocol import load_protocol
from .runner import RunRequest, build_module, resolve
from .speed import autocast
from .zoo import create_model

TABLES = ("protocol", "synthetic", "framework", "cache", "ddp")

#: stages whose artifact is cached beside the teacher (ND's class means): the method is still per-step
CACHED_STAGES = {"class_means"}


def not_per_step(method: str, protocol) -> str | None:
    """Why `method` has no per-step figure on `protocol`'s default pair (None: it has one)."""
    spec = get_method(method)
    cls, stages = spec.plan(spec.defaults)
    names = {s.name for s in stages}
    if cls.train_data == "pool":
        return "trains on an unlabelled web pool (webproxy protocols)"
    if method in protocol.method_pairs:
        return f"masked-image-modelling method on its MAE pair ({protocol.method_pairs[method]}): staged pre-training"
    if "soft_labels" in names:
        return "replays the soft-label store (no teacher forward): its step is cached KD's, table 4"
    if "search" in names:
        return "a search stage picks the student, which then trains with KD's step"
    if names - CACHED_STAGES:
        return f"stages {sorted(names - CACHED_STAGES)} before training"
    return None


# -- timing ------------------------------------------------------------------------------------------
class Arm:
    """One method's module, loader and optimizer, timed `steps` steps at a time (`step_split`'s parts)."""

    def __init__(self, name: str, module, batches, device: torch.device, precision: str = "32-true"):
        self.name, self.module, self.device, self.precision = name, module, device, precision
        self.batches = batches  # a callable returning the next batch dict (on the CPU)
        self.clock = _Clock(device)
        self.teacher_time = [0.0]
        if module.teacher is not None:
            _timed_teacher(module.teacher, self.clock, self.teacher_time)
        self.optimizer = build_optimizer(module, module.optimizer_spec)
        module.train()
        module.log = lambda *args, **kwargs: None  # outside a Trainer loop Lightning refuses self.log
        self.rounds: list[dict[str, float]] = []
        self.images = 0

    def step(self) -> dict[str, float]:
        clock = self.clock
        t0 = clock()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.batches().items()}
        t1 = clock()
        self.teacher_time[0] = 0.0
        with autocast(self.precision, self.device):
            loss = sum(t.float() for t in self.module.losses(batch).values())
        loss.backward()
        t2 = clock()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = clock()
        self.images = int(batch["image"].shape[0])
        teacher = self.teacher_time[0]
        return {
            "data": t1 - t0,
            "teacher_forward": teacher,
            "student_forward_backward": t2 - t1 - teacher,
            "optimizer": t3 - t2,
        }

    def run(self, steps: int, warmup: int) -> None:
        for _ in range(warmup):
            self.step()
        parts = [self.step() for _ in range(steps)]
        self.rounds.append({k: statistics.fmean(p[k] for p in parts) for k in PARTS})

    def summary(self) -> dict[str, float]:
        med = {k: statistics.median(r[k] for r in self.rounds) for k in PARTS}
        step = statistics.median(sum(r.values()) for r in self.rounds)
        out = {f"{k}_ms": round(1000 * v, 2) for k, v in med.items()}
        out["step_ms"] = round(1000 * step, 2)
        out["img_s"] = round(self.images / step, 1)
        return out


def time_arms(arms: list[Arm], *, steps: int, warmup: int, rounds: int, say) -> dict[str, dict[str, float]]:
    """Alternate the arms round by round (warm-up before each arm's round); medians; overhead over `vanilla`."""
    for r in range(rounds):
        for arm in arms:
            arm.run(steps, warmup if r == 0 else 1)
        say(f"round {r + 1}/{rounds} done")
    out = {arm.name: arm.summary() for arm in arms}
    base = out.get("vanilla", {}).get("step_ms")
    for row in out.values():
        row["overhead"] = round(row["step_ms"] / base, 3) if base else None
    return out


def _looping(loader):
    it = iter(loader)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    return next_batch


def cpu_request(args, method: str) -> RunRequest:
    """A quiet CPU run request of `method` on the command's protocol, teachers and data."""
    return RunRequest(
        method=method,
        protocol=args.protocol,
        teachers=args.teachers,
        data_root=args.data_root,
        wandb=False,
        progress=False,
        accelerator="cpu",
    )


# -- 1. the protocol's methods ---------------------------------------------------------------------
def protocol_table(args, say) -> dict[str, Any]:
    protocol = load_protocol(args.protocol)
    skipped = {m: why for m in list_methods() if (why := not_per_step(m, protocol))}
    measured = [m for m in list_methods() if m not in skipped]
    measured.sort(key=lambda m: m != "vanilla")  # the denominator first
    arms, stack = [], contextlib.ExitStack()
    with stack:
        for method in measured:
            module, datamodule, r, _ = stack.enter_context(timed_module(cpu_request(args, method), say=say))
            arms.append(Arm(method, module, _looping(datamodule.train_dataloader()), torch.device("cpu")))
        pair = r.pair_label
        say(f"timing {len(arms)} methods on {protocol.name} {pair} …")
        rows = time_arms(arms, steps=args.steps, warmup=args.warmup, rounds=args.rounds, say=say)
    return {"protocol": protocol.name, "pair": pair, "batch": protocol.batch_size, "rows": rows, "skipped": skipped}


# -- 2. cifar100-shaped synthetic tensors ----------------------------------------------------------------
def synthetic_batches(protocol, device: torch.device, num_classes: int = 100, batch: int | None = None):
    """A callable returning random batches shaped as `protocol`'s (made on `device`, seeded)."""
    c, size, b = protocol.input.channels, protocol.input.size, batch or protocol.batch_size
    gen = torch.Generator(device=device).manual_seed(0)

    def batches():
        return {
            "image": torch.randn(b, c, size, size, generator=gen, device=device),
            "label": torch.randint(0, num_classes, (b,), generator=gen, device=device),
            "index": torch.arange(b, device=device),
        }

    return batches


def synthetic_module(method: str, protocol, pair_name: str | None, num_classes: int = 100):
    """`method`'s module on `protocol`'s pair with random-init student and teacher, as `build_module` makes it."""
    spec = get_method(method)
    pair = protocol.pair(pair_name)
    c = protocol.input.channels
    r = resolve(RunRequest(method=method, protocol=protocol, pair=pair.name, wandb=False, progress=False))
    torch.manual_seed(0)
    student = create_model(pair.student, num_classes=num_classes, in_chans=c)
    teacher = None
    if spec.needs_teacher:
        teacher = FrozenTeacher(create_model(pair.teacher, num_classes=num_classes, in_chans=c))
    return build_module(r, student, teacher, num_classes, {})


def synthetic_table(args, say) -> dict[str, Any]:
    protocol = load_protocol("cifar100")
    pair = protocol.pair(args.cifar_pair)
    b = protocol.batch_size
    batches = synthetic_batches(protocol, torch.device("cpu"))
    skipped, arms = {}, []
    for method in list_methods():
        why = not_per_step(method, protocol)
        spec = get_method(method)
        if why is None and spec.plan(spec.defaults)[1]:
            why = "its stage needs the real training set (class means): measured on the real protocol"
        if why:
            skipped[method] = why
            continue
        module = synthetic_module(method, protocol, pair.name)
        arms.append(Arm(method, module, batches, torch.device("cpu")))
    arms.sort(key=lambda a: a.name != "vanilla")
    say(f"timing {len(arms)} methods on cifar100-shaped tensors {pair.name} …")
    rows = time_arms(arms, steps=args.cifar_steps, warmup=1, rounds=args.cifar_rounds, say=say)
    return {
        "protocol": "cifar100 (synthetic tensors)",
        "pair": pair.name,
        "batch": b,
        "rows": rows,
        "skipped": skipped,
    }


# -- 3. Lightning vs a plain loop ---------------------------------------------------------------------------
class _Window:
    """Lightning callback: wall time from the end of batch `warmup - 1` to the end of the last batch."""

    def __init__(self, warmup: int, total: int):
        import lightning as L

        outer = self

        class Cb(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if batch_idx == warmup - 1:
                    outer.start = time.perf_counter()
                elif batch_idx == total - 1:
                    outer.end = time.perf_counter()

        self.callback, self.start, self.end = Cb(), None, None


def framework_table(args, say) -> dict[str, Any]:
    from .trainer import build_trainer

    total = args.warmup + args.fw_steps
    out = {}
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # what build_trainer sets for CPU runs: both sides alike
    for method in ("vanilla", "kd"):
        plain_t, lightning_t = [], []
        with timed_module(cpu_request(args, method), say=say) as (module, datamodule, _, _):
            state = {k: v.clone() for k, v in module.state_dict().items()}
            for _ in range(args.rounds):
                # plain PyTorch: the same module's losses, the protocol's optimizer, the same loader
                module.load_state_dict(state)
                module.train()
                module.log = lambda *a, **k: None
                opt = build_optimizer(module, module.optimizer_spec)
                loader = iter(datamodule.train_dataloader())
                for i in range(total):
                    if i == args.warmup:
                        start = time.perf_counter()
                    batch = next(loader)
                    loss = torch.stack([t.float() for t in module.losses(batch).values()]).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                plain_t.append((time.perf_counter() - start) / args.fw_steps)
                del module.log
                # Lightning: the Trainer of every run (CSV logger, epoch history, throughput), no checkpoints
                module.load_state_dict(state)
                window = _Window(args.warmup, total)
                with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
                    trainer, _, _ = build_trainer(
                        Path(tmp),
                        accelerator="cpu",
                        epochs=1,
                        progress=False,
                        checkpoint=False,
                        callbacks=[window.callback],
                    )
                    trainer.limit_train_batches, trainer.limit_val_batches = total, 0
                    trainer.fit(module, datamodule)
                lightning_t.append((window.end - window.start) / args.fw_steps)
                say(f"{method}: plain {1000 * plain_t[-1]:.1f} ms, Lightning {1000 * lightning_t[-1]:.1f} ms")
        p, lt = statistics.median(plain_t), statistics.median(lightning_t)
        out[method] = {"plain_ms": round(1000 * p, 2), "lightning_ms": round(1000 * lt, 2), "ratio": round(lt / p, 3)}
    torch.use_deterministic_algorithms(was_deterministic)
    return out


# -- 4. live vs cached KD ----------------------------------------------------------------------------------
def cache_table(args, say) -> dict[str, Any]:
    from .cache_overhead import measure

    say("live vs cached KD (cache_overhead) …")
    return measure(args.protocol, args.cache_limit, 8, args.cache_steps, args.rounds, args.teachers, args.data_root)


# -- 5. DDP ------------------------------------------------------------------------------------------------
def ddp_table(args, say) -> dict[str, Any]:
    out = {}
    for devices in (1, 2):
        say(f"DDP, {devices} CPU process(es) …")
        cmd = [
            sys.executable,
            "-m",
            "distillbench.benchmark.perf_ddp",
            "--protocol",
            args.protocol,
            "--devices",
            str(devices),
            "--steps",
            str(args.ddp_steps),
        ]
        if args.teachers:
            cmd += ["--teachers", args.teachers]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"perf_ddp --devices {devices} failed:\n{proc.stderr[-2000:]}")
        out[str(devices)] = json.loads(lines[-1])
    out["speedup"] = round(out["2"]["img_s"] / out["1"]["img_s"], 3)
    return out


# -- the report --------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(x, 2) for x in load],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _split_table(t: dict[str, Any]) -> list[str]:
    lines = [
        f"`{t['protocol']}`, pair `{t['pair']}`, batch {t['batch']}; ms per step (mean of the timed steps, "
        "median over rounds)",
        "",
        "| method | data | teacher fwd | student fwd+bwd | optimizer | step | img/s | overhead vs vanilla |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in t["rows"].items():
        cells = [f"{row[f'{p}_ms']:.1f}" for p in PARTS]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {row['step_ms']:.1f} | {row['img_s']:.0f} | {row['overhead']:.2f} |"
        )
    if t["skipped"]:
        lines += ["", "Not timed per step:", ""]
        lines += [f"- `{m}`: {why}" for m, why in sorted(t["skipped"].items())]
    return lines


SETTING_KEYS = {
    "protocol": ("protocol", "steps", "warmup", "rounds"),
    "synthetic": ("cifar_pair", "cifar_steps", "cifar_rounds"),
    "framework": ("fw_steps", "warmup", "rounds"),
    "cache": ("cache_steps", "cache_limit", "rounds"),
    "ddp": ("ddp_steps",),
}


def _settings(result: dict[str, Any]) -> str:
    """Each table's own settings; `settings` is one argument set, or one per table (merged with --render)."""
    settings = result["settings"]
    parts = []
    for table, keys in SETTING_KEYS.items():
        if table in result:
            own = settings.get(table, settings) if isinstance(settings.get(table), dict) else settings
            parts.append(f"{table}: " + ", ".join(f"{k} {own[k]}" for k in keys if k in own))
    merged = any(isinstance(v, dict) for v in settings.values())
    return "; ".join(parts) + (" (tables run as separate `--only` processes, merged with `--render`)" if merged else "")


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    out = [
        "# Performance: distillation cost side by side",
        "",
        f"Written by `make perf` ({m['date']}). Machine: {m['cores']} × {m['cpu_model']}, {m['torch_threads']} "
        f"torch thread(s), torch {m['torch']}, Python {m['python']}, GPU: {m['gpu'] or 'none'}. "
        f"Load average (1/5/15 min) at the start: {', '.join(map(str, m['load_start']))}; at the end: "
        f"{', '.join(map(str, m['load_avg_1_5_15']))}.",
        "",
        "On a shared machine under load (the load average above: more runnable processes than cores) absolute "
        "times are inflated and noisy; the arms of each table are timed in alternating rounds and compared by "
        "medians so that the load hits each alike. Ratios are the figures to read. "
        f"Settings: {_settings(result)}.",
        "",
    ]
    if "protocol" in result:
        out += ["## 1. Every registered method, real data", "", *_split_table(result["protocol"]), ""]
    if "synthetic" in result:
        out += [
            "## 2. cifar100-shaped synthetic tensors (random-init networks)",
            "",
            *_split_table(result["synthetic"]),
            "",
        ]
    if "framework" in result:
        out += [
            "## 3. Framework overhead: our Lightning module in the run's Trainer vs a plain PyTorch loop",
            "",
            "Same module (`losses`), same loader, same optimizer; the Lightning side adds the Trainer loop, "
            "`training_step` (finite check, per-term logging), the CSV logger and the run's callbacks.",
            "",
            "| method | plain loop (ms/step) | Lightning (ms/step) | ratio (target ≤ 1.05) |",
            "|---|---|---|---|",
        ]
        for name, row in result["framework"].items():
            out.append(f"| {name} | {row['plain_ms']:.1f} | {row['lightning_ms']:.1f} | {row['ratio']:.3f} |")
        out.append("")
    if "cache" in result:
        c = result["cache"]
        ms = c["ms"]
        out += [
            "## 4. Live vs cached KD (`cache_overhead`: data + step, over the vanilla student)",
            "",
            "| arm | ms / step | ratio |",
            "|---|---|---|",
            f"| vanilla, protocol augmentation | {ms['vanilla']:.1f} | 1 |",
            f"| KD, live teacher | {ms['kd_live']:.1f} | {c['overhead_kd_live']:.2f} |",
            f"| KD, cached teacher (store replay) | {ms['kd_cached']:.1f} | {c['overhead_kd_cached']:.2f} |",
            f"| vanilla on the store's crops | {ms['vanilla_store']:.1f} | — |",
            f"| **cached KD over vanilla on the same crops** | {ms['kd_cached']:.1f} | "
            f"**{c['overhead_kd_cached_vs_vanilla_store']:.2f}** |",
            "",
        ]
    if "ddp" in result:
        d = result["ddp"]
        out += [
            "## 5. DDP on CPU (gloo), fixed global batch",
            "",
            "| processes | img/s | ms / step |",
            "|---|---|---|",
            f"| 1 | {d['1']['img_s']:.0f} | {d['1']['step_ms']:.1f} |",
            f"| 2 | {d['2']['img_s']:.0f} | {d['2']['step_ms']:.1f} |",
            "",
            f"Speed-up 2 vs 1 process: {d['speedup']:.2f}.",
            "",
        ]
    out += [
        "GPU figures: not measured here (no GPU); `python -m distillbench.benchmark.gpu_check` is the prepared "
        "check (README, Performance).",
        "",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="fmnist")
    parser.add_argument("--cifar-pair", default="resnet56__resnet20", help="cifar100 pair for the synthetic table")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cifar-steps", type=int, default=2)
    parser.add_argument("--cifar-rounds", type=int, default=3)
    parser.add_argument("--fw-steps", type=int, default=8, help="timed steps per round, Lightning vs plain loop")
    parser.add_argument("--cache-steps", type=int, default=5)
    parser.add_argument("--cache-limit", type=int, default=1024)
    parser.add_argument("--ddp-steps", type=int, default=8)
    parser.add_argument(
        "--only", default="protocol,synthetic,framework,cache,ddp", help="comma-separated tables to run"
    )
    parser.add_argument("--teachers", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="leaderboards/performance.md")
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    parser.add_argument(
        "--render", nargs="+", default=None, metavar="JSON", help="only write --out from these --json files (merged)"
    )
    args = parser.parse_args(argv)
    if args.render:
        merged: dict[str, Any] = {}
        for path in args.render:
            part = json.loads(Path(path).read_text())
            machine_info = merged.get("machine")
            merged.update(part)
            if machine_info:  # the first file's start, the last one's end
                merged["machine"] = {**part["machine"], "load_start": machine_info["load_start"]}
            merged.setdefault("settings_by_table", {}).update({k: part["settings"] for k in part if k in TABLES})
        merged["settings"] = merged.pop("settings_by_table")
        Path(args.out).write_text(render(merged))
        return 0
    tables = [t.strip() for t in args.only.split(",") if t.strip()]
    known = {
        "protocol": protocol_table,
        "synthetic": synthetic_table,
        "framework": framework_table,
        "cache": cache_table,
        "ddp": ddp_table,
    }
    if unknown := [t for t in tables if t not in known]:
        parser.error(f"unknown table(s) {unknown}; choose from {sorted(known)}")
    if (
        min(args.steps, args.rounds, args.cifar_steps, args.cifar_rounds, args.fw_steps, args.ddp_steps) < 1
        or args.warmup < 1
    ):
        parser.error("steps, rounds and --warmup must be ≥ 1")

    def say(msg: str) -> None:
        print(f"perf: {msg}", file=sys.stderr, flush=True)

    start = machine()
    result: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "json")}}
    for name in tables:
        result[name] = known[name](args, say)
    result["machine"] = {**machine(), "cpu_model": _cpu_model(), "load_start": start["load_avg_1_5_15"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
