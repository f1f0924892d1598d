"""How well the latency model's in-network calibration predicts the models the knapsack picks.

For each arch: the latency table is built (or read from --out's cache), the calibration is fitted
``--fits`` times from fresh probe timings (its noise), the knapsack's widths are planned at each
latency budget (round 1 of gslim's closed loop: no re-selection), and those slim models are timed
interleaved with the base. Each fit's three predictions are compared with the measurement:

- **depth map**: the uniform probes' (isolated, in-network) savings, piecewise through zero,
  applied to the total isolated saving (gslim's calibration before 2026-12-05);
- **stage model**: one in-network ratio per resolution stage (gslim.compress.latency_stages);
- **mean**: what gslim predicts.

Errors are of the slim model's fraction of the base (prediction over measurement, minus one).
Random-init weights, Fashion-MNIST calibration images upscaled, ORT CPU.

    python benchmarks/latency_calibration.py
    python benchmarks/latency_calibration.py --archs resnet34 --budgets 70%,45%
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import latency_budget as lb  # noqa: E402  (the same recipe and settings as the speed part)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="mobilenet_v2,mobilenet_v3_large,resnet18,efficientnet_b0")
    ap.add_argument("--budgets", default="60%,35%")
    ap.add_argument("--fits", type=int, default=2, help="calibrations fitted per arch (fresh probe timings)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_calibration"))
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of the script (tests)")
    a = ap.parse_args(argv)
    # what latency_budget.recipe_for reads: its speed part's settings
    a.calib_images, a.grid, a.val_images = 64, 8, 2000
    if a.quick:
        a.archs, a.budgets, a.fits, a.size, a.out = "mobilenet_v3_small", "70%", 1, 32, a.out / "quick"
        a.calib_images, a.grid = 16, 3
    return a


def plan_widths(recipe, base, x, y, lm, budget: str) -> dict[str, int]:
    """The knapsack's widths for ``budget`` with this latency model (no measurement)."""
    from gslim.compress.latency import LatencyRequest, settings_from_recipe
    from gslim.compress.select import compress_model
    from gslim.recipe import parse_latency

    kind, value = parse_latency(budget)
    request = LatencyRequest(settings_from_recipe(recipe), lm.table, kind, value, built=lm)
    res = compress_model(
        base, recipe.model.input_size, x, y, recipe.compress, seed=recipe.seed, batch_size=32, latency=request
    )
    return {**lm.full, **res.widths}


def run_arch(a: argparse.Namespace, arch: str) -> list[dict]:
    from gslim.compress.latency import LatencyModel, settings_from_recipe
    from gslim.compress.latency_table import LatencyTable, measure_model
    from gslim.compress.slim import first_channels_copy
    from gslim.compress.units import find_units
    from gslim.data import calibration_batch
    from gslim.models import build_model

    torch.manual_seed(0)
    base = build_model(arch, 10).eval()
    budgets = a.budgets.split(",")
    recipe = lb.recipe_for(a, arch, budgets[0])
    cfg = recipe.compress
    settings = settings_from_recipe(recipe)
    table = LatencyTable.open(settings, None)
    graph = find_units(copy.deepcopy(base), a.size, include_residual=cfg.prune_residual)
    fits = []
    for i in range(a.fits):
        for key in [k for k in table.models if ":stages:" in k]:
            del table.models[key]  # a fresh fit: new probe timings
        lm = LatencyModel.build(
            base, graph, graph.units, a.size, settings, table, round_to=cfg.round_to, min_width=cfg.min_width
        )
        lm.calibrate(base, graph.units, a.size, settings, cfg.round_to, cfg.min_width)
        lb.log(
            f"[{arch}] fit {i + 1}: stage ratios {[round(v, 3) for v in lm.alphas]}, full {lm.full_ms:.3f} ms"
        )
        fits.append(lm)
    x, y = calibration_batch(recipe.data, a.size, 10, recipe.seed)
    widths = {b: plan_widths(recipe, base, x, y, fits[0], b) for b in budgets}
    slims = {b: first_channels_copy(base, graph.units, w) for b, w in widths.items()}
    m = measure_model(base, a.size, settings, others=slims, rounds=7)
    rows = []
    for b in budgets:
        measured = m[b] / m["model"]
        for i, lm in enumerate(fits):
            depth, stage = (p / lm.full_ms for p in lm.parts(widths[b]))
            mean = lm.predict(widths[b]) / lm.full_ms
            row = {"arch": arch, "budget": b, "fit": i + 1, "measured_fraction": measured}
            for name, p in (("depth_map", depth), ("stage_model", stage), ("mean", mean)):
                row[name] = p / measured - 1
            rows.append(row)
    return rows


def table_text(rows: list[dict], a: argparse.Namespace) -> str:
    out = [
        f"ONNX Runtime CPU, {a.threads} thread(s), batch 1, {a.size}x{a.size}, {lb.cpu_name()}; prediction "
        "error of the slim model's fraction of the base",
        "",
        "| model | budget | fit | measured fraction | depth map | stage model | mean (gslim) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['arch']} | {r['budget']} | {r['fit']} | {r['measured_fraction']:.4f} | "
            f"{100 * r['depth_map']:+.1f}% | {100 * r['stage_model']:+.1f}% | {100 * r['mean']:+.1f}% |"
        )
    out.append("")
    for name in ("depth_map", "stage_model", "mean"):
        errs = [abs(r[name]) for r in rows]
        out.append(
            f"- {name}: mean |error| {100 * sum(errs) / len(errs):.1f}%, largest {100 * max(errs):.1f}%"
        )
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GSLIM_CACHE", str(a.out / "cache"))
    rows = [r for arch in a.archs.split(",") for r in run_arch(a, arch)]
    text = table_text(rows, a)
    path = a.out / f"calibration{'_quick' if a.quick else ''}.json"
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))
    print(text)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
