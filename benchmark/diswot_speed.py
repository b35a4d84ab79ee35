"""Speed check (spec §6.9): score every `cifar-resnet-depth` (S1) candidate with DisWOT on CPU.

    python -m distillbench.benchmark.diswot_speed [--teacher resnet110] [--batch 128] [--seeds 1]

Gaussian teacher and candidates, CIFAR-100 shape (K = 100, 3×32×32), one batch of N(0, 1) images with
random labels per seed (no data needed), the teacher probe cached per seed. Prints the wall time;
the acceptance target is under 2 minutes for the 64 candidates on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..methods.diswot import Scorer, search_space
from .zoo import create_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet110")
    parser.add_argument("--space", default="cifar-resnet-depth")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args(argv)
    batches = []
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        batches.append(
            (
                torch.randn(args.batch, 3, 32, 32, generator=g),
                torch.randint(0, args.classes, (args.batch,), generator=g),
            )
        )
    names = search_space(args.space)
    start = time.perf_counter()
    scorer = Scorer(lambda n: create_model(n, num_classes=args.classes), args.teacher, batches, list(range(args.seeds)))
    teacher_s = time.perf_counter() - start
    for name in names:
        scorer(name)
    total = time.perf_counter() - start
    best = max(scorer.results, key=lambda n: scorer.results[n]["score"])
    print(
        f"DisWOT scored {len(names)} {args.space} candidates × {args.seeds} seed(s), batch {args.batch}, Gaussian "
        f"{args.teacher} teacher, {torch.get_num_threads()} threads: {total:.1f} s total "
        f"(teacher probe {teacher_s:.1f} s, {1000 * (total - teacher_s) / len(names):.0f} ms per candidate); "
        f"top: {best} ({scorer.results[best]['score']:.5f}); target < 120 s: {'PASS' if total < 120 else 'FAIL'}"
    )
    return 0 if total < 120 else 1


if __name__ == "__main__":
    raise SystemExit(main())
