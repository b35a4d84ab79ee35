"""`python -m distillbench.benchmark rankstudy`: how well do training-free proxies rank students?

    rankstudy --space small-resnet-depth-width --protocol digits [--train kd,vanilla --train-seeds 0,1,2]
              [--gt FILE.csv] [--proxy-seeds 3] [--out leaderboards/diswot]

Ground truth is either read from a CSV (`name,kd[,vanilla]`: mean test top-1 per candidate) or made
by training every candidate on the protocol (each run writes a normal run record; finished records
are reused). Proxies — DisWOT (−(M_s + M_r)), M_s only, M_r only, params, FLOPs, random — are
computed on one fixed batch per proxy seed with a Gaussian copy of the teacher (spec §7). For each
proxy: Kendall τ and Spearman ρ against KD and vanilla accuracy with 95 % bootstrap CIs over
architectures, per-seed τ mean ± std, top-1 regret; plus τ(vanilla, KD) and the search cost as a
ratio to the training-based ranking's wall time.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ..methods.diswot import Scorer, get_space, scoring_batch
from . import cost
from .errors import BenchmarkError
from .protocol import PairSpec, Protocol, load_protocol
from .zoo import create_model


def rank_corr(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tau = stats.kendalltau(pred, truth).statistic
    rho = stats.spearmanr(pred, truth).statistic
    return float(tau), float(rho)


def bootstrap_ci(pred: np.ndarray, truth: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, list]:
    """95 % percentile CIs of τ and ρ over architectures resampled with replacement (degenerate
    resamples — constant predictions or truths — are skipped)."""
    rng = np.random.default_rng(seed)
    taus, rhos = [], []
    n = len(pred)
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        p, t = pred[idx], truth[idx]
        if np.ptp(p) == 0 or np.ptp(t) == 0:
            continue
        tau, rho = rank_corr(p, t)
        taus.append(tau), rhos.append(rho)
    pct = lambda v: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]  # noqa: E731
    return {"tau_ci": pct(taus), "rho_ci": pct(rhos)}


def train_ground_truth(
    protocol: Protocol,
    teacher: str,
    names: list[str],
    methods: list[str],
    seeds: list[int],
    results: str,
    say=print,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """Train every candidate with each method and seed (reusing finished records); returns the
    test top-1 per (method, candidate) and the summed training wall time per method."""
    from .runner import RunRequest, resolve, run

    extra = tuple(PairSpec(teacher, n) for n in names if f"{teacher}__{n}" not in protocol.pair_names())
    proto = dataclasses.replace(protocol, pairs=protocol.pairs + extra)
    acc: dict[str, dict[str, list[float]]] = {m: {n: [] for n in names} for m in methods}
    wall = dict.fromkeys(methods, 0.0)
    for method in methods:
        for i, name in enumerate(names):
            for seed in seeds:
                request = RunRequest(
                    method=method,
                    protocol=proto,
                    pair=f"{teacher}__{name}",
                    seed=seed,
                    results=results,
                    wandb=False,
                    progress=False,
                    measure_overhead=False,
                )
                path = resolve(request).path
                record = json.loads(path.read_text()) if path.exists() else None
                if not record or record.get("status") != "finished":
                    record = run(request, say=lambda _msg: None)
                acc[method][name].append(float(record["metrics"]["top1"]))
                wall[method] += float(record["train_time_s"])
            say(f"{method} {i + 1}/{len(names)} {name}: {statistics.mean(acc[method][name]):.2f}")
    return acc, wall


def read_ground_truth(path: str) -> dict[str, dict[str, float]]:
    file = Path(path)
    if not file.exists():
        raise BenchmarkError(f"ground-truth file {path} not found (CSV with columns name,kd[,vanilla])")
    with file.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "name" not in rows[0] or "kd" not in rows[0]:
        raise BenchmarkError(f"{path}: expected a CSV header with at least 'name' and 'kd'")
    out: dict[str, dict[str, float]] = {"kd": {}}
    if "vanilla" in rows[0]:
        out["vanilla"] = {}
    for row in rows:
        for key in out:
            try:
                out[key][row["name"]] = float(row[key])
            except (TypeError, ValueError):
                raise BenchmarkError(
                    f"{path}: {key} of {row.get('name')!r} is not a number: {row.get(key)!r}"
                ) from None
    return out


def compute_proxies(
    protocol: Protocol, teacher: str, names: list[str], proxy_seeds: list[int], batch: int, data_root=None
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, int]], float]:
    """Per proxy, per candidate, one value per proxy seed (higher = predicted better); costs; scoring time."""
    from .runner import make_datamodule

    datamodule = make_datamodule(protocol, seed=0, data_root=data_root)
    k, chans = datamodule.num_classes, protocol.input.channels
    shape = (chans, protocol.input.size, protocol.input.size)

    def build(name):
        return create_model(name, num_classes=k, in_chans=chans)

    start = time.perf_counter()
    scorer = Scorer(build, teacher, [scoring_batch(datamodule, batch, s) for s in proxy_seeds], proxy_seeds)
    for name in names:
        scorer(name)
    search_time = time.perf_counter() - start
    costs = {}
    for name in names:
        model = build(name)
        costs[name] = {"params": cost.count_params(model), "flops": cost.count_flops(model, shape)}
    per = {n: scorer.results[n]["per_seed"] for n in names}
    proxies = {
        "diswot": {n: [r["score"] for r in per[n]] for n in names},
        "M_s only": {n: [-r["M_s"] for r in per[n]] for n in names},
        "M_r only": {n: [-r["M_r"] for r in per[n]] for n in names},
        "params": {n: [float(costs[n]["params"])] * len(proxy_seeds) for n in names},
        "flops": {n: [float(costs[n]["flops"] or 0)] * len(proxy_seeds) for n in names},
    }
    rng = np.random.default_rng(12345)
    draws = rng.random((len(proxy_seeds), len(names)))
    proxies["random"] = {n: [float(draws[s, i]) for s in range(len(proxy_seeds))] for i, n in enumerate(names)}
    return proxies, costs, search_time


def analyse(proxies, truth: dict[str, dict[str, float]], names: list[str], resamples: int) -> dict[str, Any]:
    gts = {key: np.array([truth[key][n] for n in names]) for key in truth}
    out: dict[str, Any] = {"proxies": {}}
    if "vanilla" in gts:
        out["tau_vanilla_kd"], out["rho_vanilla_kd"] = rank_corr(gts["vanilla"], gts["kd"])
    for proxy, values in proxies.items():
        mean = np.array([statistics.mean(values[n]) for n in names])
        row: dict[str, Any] = {}
        for key, gt in gts.items():
            tau, rho = rank_corr(mean, gt)
            seeds = len(values[names[0]])
            per_seed = [rank_corr(np.array([values[n][s] for n in names]), gt)[0] for s in range(seeds)]
            row[key] = {
                "tau": round(tau, 4),
                "rho": round(rho, 4),
                **bootstrap_ci(mean, gt, resamples),
                "tau_per_seed_mean": round(statistics.mean(per_seed), 4),
                "tau_per_seed_std": round(statistics.stdev(per_seed), 4) if seeds > 1 else 0.0,
                "top1_regret": round(float(gt.max() - gt[int(np.argmax(mean))]), 3),
                "chosen": names[int(np.argmax(mean))],
            }
        out["proxies"][proxy] = row
    return out


def render_markdown(study: dict[str, Any]) -> str:
    a = study["analysis"]
    lines = [
        f"# DisWOT rank study — {study['protocol']} · {study['space']} ({len(study['candidates'])} candidates)",
        "",
        f"Generated by `{study['command']}` (git {study['git_commit']}).",
        f"Teacher for scoring: Gaussian-initialised `{study['teacher']}`; ground truth: "
        f"{study['ground_truth']}. Proxy seeds {study['proxy_seeds']}, scoring batch {study['batch']}, "
        f"{study['bootstrap']} bootstrap resamples over architectures (95 % CIs).",
        "",
    ]
    if "tau_vanilla_kd" in a:
        lines.append(f"τ(vanilla GT, KD GT) = {a['tau_vanilla_kd']:.3f}, ρ = {a['rho_vanilla_kd']:.3f}.")
    if study.get("train_time_s"):
        lines.append(
            f"Search cost: scoring all candidates × {len(study['proxy_seeds'])} seeds took "
            f"{study['search_time_s']:.1f} s; training-based KD ranking took {study['train_time_s']['kd']:.0f} s "
            f"→ ratio {study['search_time_s'] / study['train_time_s']['kd']:.4f}."
        )
    lines += [
        "",
        "| proxy | τ (KD) [95 % CI] | ρ (KD) [95 % CI] | τ per seed (KD) | top-1 regret (KD) | chosen "
        "| τ (vanilla) [95 % CI] | ρ (vanilla) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for proxy, row in a["proxies"].items():
        kd, van = row["kd"], row.get("vanilla")
        cells = [
            proxy,
            f"{kd['tau']:.3f} [{kd['tau_ci'][0]:.3f}, {kd['tau_ci'][1]:.3f}]",
            f"{kd['rho']:.3f} [{kd['rho_ci'][0]:.3f}, {kd['rho_ci'][1]:.3f}]",
            f"{kd['tau_per_seed_mean']:.3f} ± {kd['tau_per_seed_std']:.3f}",
            f"{kd['top1_regret']:.2f}",
            kd["chosen"],
            f"{van['tau']:.3f} [{van['tau_ci'][0]:.3f}, {van['tau_ci'][1]:.3f}]" if van else "—",
            f"{van['rho']:.3f}" if van else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| candidate | params | FLOPs | KD top-1 | vanilla top-1 | DisWOT score | M_s | M_r |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in study["candidates"]:
        van = f"{c['vanilla']:.2f} ± {c['vanilla_std']:.2f}" if c.get("vanilla") is not None else "—"
        lines.append(
            f"| {c['name']} | {c['params']} | {c['flops']} | {c['kd']:.2f} ± {c['kd_std']:.2f} | {van} | "
            f"{c['diswot']:.5f} | {c['M_s']:.5f} | {c['M_r']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def run_rankstudy(args) -> dict[str, Any]:
    from .results import git_commit

    protocol = load_protocol(args.protocol)
    space = get_space(args.space)
    names = space.names(subset=not args.all)
    teacher = args.teacher or protocol.pair().teacher
    proxy_seeds = list(range(args.proxy_seeds))
    proxies, costs, search_time = compute_proxies(protocol, teacher, names, proxy_seeds, args.batch, args.data_root)
    train_time = None
    spread: dict[str, dict[str, float]] = {}
    if args.gt:
        truth = read_ground_truth(args.gt)
        missing = [n for n in names if n not in truth["kd"]]
        if missing:
            raise BenchmarkError(f"{args.gt} lacks ground truth for {', '.join(missing)}")
        source = f"file {args.gt}"
    else:
        methods = [m for m in args.train.split(",") if m]
        if "kd" not in methods:
            raise BenchmarkError("--train must include kd (the rank study's target is distilled accuracy)")
        seeds = [int(s) for s in args.train_seeds.split(",")]
        acc, train_time = train_ground_truth(protocol, teacher, names, methods, seeds, args.results)
        truth = {m: {n: statistics.mean(v) for n, v in acc[m].items()} for m in methods}
        spread = {m: {n: (statistics.stdev(v) if len(v) > 1 else 0.0) for n, v in acc[m].items()} for m in methods}
        source = (
            f"{'/'.join(methods)} runs on {protocol.name}, seeds {seeds}, mean test top-1 (records in {args.results})"
        )
    analysis = analyse(proxies, truth, names, args.bootstrap)
    candidates = []
    for n in names:
        mean = lambda key, n=n: statistics.mean(proxies[key][n])  # noqa: E731
        candidates.append(
            {
                "name": n,
                **costs[n],
                "kd": truth["kd"][n],
                "kd_std": spread.get("kd", {}).get(n, 0.0),
                "vanilla": truth.get("vanilla", {}).get(n),
                "vanilla_std": spread.get("vanilla", {}).get(n, 0.0),
                "diswot": mean("diswot"),
                "M_s": -mean("M_s only"),
                "M_r": -mean("M_r only"),
            }
        )
    study = {
        "command": "python -m distillbench.benchmark rankstudy " + " ".join(args.argv),
        "git_commit": git_commit(),
        "protocol": protocol.name,
        "protocol_hash": protocol.hash(protocol.pair()),
        "space": args.space,
        "teacher": teacher,
        "ground_truth": source,
        "proxy_seeds": proxy_seeds,
        "batch": args.batch,
        "bootstrap": args.bootstrap,
        "search_time_s": round(search_time, 3),
        "train_time_s": train_time,
        "analysis": analysis,
        "candidates": candidates,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"rankstudy-{protocol.name}-{args.space}"
    stem.with_suffix(".json").write_text(json.dumps(study, indent=1))
    stem.with_suffix(".md").write_text(render_markdown(study))
    with stem.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(candidates[0]))
        writer.writeheader()
        writer.writerows(candidates)
    print(render_markdown(study))
    print(f"rank study → {stem}.md / .csv / .json")
    return study


def add_parser(sub) -> None:
    p = sub.add_parser("rankstudy", help="rank correlation of training-free proxies with distilled accuracy")
    p.add_argument("--space", required=True)
    p.add_argument("--protocol", default="digits")
    p.add_argument("--teacher", default=None, help="default: the protocol's default pair's teacher")
    p.add_argument("--all", action="store_true", help="every candidate, not the space's rank-study subset")
    p.add_argument("--gt", default=None, help="CSV name,kd[,vanilla] of mean top-1 (else: train each candidate)")
    p.add_argument("--train", default="kd,vanilla", help="methods trained for ground truth (kd required)")
    p.add_argument("--train-seeds", default="0,1,2")
    p.add_argument("--proxy-seeds", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="scoring batch size")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--results", default="leaderboards/records")
    p.add_argument("--out", default="leaderboards/diswot")
    p.add_argument("--data-root", default=None)
