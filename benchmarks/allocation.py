"""Width allocation under a MACs budget: one error tolerance for every unit (eps search) against
the least total error per MAC (knapsack), on the same trained base, planning curves and
calibration images; one-shot top-1 (after BN re-calibration) on the validation split.

    python benchmarks/allocation.py [--archs mobilenet_v2,resnet18] [--budgets 50%,30%]

The bases are benchmarks/compare.py's cached Fashion-MNIST models (benchmarks/results/cache/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="mobilenet_v2,resnet18")
    ap.add_argument("--budgets", default="50%,30%")
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/results/cache"))
    ap.add_argument("--recipe", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--calib-images", type=int, default=1024)
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/allocation.json"))
    a = ap.parse_args(argv)

    from gslim.compress.select import compress_model
    from gslim.data import calibration_batch
    from gslim.models import count_macs_params, load_model
    from gslim.recipe import load_recipe
    from gslim.train import evaluate_on_recipe

    rows = []
    for arch in a.archs.split(","):
        path = a.cache / f"{arch}.pt"
        if not path.is_file():
            print(
                f"{path} is missing: run benchmarks/compare.py first (it trains and caches the bases)",
                file=sys.stderr,
            )
            return 2
        base, spec = load_model(path)
        r = load_recipe(
            a.recipe,
            {
                "model.arch": arch,
                "model.input_size": spec.input_size,
                "data.calib_images": a.calib_images,
                "data.val_images": a.val_images,
            },
        )
        x, y = calibration_batch(r.data, spec.input_size, spec.num_classes, r.seed)
        macs0, _ = count_macs_params(base, spec.input_size)
        base_top1 = evaluate_on_recipe(base, r, "cpu")["top1"]
        curves = None
        for budget in a.budgets.split(","):
            for allocation in ("eps", "knapsack"):
                cfg = r.compress.model_copy(
                    update={
                        "target_macs": float(budget.rstrip("%")) / 100,
                        "allocation": allocation,
                        "eps": None,
                    }
                )
                t0 = time.perf_counter()
                res = compress_model(
                    base, spec.input_size, x, y, cfg, seed=r.seed, batch_size=128, curves=curves
                )
                curves = res.curves  # the same planning curves for every row of this arch
                top1 = evaluate_on_recipe(res.model, r, "cpu")["top1"]
                macs, _ = count_macs_params(res.model, spec.input_size)
                row = {
                    "arch": arch,
                    "budget": budget,
                    "allocation": allocation,
                    "macs_fraction": macs / macs0,
                    "one_shot_top1": top1,
                    "base_top1": base_top1,
                    "seconds": time.perf_counter() - t0,
                    "sum_rel_error": sum(u.rel_error or 0.0 for u in res.units),
                }
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))
    print(
        f"Fashion-MNIST, one-shot top-1 on {a.val_images} validation images, {a.calib_images} calibration images\n"
    )
    print(
        "| model | budget | allocation | MACs | sum of held-out unit errors | one-shot top-1 | base top-1 |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['arch']} | {row['budget']} | {row['allocation']} | {100 * row['macs_fraction']:.1f}% | "
            f"{row['sum_rel_error']:.3f} | {row['one_shot_top1']:.2f}% | {row['base_top1']:.2f}% |"
        )
    return 0


if __name__ == "__main__":
    torch.set_flush_denormal(True)
    raise SystemExit(main())
