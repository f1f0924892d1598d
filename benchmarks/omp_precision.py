"""The greedy path in float32 vs float64 (``compress.omp_precision``): selection time and what
it selects, on the same model and images, alternated in one process.

    python benchmarks/omp_precision.py [--archs mobilenet_v2,resnet18] [--images 256] [--size 224]
        [--rounds 2] [--threads 2] [--budget 50%] [--json F]

Random-init torchvision models (1000 classes) and selection_speed.py's calibration images. For
each model: one plain forward pass (the unit of the pass counts), then ``compress_model``
(greedy, MACs budget, round_to 8) with each precision, the order swapped every round; medians.
Beside the times: how many units kept the same width and the same channel set under both, the
mean Jaccard of the kept sets, and the largest difference of a unit's held-out error (the
re-fit is float64 in both, so a difference is a different choice, not rounding of the fit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import budget_fraction  # noqa: E402
from selection_speed import calibration, forward_seconds  # noqa: E402

PRECISIONS = ("float64", "float32")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="mobilenet_v2,resnet18")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How the two selections' units compare (``a``, ``b``: unit name -> (kept set, rel_error))."""
    names = sorted(set(a) & set(b))
    same_width = sum(len(a[n][0]) == len(b[n][0]) for n in names)
    same_set = sum(a[n][0] == b[n][0] for n in names)
    jaccard = [len(a[n][0] & b[n][0]) / max(len(a[n][0] | b[n][0]), 1) for n in names]
    errs = [abs((a[n][1] or 0.0) - (b[n][1] or 0.0)) for n in names]
    return {
        "units": len(names),
        "same_width": same_width,
        "same_set": same_set,
        "jaccard_mean": statistics.mean(jaccard) if jaccard else 1.0,
        "max_error_difference": max(errs, default=0.0),
    }


def measure(arch: str, x: torch.Tensor, y: torch.Tensor, a: argparse.Namespace) -> dict[str, Any]:
    from gslim.compress.select import compress_model
    from gslim.models import build_architecture
    from gslim.recipe import CompressConfig

    torch.manual_seed(0)
    model = build_architecture(arch, 1000).eval()
    forward = [forward_seconds(model, x)]
    seconds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    units: dict[str, dict[str, Any]] = {}
    for r in range(a.rounds):
        for p in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
            cfg = CompressConfig(
                criterion="greedy",
                target_macs=budget_fraction(a.budget),
                round_to=8,
                bn_recalib=False,
                omp_precision=p,
            )
            t0 = time.perf_counter()
            res = compress_model(model, a.size, x, y, cfg, seed=0, batch_size=64)
            seconds[p].append(time.perf_counter() - t0)
            units[p] = {u.name: (frozenset(u.order), u.rel_error) for u in res.units}
            print(f"[{arch}] round {r + 1} {p}: {seconds[p][-1]:.1f} s", file=sys.stderr, flush=True)
            del res
    forward.append(forward_seconds(model, x))
    fwd = statistics.mean(forward)
    row: dict[str, Any] = {"arch": arch, "forward_s": forward}
    for p in PRECISIONS:
        row[p] = {"seconds": seconds[p], "median_s": statistics.median(seconds[p])}
        row[p]["passes"] = row[p]["median_s"] / fwd
    row["speedup"] = row["float64"]["median_s"] / row["float32"]["median_s"]
    row["agreement"] = agreement(units["float64"], units["float32"])
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | forward s | float64 s (passes) | float32 s (passes) | speedup | same width | same channels | mean Jaccard | max held-out error diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r["agreement"]
        f64, f32 = r["float64"], r["float32"]
        out.append(
            f"| {r['arch']} | {statistics.mean(r['forward_s']):.2f} | {f64['median_s']:.1f} ({f64['passes']:.1f}) "
            f"| {f32['median_s']:.1f} ({f32['passes']:.1f}) | {r['speedup']:.2f}x | {g['same_width']}/{g['units']} "
            f"| {g['same_set']}/{g['units']} | {g['jaccard_mean']:.3f} | {g['max_error_difference']:.2e} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    from gslim.host_memory import keep_freed_memory

    keep_freed_memory()  # as selection_speed.py does by default: the counts are the selection's own
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore")
    x, y, desc = calibration(a.images, a.size, a.data)
    rows = [measure(arch, x, y, a) for arch in a.archs.split(",") if arch.strip()]
    table = markdown(rows)
    print(
        f"{a.images} images ({desc}) at {a.size} px, {a.budget} MACs, {a.threads} threads; medians of {a.rounds}"
    )
    print(table)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
