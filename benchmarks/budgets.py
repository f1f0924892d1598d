"""Do compressed models meet their budget? Torchvision models at 224x224, several budgets.

    python benchmarks/budgets.py [--archs mobilenet_v2,...] [--budgets 70%,50%,30%] [--calib 64]
        [--criterion greedy] [--quick]
    python benchmarks/budgets.py --archs resnext50_32x4d,regnet_y_400mf,convnext_tiny --size 64 --budgets 50%

The default list is the six models of the mission and three families with grouped convolutions
(ResNeXt, RegNet: whole groups are removed) and channels-last blocks (ConvNeXt).

Random weights with BatchNorm statistics re-estimated on the calibration images (so the
features are not degenerate), synthetic calibration images. For each model and budget it
prints the target, the cost model's plan, fvcore's count of the slimmed model, and the
largest single rounding step of any unit (the tolerance the widths are matched within).
"""

from __future__ import annotations

import argparse
import time

import torch

SIX = "mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large,resnet18,resnet34,resnet50"
FAMILIES = "resnext50_32x4d,regnet_y_400mf,convnext_tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=f"{SIX},{FAMILIES}")
    ap.add_argument("--budgets", default="70%,50%,30%")
    ap.add_argument("--metric", default="macs", choices=["macs", "params"])
    ap.add_argument("--criterion", default="greedy")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="32x32, 16 images, two models")
    args = ap.parse_args()
    if args.quick:
        args.size, args.calib, args.archs = 32, 16, "mobilenet_v2,resnet18"

    import torchvision

    from gslim.compress.budget import CostModel
    from gslim.compress.calibrate import recalibrate_bn, split_batches
    from gslim.compress.select import compress_model
    from gslim.compress.units import find_units
    from gslim.models import count_macs_params
    from gslim.recipe import CompressConfig

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    x = torch.randn(args.calib, 3, args.size, args.size)
    print("| model | budget | target | planned | fvcore (slimmed) | one rounding step | within | select s |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        model = torchvision.models.get_model(arch, num_classes=1000)
        recalibrate_bn(model, split_batches(x, 32))
        model.eval()
        base_macs, base_params = count_macs_params(model, args.size)
        graph = find_units(model, args.size)
        cost = CostModel(model, graph, args.size, [u for u in graph.units if u.kind == "internal"])
        for b in args.budgets.split(","):
            frac = float(b.rstrip("%")) / 100
            key = "target_macs" if args.metric == "macs" else "target_params"
            cfg = CompressConfig(criterion=args.criterion, round_to=8, **{key: frac})
            t0 = time.perf_counter()
            r = compress_model(model, args.size, x, None, cfg, batch_size=32)
            secs = time.perf_counter() - t0
            macs, params = count_macs_params(r.model, args.size)
            got, base = (macs, base_macs) if args.metric == "macs" else (params, base_params)
            widths = {u.name: u.kept for u in r.units}
            step = 0.0
            for name, k in widths.items():  # the largest cost change of one rounding step on any unit
                if k < cost.full.get(name, 0):
                    wider = dict(widths, **{name: min(cost.full[name], k + cost.step(name, 8))})
                    measure = cost.macs if args.metric == "macs" else cost.params
                    step = max(step, measure(wider) - measure(widths))
            ok = got <= frac * base * 1.001 and got >= frac * base - step * 1.001 - 0.02 * base
            print(
                f"| {arch} | {b} {args.metric} | {frac * base:,.0f} | {r.budget['planned']:,.0f} | "
                f"{got:,.0f} ({100 * got / base:.1f}%) | {step:,.0f} ({100 * step / base:.2f}%) | "
                f"{'yes' if ok else 'NO'} | {secs:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
