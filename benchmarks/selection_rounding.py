"""How much of a selection is decided by float rounding? The same greedy selection on the CPU
twice, the second with the calibration images scaled by (1 + eps * noise): per unit, the kept
width and the Jaccard overlap of the kept channel sets, and how far apart the two slim models'
outputs are. benchmarks/device_check.py compares the GPU's selection with the CPU's; this is the
yardstick for that comparison (a random-weight model, as there).

    python benchmarks/selection_rounding.py                       # MobileNetV2, 224 px, 128 images
    python benchmarks/selection_rounding.py --arch resnet18 --eps 1e-7
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import device_check  # noqa: E402 - the same base model and calibration images as the device check


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--eps", type=float, default=1e-6, help="relative perturbation of the images")
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.5, help="MACs fraction")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gslim.compress.select import compress_model
    from gslim.recipe import CompressConfig

    a = device_check.parse_args(["--out", "unused", "--calib-images", str(args.calib_images)])
    base = device_check.base_model(args.arch, a).cpu()
    x = device_check.calibration_images(a)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    cfg = CompressConfig(target_macs=args.budget)
    t0 = time.perf_counter()
    first = compress_model(copy.deepcopy(base), a.size, x, None, cfg, batch_size=64)
    second = compress_model(copy.deepcopy(base), a.size, x * (1 + args.eps * noise), None, cfg, batch_size=64)
    seconds = time.perf_counter() - t0
    other = {u.name: u for u in second.units}
    print(
        f"{args.arch}, {a.size} px, {args.calib_images} images, images perturbed by {args.eps:g} (relative)\n"
    )
    print("| unit | width | kept (first / perturbed) | kept sets' Jaccard |")
    print("|---|---:|---|---:|")
    for u in first.units:
        v = other[u.name]
        jaccard = len(set(u.order) & set(v.order)) / max(1, len(set(u.order) | set(v.order)))
        print(f"| {u.name} | {u.width} | {u.kept} / {v.kept} | {jaccard:.3f} |")
    probe = torch.randn(8, 3, a.size, a.size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y0, y1, yb = first.model.eval()(probe), second.model.eval()(probe), base(probe)
    print(
        f"\nslim outputs apart (relative): {float((y1 - y0).norm() / y0.norm()):.3f}; "
        f"slim vs base: {float((y0 - yb).norm() / yb.norm()):.3f}; two selections {seconds:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
