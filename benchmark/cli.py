"""`python -m distillbench.benchmark` — run benchmarks, train teachers, list what exists.

    run       --method kd [--protocol digits] [--pair T__S] [--seeds 0,1,2] [--devices N] ...
    teachers  --protocol fmnist [--arch resnet20] [--force] [--teacher-epochs N]
    teachers import --protocol cifar100 --arch resnet32x4 --checkpoint FILE|TIMM_TAG [--format auto|mdistiller|...]
    softlabels --protocol fmnist [--pair T__S] [--crops N] [--limit M]
    cost      --method kd [--protocol digits] [--pair T__S] [--steps 20]   (step-time split)
    list      [methods|protocols|pairs|models|datasets] [--protocol P]

Errors the user can fix print one message and exit with a status per category: 2 configuration,
3 non-finite loss (after writing the `failed` record), 4 dataset missing or corrupt, 5 checkpoint
corrupt or mismatched, 6 results folder unusable; 1 when a run did not finish, 130 on Ctrl-C, 143 on
SIGTERM (after checkpointing the last step: continue with --resume).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from .errors import USER_ERRORS, BenchmarkError, exit_code

console = Console(stderr=True)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise BenchmarkError(f"SEEDS must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise BenchmarkError("SEEDS is empty")
    return seeds


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchmarkError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise BenchmarkError(f"--set {key}: cannot parse value {value!r}") from None
    return out


def _compile_backend(value: str | None) -> str | None:
    from .speed import compile_backend

    try:
        return compile_backend(value if value is not None else os.environ.get("COMPILE"))
    except ValueError as exc:
        raise BenchmarkError(str(exc)) from None


def _flag(value: str | None) -> bool:
    return str(value or "").lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distillbench.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a method on a protocol pair for one or more seeds")
    run.add_argument("--method", required=True)
    run.add_argument("--protocol", default="digits", help="a protocol name or a path to a protocol YAML")
    run.add_argument("--pair", default=None, help="<teacher>__<student> (default: the protocol's default pair)")
    run.add_argument("--seeds", default="0")
    run.add_argument("--devices", type=int, default=1, help="devices per node")
    run.add_argument("--num-nodes", type=int, default=1, help="nodes (torchrun --nnodes / SLURM --nodes)")
    run.add_argument("--accelerator", default="auto")
    run.add_argument("--precision", default="32-true")
    run.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (changes its hash)")
    run.add_argument(
        "--teacher-epochs", type=int, default=None, help="override the teacher recipe's epochs (smoke runs; own key)"
    )
    run.add_argument("--results", default="results")
    run.add_argument("--teachers", default=None, help="teacher store (default $DISTILLBENCH_TEACHERS or ./teachers)")
    run.add_argument("--data-root", default=None, help="dataset root (default $DATA_ROOT)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a hyper-parameter")
    run.add_argument("--variant", default=None, help="label for a non-default configuration (default: from --set)")
    run.add_argument("--force", action="store_true", help="replace a finished record")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last checkpoint (exact on CPU); starts afresh if there is none",
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="also checkpoint every STEPS optimizer steps (default: at every epoch end only)",
    )
    run.add_argument("--no-wandb", action="store_true")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--no-overhead", action="store_true", help="skip the overhead-ratio measurement")
    run.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="torch.compile the student's and teacher's forward: 1 (inductor) or a dynamo backend (default off)",
    )
    run.add_argument(
        "--gpu-augment",
        action="store_true",
        help="pad-crop + flip on the training device after the batch transfer (padcrop protocols; "
        "same draws, so same results; default $GPU_AUGMENT)",
    )
    run.add_argument(
        "--teacher-cache",
        default=None,
        help="1: train with teacher targets from the soft-label store (made if missing); or a store path",
    )
    run.add_argument("--augment", default=None, help="'store': the soft-label store's RandomResizedCrop, live")
    run.add_argument("--crops", type=int, default=None, help="crops per image of the soft-label store")

    soft = sub.add_parser("softlabels", help="generate (or resume) the FKD soft-label store of a protocol pair")
    soft.add_argument("--protocol", default="digits")
    soft.add_argument("--pair", default=None)
    soft.add_argument("--crops", type=int, default=None, help="crops per image (default: the protocol's)")
    soft.add_argument("--limit", type=int, default=None, help="only the first N training images (a partial store)")
    soft.add_argument("--out", default=None, help="store folder (default: beside the teacher, named by its key)")
    soft.add_argument("--teachers", default=None)
    soft.add_argument("--accelerator", default="auto")
    soft.add_argument("--data-root", default=None)
    soft.add_argument("--no-progress", action="store_true")
    soft.add_argument("--verify", type=int, default=32, help="round-trip check on N random images (0: skip)")

    teachers = sub.add_parser("teachers", help="train (default) or import and store the teachers of a protocol")
    teachers.add_argument("action", nargs="?", default="train", choices=["train", "import"])
    teachers.add_argument("--protocol", required=True)
    teachers.add_argument(
        "--checkpoint", default=None, help="import: a checkpoint file, or a timm tag with --format timm"
    )
    teachers.add_argument("--format", default="auto", help="import: auto | mdistiller | state_dict | timm | mae")
    teachers.add_argument("--teacher-epochs", type=int, default=None, help="train: override the recipe's epochs")
    teachers.add_argument("--arch", action="append", default=None, help="only these teacher architectures")
    teachers.add_argument("--teachers", default=None)
    teachers.add_argument("--accelerator", default="auto")
    teachers.add_argument("--devices", type=int, default=1, help="devices per node")
    teachers.add_argument("--num-nodes", type=int, default=1)
    teachers.add_argument("--data-root", default=None)
    teachers.add_argument("--force", action="store_true", help="retrain even if stored")
    teachers.add_argument("--no-progress", action="store_true")

    search = sub.add_parser("search", help="run a method's search stage alone (e.g. DisWOT's student search)")
    search.add_argument("--method", required=True)
    search.add_argument("--protocol", default="digits")
    search.add_argument("--pair", default=None)
    search.add_argument("--teacher", default=None, help="teacher architecture scored against (default: the pair's)")
    search.add_argument("--budget", default=None, help="params=200K,flops=5M (or a bare params number)")
    search.add_argument("--seeds", default="0")
    search.add_argument("--results", default="results")
    search.add_argument("--data-root", default=None)
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--top", type=int, default=10)

    from .rankstudy import add_parser as add_rankstudy

    add_rankstudy(sub)
    cost = sub.add_parser("cost", help="split a method's training step time: data / teacher / student / optimizer")
    cost.add_argument("--method", required=True)
    cost.add_argument("--protocol", default="digits")
    cost.add_argument("--pair", default=None)
    cost.add_argument("--seed", type=int, default=0)
    cost.add_argument("--accelerator", default="auto")
    cost.add_argument("--teachers", default=None)
    cost.add_argument("--data-root", default=None)
    cost.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cost.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup untimed ones)")
    cost.add_argument("--warmup", type=int, default=3)
    cost.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    cost.add_argument("--compile", default=None, metavar="BACKEND", help="as `run --compile` (default $COMPILE)")

    lister = sub.add_parser("list", help="list methods, protocols, pairs, models or datasets")
    lister.add_argument(
        "what", nargs="?", default="methods", choices=["methods", "protocols", "pairs", "models", "datasets"]
    )
    lister.add_argument("--protocol", default="digits")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import RunRequest, resolve, run

    seeds = _parse_seeds(args.seeds)
    base = RunRequest(
        method=args.method,
        protocol=args.protocol,
        pair=args.pair,
        seed=seeds[0],
        devices=args.devices,
        num_nodes=args.num_nodes,
        accelerator=args.accelerator,
        precision=args.precision,
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        results=args.results,
        teachers=args.teachers,
        data_root=args.data_root,
        hparams=_parse_sets(args.set),
        variant=args.variant,
        force=args.force or _flag(os.environ.get("FORCE")),
        resume=args.resume or _flag(os.environ.get("RESUME")),
        checkpoint_every_n_steps=args.checkpoint_every,
        wandb=not args.no_wandb,
        progress=not args.no_progress and sys.stderr.isatty(),
        measure_overhead=not args.no_overhead,
        teacher_cache=None if str(args.teacher_cache or "").lower() in ("", "0", "false", "no") else args.teacher_cache,
        compile=_compile_backend(args.compile),
        augment_on_device=args.gpu_augment or _flag(os.environ.get("GPU_AUGMENT")),
        augment=args.augment or None,
        crops=args.crops,
    )
    resolve(base)  # fail fast, before any seed runs
    records = []
    for seed in seeds:
        request = RunRequest(**{**vars(base), "seed": seed})
        if args.devices > 1 and len(seeds) > 1:
            _run_seed_subprocess(seed)  # each DDP group gets a fresh process (Lightning re-launches it)
            records.append(_read_record(request))
        else:
            records.append(run(request, say=lambda msg: console.print(f"[bold]distillbench[/]: {msg}")))
    if os.environ.get("LOCAL_RANK", "0") == "0":
        _print_summary(records)
    return 0 if all(r and r.get("status") == "finished" for r in records) else 1


def _run_seed_subprocess(seed: int) -> None:
    argv = list(sys.argv[1:])
    i = argv.index("--seeds") if "--seeds" in argv else None
    if i is not None:
        argv[i + 1] = str(seed)
    else:
        argv += ["--seeds", str(seed)]
    env = {k: v for k, v in os.environ.items() if k != "DISTILLBENCH_RUN_ID"}
    subprocess.run([sys.executable, "-m", "distillbench.benchmark", *argv], check=False, env=env)


def _read_record(request) -> dict | None:
    import json

    from .runner import resolve

    path = resolve(request).path
    return json.loads(path.read_text()) if path.exists() else None


def _print_summary(records: list[dict | None]) -> None:
    table = Table(title="distillbench runs")
    for col in (
        "method",
        "protocol",
        "pair",
        "seed",
        "status",
        "top-1",
        "top-5",
        "best top-1 (epoch)",
        "time (s)",
        "img/s",
        "overhead",
    ):
        table.add_column(col)
    for r in records:
        if not r:
            table.add_row("?", "", "", "", "missing")
            continue
        m, b = r.get("metrics", {}), r.get("best_epoch_metrics", {})
        best = f"{b.get('top1', float('nan')):.2f} ({b.get('epoch')})" if b else ""
        if r.get("task") == "detection":  # COCOeval AP / AP50 in the top-1 / top-5 columns, labelled
            m = {"top1": f"AP {_fmt(m.get('AP'))}", "top5": f"AP50 {_fmt(m.get('AP50'))}"}
            best = f"AP {b.get('AP', float('nan')):.2f} ({b.get('epoch')})" if b else ""
        table.add_row(
            r["method"] + (f"@{r['variant']}" if r.get("variant") else ""),
            r["protocol"],
            r["pair"],
            str(r["seed"]),
            r["status"],
            _fmt(m.get("top1")),
            _fmt(m.get("top5")),
            best,
            _fmt(r.get("train_time_s"), 1),
            _fmt(r.get("throughput_img_s"), 0),
            _fmt(r.get("overhead_vs_student"), 2),
        )
    Console(width=max(Console().width, 150)).print(table)


def _fmt(value, digits: int = 2) -> str:
    if isinstance(value, str):  # already formatted
        return value
    return "—" if value is None else f"{value:.{digits}f}"


def cmd_teachers(args: argparse.Namespace) -> int:
    from .protocol import load_protocol
    from .runner import make_datamodule
    from .teacher_kinds import PARENT_KIND, split_kind, teacher_epochs
    from .teachers import load_teacher, teacher_paths, train_teacher

    protocol = load_protocol(args.protocol)
    if args.action == "import":
        return _cmd_teachers_import(args, protocol)
    if args.teacher_epochs:
        protocol = protocol.with_teacher_epochs(args.teacher_epochs)
    fingerprint = make_datamodule(protocol, seed=0, data_root=args.data_root).fingerprint()
    # a derived teacher (`<arch>.ft`) after the one it starts from (`<arch>.mae`), so FORCE retrains in order
    found = {p.teacher for p in protocol.pairs} | set(method_teachers(protocol))
    archs = args.arch or sorted(found, key=lambda arch: (split_kind(arch)[1] in PARENT_KIND, arch))
    table = Table(title=f"teachers of {protocol.name}")
    metric = "AP" if protocol.task == "detection" else "top1"
    for col in ("arch", "action", "test AP" if metric == "AP" else "test top-1", "sha256", "checkpoint"):
        table.add_column(col)
    for arch in archs:
        ckpt, _ = teacher_paths(args.teachers, protocol, arch)
        action = "loaded"
        if args.force or not ckpt.exists():
            console.print(
                f"[bold]distillbench[/]: training teacher {arch} for {protocol.name} "
                f"({teacher_epochs(protocol, arch)} epochs)"
            )
            train_teacher(
                protocol,
                arch,
                root=args.teachers,
                accelerator=args.accelerator,
                devices=args.devices,
                num_nodes=args.num_nodes,
                progress=not args.no_progress and sys.stderr.isatty(),
                data_root=args.data_root,
            )
            action = "trained"
            if os.environ.get("LOCAL_RANK", "0") != "0":
                continue
        _, info = load_teacher(protocol, arch, args.teachers, data_fingerprint=fingerprint)
        table.add_row(arch, action, _fmt(info.get(metric)), info["sha256"][:12], str(ckpt))
    if os.environ.get("LOCAL_RANK", "0") == "0":
        Console().print(table)
    return 0


def method_teachers(protocol) -> list[str]:
    """The extra teachers (`MethodSpec.teacher_hparams`, e.g. Hybrid Distill's `tc`) that the protocol's
    method settings name, protocol-wide or per pair — trained by `make teachers` beside the pairs' own."""
    from ..methods import get_method, list_methods

    found: set[str] = set()
    layers = [protocol.methods, *(p.methods for p in protocol.pairs)]
    for name in list_methods():
        spec = get_method(name)
        for layer in layers:
            if spec.teacher_hparams and name in layer:
                found.update(spec.extra_teachers({**spec.defaults, **layer[name]}).values())
    return sorted(found)


def _cmd_teachers_import(args: argparse.Namespace, protocol) -> int:
    from .teacher_import import import_teacher

    if not args.checkpoint or not args.arch or len(args.arch) != 1:
        raise BenchmarkError("teachers import needs exactly one --arch and a --checkpoint (a file, or a timm tag)")
    info = import_teacher(
        protocol,
        args.arch[0],
        args.checkpoint,
        fmt=args.format,
        root=args.teachers,
        data_root=args.data_root,
        accelerator=args.accelerator,
        force=args.force,
    )
    console.print(
        f"[bold]distillbench[/]: imported {info['arch']} for {protocol.name}: measured test top-1 {_fmt(info['top1'])} "
        f"(top-5 {_fmt(info['top5'])}, {info['test_images']} images), sha256 {info['sha256'][:12]}…"
    )
    return 0


def cmd_softlabels(args: argparse.Namespace) -> int:
    import json
    import time

    from .protocol import load_protocol
    from .runner import make_datamodule
    from .soft_labels import ensure_store
    from .teachers import ensure_teacher, teacher_paths
    from .trainer import resolve_accelerator

    protocol = load_protocol(args.protocol).with_store_augment(args.crops)
    pair = protocol.pair(args.pair)
    datamodule = make_datamodule(protocol, seed=0, data_root=args.data_root)
    datamodule.setup()
    progress = not args.no_progress and sys.stderr.isatty()
    say = lambda msg: console.print(f"[bold]distillbench[/]: {msg}")  # noqa: E731
    model, info = ensure_teacher(
        protocol,
        pair.teacher,
        data_fingerprint=datamodule.fingerprint(),
        root=args.teachers,
        accelerator=args.accelerator,
        progress=progress,
        data_root=args.data_root,
        say=say,
    )
    start = time.perf_counter()
    store = ensure_store(
        protocol,
        model,
        info,
        pair.teacher,
        datamodule.train_set,
        teacher_paths(args.teachers, protocol, pair.teacher)[0].parent,
        path=args.out,
        device="cuda" if resolve_accelerator(args.accelerator) in ("gpu", "cuda") else "cpu",
        limit=args.limit,
        progress=progress,
        say=say,
    )
    gen = store.manifest.get("generation") or {}
    if args.verify:
        from ..datasets.soft_labels import verify_store
        from .soft_labels import teacher_meta

        train = datamodule.train_set
        meta = teacher_meta(protocol, pair.teacher, info)
        check = verify_store(store, model, train.images, train.labels, meta, args.verify)
        print(f"round-trip check (stored vs live teacher on the replayed crops): {json.dumps(check)}")
    print(
        f"store {store.path}: {store.num_images} images × {store.num_crops} crops, top-{store.k}, "
        f"logits {'yes' if store.has_logits else 'no'}; generation {gen.get('time_s')} s "
        f"({gen.get('images_generated')} images this call; {time.perf_counter() - start:.1f} s wall)"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .search import run_search_command

    for seed in _parse_seeds(args.seeds):
        run_search_command(
            method=args.method,
            protocol=args.protocol,
            pair=args.pair,
            teacher=args.teacher,
            budget=args.budget,
            seed=seed,
            results=args.results,
            hparams=_parse_sets(args.set),
            data_root=args.data_root,
            top=args.top,
        )
    return 0


def cmd_rankstudy(args: argparse.Namespace) -> int:
    from .rankstudy import run_rankstudy

    run_rankstudy(args)
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from .costbench import PARTS, measure
    from .runner import RunRequest

    if args.steps < 1 or args.warmup < 0:
        raise BenchmarkError("--steps must be ≥ 1 and --warmup ≥ 0")
    request = RunRequest(
        method=args.method,
        protocol=args.protocol,
        pair=args.pair,
        seed=args.seed,
        accelerator=args.accelerator,
        teachers=args.teachers,
        data_root=args.data_root,
        hparams=_parse_sets(args.set),
        wandb=False,
        progress=False,
        precision=args.precision,
        compile=_compile_backend(args.compile),
    )
    result = measure(
        request, steps=args.steps, warmup=args.warmup, say=lambda msg: console.print(f"[bold]distillbench[/]: {msg}")
    )
    table = Table(
        title=f"{result['method']} on {result['protocol']} {result['pair']} — {result['device']}, "
        f"batch {result['batch_size']}, {result['precision']}{', compiled' if result['compile'] else ''}, "
        f"mean of {args.steps} steps"
    )
    for col in ("part", "ms / step", "share"):
        table.add_column(col, justify="right")
    for part in PARTS:
        ms = result[f"{part}_ms"]
        table.add_row(part.replace("_", " "), f"{ms:.2f}", f"{100 * ms / result['step_ms']:.1f} %")
    table.add_row("total", f"{result['step_ms']:.2f}", "100 %")
    Console().print(table)
    for key in (
        "throughput_img_s",
        "overhead_vs_student",
        "student_params",
        "student_flops",
        "teacher_flops",
        "adapter_params",
        "peak_mem_mb",
    ):
        if key in result:
            print(f"{key:20s} {result[key]}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..datasets import list_datasets
    from ..methods import get_method, list_methods
    from .protocol import list_protocols, load_protocol
    from .zoo import list_models

    if args.what == "methods":
        for name in list_methods():
            print(f"{name:12s} {get_method(name).summary}")
    elif args.what == "protocols":
        for name in list_protocols():
            p = load_protocol(name)
            print(f"{name:12s} v{p.version}  {p.description.strip().splitlines()[0]}")
    elif args.what == "pairs":
        for name in load_protocol(args.protocol).pair_names():
            print(name)
    elif args.what == "models":
        print("\n".join(list_models()))
        print("(and any timm model name)")
    else:
        print("\n".join(list_datasets()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]  # recorded by rankstudy
    try:
        commands = {
            "run": cmd_run,
            "teachers": cmd_teachers,
            "softlabels": cmd_softlabels,
            "cost": cmd_cost,
            "list": cmd_list,
            "search": cmd_search,
            "rankstudy": cmd_rankstudy,
        }
        return commands[args.command](args)
    except USER_ERRORS as exc:
        console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        return exit_code(exc)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: the run record says status 'interrupted'")
        return 130
    except SystemExit as exc:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exc, SIGTERMException):
            raise
        # Lightning stopped at a step boundary and the last checkpoint holds that step
        console.print("[bold red]terminated[/]: the run record says 'interrupted'; continue it with RESUME=1")
        return 143
