"""`python -m distillbench.benchmark search` (`make search`): run a method's `search` stage alone.

    search --method diswot --protocol digits [--teacher resnet20] [--budget params=200K,flops=5M]

Prints the top candidates and writes the search record to
`<results>/<protocol>/<method>/search/<teacher>/seed<k>/search.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning as L
from rich.console import Console
from rich.table import Table

from ..methods import StageContext, get_method
from . import cost
from .errors import BenchmarkError
from .protocol import Protocol, load_protocol
from .zoo import create_model

_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}


def parse_budget(text: str | None) -> dict[str, float]:
    """`params=200K,flops=5M` (or a bare number: a params budget) → {'max_params': …, 'max_flops': …}."""
    out: dict[str, float] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, _sep, value = item.rpartition("=") if "=" in item else ("params", "=", item)
        if key not in ("params", "flops"):
            raise BenchmarkError(f"BUDGET keys are params and flops, got {key!r} in {text!r}")
        scale = _SUFFIX.get(value[-1:].lower(), 1.0)
        try:
            number = float(value[:-1] if scale != 1.0 else value) * scale
        except ValueError:
            raise BenchmarkError(f"BUDGET {key}: cannot read {value!r} as a number (e.g. 200K, 5M)") from None
        out[f"max_{key}"] = number
    return out


def stage_context(
    protocol: Protocol,
    method: str,
    hparams: dict[str, Any],
    *,
    teacher_arch: str,
    seed: int,
    work_dir: Path,
    data_root: str | None = None,
) -> StageContext:
    """A StageContext for running a search stage outside a training run (no trained teacher needed)."""
    from .runner import make_datamodule

    datamodule = make_datamodule(protocol, seed=seed, data_root=data_root)
    num_classes, chans = datamodule.num_classes, protocol.input.channels
    input_shape = (chans, protocol.input.size, protocol.input.size)
    return StageContext(
        method=method,
        hparams=hparams,
        datamodule=datamodule,
        teacher=None,
        teacher_info={"arch": teacher_arch},
        protocol=dataclasses.asdict(protocol),
        seed=seed,
        work_dir=work_dir,
        cache_dir=work_dir,
        build_model=lambda name: create_model(name, num_classes=num_classes, in_chans=chans),
        count_flops=lambda model: cost.count_flops(model, input_shape),
    )


def run_search_command(
    *,
    method: str,
    protocol: str,
    pair: str | None = None,
    teacher: str | None = None,
    budget: str | None = None,
    seed: int = 0,
    results: str = "results",
    hparams: dict[str, Any] | None = None,
    data_root: str | None = None,
    top: int = 10,
) -> dict[str, Any]:
    spec = get_method(method)
    stage = next((s for s in spec.stages if s.name == "search"), None)
    if stage is None:
        raise BenchmarkError(f"method {method!r} has no search stage (methods with one: diswot)")
    proto = load_protocol(protocol)
    pair_spec = proto.pair(pair)
    overrides = {**(hparams or {}), **parse_budget(budget)}
    resolved = spec.resolve_hparams(proto.methods.get(method), pair_spec.methods.get(method), overrides)
    teacher_arch = resolved.get("search_teacher") or teacher or pair_spec.teacher
    work_dir = Path(results) / proto.name / method / "search" / teacher_arch / f"seed{seed}"
    ctx = stage_context(
        proto, method, resolved, teacher_arch=teacher_arch, seed=seed, work_dir=work_dir, data_root=data_root
    )
    L.seed_everything(seed, verbose=False)
    artifact = stage.run(ctx)
    record = json.loads(Path(artifact["record"]).read_text())
    _print_top(record, top, artifact["record"])
    return record


def _print_top(record: dict[str, Any], top: int, path: str) -> None:
    table = Table(
        title=f"{record['method']} search · {record['space']} · teacher {record['teacher']} (Gaussian) · "
        f"{record['strategy']} · {len(record['candidates'])} scored in {record['search_time_s']:.1f} s"
    )
    for col in ("rank", "candidate", "score", "M_s", "M_r", "params", "FLOPs"):
        table.add_column(col)
    for i, c in enumerate(record["candidates"][:top], start=1):
        flops = "—" if c.get("flops") is None else f"{c['flops'] / 1e6:.2f}M"
        table.add_row(
            str(i),
            c["name"],
            f"{c['score']:.5f}",
            f"{c['M_s']:.5f}",
            f"{c['M_r']:.2e}",
            f"{c['params'] / 1e3:.1f}K",
            flops,
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(f"chosen: [bold]{record['chosen']}[/] · search record → {path}")
