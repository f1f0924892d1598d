"""The planning curves' greedy path: one channel per step vs block steps, on the same statistics.

    python benchmarks/planning_blocks.py [--archs mobilenet_v2,resnet18] [--images 64] [--size 112]
        [--shares 0.0625,0.125,0.25] [--threads 1]

For each model (random weights, 1000 classes, Gaussian images), the planning pass of a greedy
compress to 50% MACs is run once and every unit's statistics are kept; then the planning OMP
(`gslim.compress.omp.greedy_select`, eps = the planning floor) runs on them one channel per step
and with each ``block_share`` (a block of that share of the width chosen so far per step),
interleaved, medians of ``--rounds``. Prints the planning OMP's seconds, the number of steps, and
the largest gap between a block path and the exact one (absolute, and relative to the exact
error) over all units and widths.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision


def unit_statistics(arch: str, images: int, size: int) -> list:
    from gslim.compress import planning
    from gslim.compress.select import compress_model
    from gslim.recipe import CompressConfig

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=1000).eval()
    x = torch.randn(images, 3, size, size)
    kept, real = [], planning.greedy_select

    def keep(stats, **kw):
        kept.append(stats)
        return real(stats, **kw)

    planning.greedy_select = keep
    try:
        compress_model(model, size, x, None, CompressConfig(criterion="greedy", target_macs=0.5))
    finally:
        planning.greedy_select = real
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="mobilenet_v2,resnet18")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--shares", default="0.0625,0.125,0.25")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gslim.compress.omp import greedy_select
    from gslim.compress.selection import PLANNING_FLOOR

    shares = [None] + [float(s) for s in args.shares.split(",")]
    print("| model | block share | planning OMP s | steps | max gap (abs) | max gap (rel) |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch in args.archs.split(","):
        units = unit_statistics(arch, args.images, args.size)
        times: dict = {s: [] for s in shares}
        paths: dict = {}
        for _ in range(args.rounds):
            for share in shares:  # interleaved
                t = time.perf_counter()
                paths[share] = [
                    greedy_select(st, eps=PLANNING_FLOOR, ridge=1e-2, block_share=share)[1] for st in units
                ]
                times[share].append(time.perf_counter() - t)
        for share in shares:
            gaps = [
                (b - a, (b - a) / max(a, PLANNING_FLOOR))
                for exact, block in zip(paths[None], paths[share])
                for a, b in zip(exact, block)
            ]
            steps = sum(_steps(len(p), share, st[0].group) for p, st in zip(paths[share], units))
            print(
                f"| {arch} | {'exact' if share is None else f'{share:g}'} | {statistics.median(times[share]):.2f} "
                f"| {steps} | {max(g[0] for g in gaps):.4f} | {max(g[1] for g in gaps):.3f} |"
            )


def _steps(length: int, share, group: int) -> int:
    """Steps the path of ``length`` channels took (the rule greedy_select follows)."""
    from gslim.compress.omp import block_size

    n = steps = 0
    while n < length:
        n += block_size(share, n, length - n, group)
        steps += 1
    return steps


if __name__ == "__main__":
    main()
