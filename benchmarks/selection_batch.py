"""A forward pass and a greedy selection at several batch sizes, with their CPU time split into
user and system time (the kernel's share: page faults of freshly mapped activations).

    python benchmarks/selection_batch.py --archs mobilenet_v2,resnet18 --batches 64,16,8

For each model and batch size, in one process: a forward pass over the calibration images in
batches of that size (after one warm-up batch), then one greedy ``compress_model`` (50% MACs)
with the same batch size. Same images as ``selection_speed.py`` (Fashion-MNIST resized, or
synthetic). Prints wall seconds, the greedy's pass count against that forward, and the greedy's
user / system CPU seconds and minor page faults (``resource.getrusage``).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from selection_speed import calibration

    from gslim.compress.select import compress_model
    from gslim.models import build_architecture
    from gslim.recipe import CompressConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="mobilenet_v2,resnet18")
    ap.add_argument("--batches", default="64,8")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "synthetic"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x, y, source = calibration(a.images, a.size, a.data)
    print(f"{a.images} images at {a.size}x{a.size} ({source}), 50% MACs, {a.threads} thread(s)\n")
    print(
        "| model | batch | forward s | greedy s | passes | greedy CPU s (user / system) | greedy page faults |"
    )
    print("|---|---:|---:|---:|---:|---|---:|")
    for arch in a.archs.split(","):
        for batch in (int(b) for b in a.batches.split(",")):
            torch.manual_seed(0)
            model = build_architecture(arch, 1000).eval()
            with torch.no_grad():
                model(x[:batch])
                t0 = time.perf_counter()
                for xb in x.split(batch):
                    model(xb)
                forward = time.perf_counter() - t0
            cfg = CompressConfig(criterion="greedy", target_macs=0.5, round_to=8, bn_recalib=False)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            compress_model(model, a.size, x, y, cfg, seed=0, batch_size=batch)
            greedy, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            print(
                f"| {arch} | {batch} | {forward:.2f} | {greedy:.2f} | {greedy / forward:.2f} | "
                f"{r1.ru_utime - r0.ru_utime:.1f} / {r1.ru_stime - r0.ru_stime:.1f} | "
                f"{r1.ru_minflt - r0.ru_minflt:,} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
