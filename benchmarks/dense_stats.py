"""Statistics of one 3x3 consumer batch: dense (every position, by offset difference) vs the
sampled path taking every row (rows gathered, then the Gram and cross term); and a later batch's
dense Gram added to a running float64 sum, with B from the weights and no held-out share (the
planning pass's case: what each batch after the first costs).

    python benchmarks/dense_stats.py [--threads 1] [--images 64]

Prints a markdown table of median seconds over 3 runs (after one warm-up), interleaved.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from gslim.compress.calibrate import StatsAccumulator, consumer_rows, target_map, target_rows

SHAPES = [(512, 7), (256, 14), (128, 28), (64, 56)]


def _median(fns, runs: int = 3) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for f in fns:
        f()  # warm-up
    for _ in range(runs):
        for i, f in enumerate(fns):  # interleaved
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [sorted(t)[len(t) // 2] for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"| consumer input ({args.images} images, {args.threads} thread(s)) | dense s | sampled, every row s "
        "| dense, a later batch's Gram s |"
    )
    print("|---|---:|---:|---:|")
    for channels, size in SHAPES:
        torch.manual_seed(0)
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        x = torch.randn(args.images, channels, size, size)
        with torch.no_grad():
            y = conv(x)

        def dense():
            acc = StatsAccumulator(1.0, torch.Generator().manual_seed(0), dense=True)
            sample = acc.draw(y[0, 0].numel() * args.images, args.images)
            acc.add_dense(conv, x, target_map(conv, y), sample.held)

        def sampled():
            acc = StatsAccumulator(1.0, torch.Generator().manual_seed(0))
            sample = acc.draw(y[0, 0].numel() * args.images)
            acc.add(consumer_rows(conv, x, sample.pick), target_rows(conv, y, sample.pick), sample.held)

        weights = torch.zeros(9 * channels, channels, dtype=torch.float64)  # (B = G W: not summed per batch)
        running = StatsAccumulator(
            1.0, torch.Generator().manual_seed(0), 0.0, dense=True, cross_weights=weights
        )

        def dense_later():
            sample = running.draw(y[0, 0].numel() * args.images, args.images)
            running.add_dense(conv, x, target_map(conv, y), sample.held)

        dense_later()  # (the first batch allocates the sum)
        d, s, later = _median([dense, sampled, dense_later])
        print(f"| {channels} ch, {size}x{size} | {d:.2f} | {s:.2f} | {later:.3f} |")


if __name__ == "__main__":
    main()
