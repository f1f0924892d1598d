"""Greedy compression of torchvision families no issue names: does it finish, quietly, on budget?

    python benchmarks/families_sweep.py [--archs resnet34,regnet_y_400mf,...] [--size 64]
        [--images 48] [--budgets 0.5,0.7] [--seeds 0,1]      # budgets and seeds paired

For each model (random weights, its BatchNorm statistics set on the calibration images so that
the layers carry signal), budget and seed: one greedy compress on Fashion-MNIST images resized
(synthetic where the dataset is not installed). Prints a table of the seconds, the MACs kept,
the units narrowed and left alone, the warnings raised, and the lines written to stderr
(anything there is noise a user would see: it found RegNetY's SE blocks printing FX tracebacks).
A failure is a row, not a stop. Accuracy needs trained weights: see one_shot.py and compare.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ARCHS = (
    "resnet34,mobilenet_v3_small,efficientnet_b0,regnet_y_400mf,regnet_x_400mf,shufflenet_v2_x1_0,"
    "mnasnet0_5,resnext50_32x4d,wide_resnet50_2,densenet121,squeezenet1_1,vgg11_bn,googlenet,"
    "convnext_tiny,efficientnet_v2_s,alexnet"
)


def _with_data_statistics(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """BatchNorm running statistics as the cumulative average over ``x`` (random weights)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for batch in x.split(16):
            model(batch)
    return model.eval()


def sweep_row(arch: str, x: torch.Tensor, y: torch.Tensor, size: int, budget: float, seed: int) -> str:
    from gslim.compress.select import compress_model
    from gslim.models import build_architecture, count_macs_params
    from gslim.recipe import CompressConfig

    torch.manual_seed(seed)
    model = _with_data_statistics(build_architecture(arch, 10), x)
    cfg = CompressConfig(criterion="greedy", target_macs=budget, round_to=8, seed=seed)
    err = io.StringIO()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            res = compress_model(model, size, x, y, cfg, batch_size=16)
    except Exception as exc:  # a row, not a stop: the sweep is for finding these
        return (
            f"| {arch} | {budget:.0%} | {seed} | FAILED: {type(exc).__name__}: {str(exc)[:120]} | | | | | |"
        )
    seconds = time.perf_counter() - t0
    before, after = count_macs_params(model, size)[0], count_macs_params(res.model, size)[0]
    warned = sorted({str(w.message)[:60] for w in caught})
    stderr_lines = len([line for line in err.getvalue().splitlines() if line.strip()])
    return (
        f"| {arch} | {budget:.0%} | {seed} | {seconds:.1f} | {after / before:.1%} | {len(res.widths)} | "
        f"{len(res.skipped)} | {'; '.join(warned) or '-'} | {stderr_lines} |"
    )


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=ARCHS)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--budgets", default="0.5,0.7")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from selection_speed import calibration

    x, y, desc = calibration(a.images, a.size, "auto")
    budgets = [float(b) for b in a.budgets.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    if len(budgets) != len(seeds):
        ap.error("--budgets and --seeds are paired: give as many of each")
    print(f"{a.images} images at {a.size} px ({desc}), greedy, {a.threads} thread(s)\n")
    print(
        "| model | MACs budget | seed | seconds | MACs kept | units narrowed | left alone | warnings | stderr lines |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for arch in [s.strip() for s in a.archs.split(",") if s.strip()]:
        for budget, seed in zip(budgets, seeds):
            print(sweep_row(arch, x, y, a.size, budget, seed), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
