"""Where a greedy selection's forward passes go: each phase of ``compress_model`` timed, in
``selection_speed.py``'s setting (random weights, 1000 classes, 50% MACs, ``round_to`` 8, BatchNorm
re-calibration off, Fashion-MNIST images resized, host memory kept), in units of one plain forward
pass over the same images (the model as built: planar, BatchNorm a layer of its own); "rewritten
passes" are in units of one pass the way the selection runs the network (``fast_passes``:
BatchNorm folded into its conv, channels-last on a CPU).

    python benchmarks/selection_phases.py [--archs mobilenet_v2,mobilenet_v3_large,resnet18,resnet50] \
        [--images 256] [--size 224] [--threads 2]

Phases: the planning pass (the original network once: error curves and the walk's targets), the
walk (the pruned network once, unit by unit: statistics, OMP, re-fit, surgery), the knapsack;
across both, the statistics' sums (``StatsAccumulator.add`` / ``add_dense``) and the OMP paths.
"kernel s" is the selection's system CPU time (on a VM mostly the first touch of memory the
process had not used before); "peak RSS MB" the process's peak so far, so a model's own only when
it runs first (``--archs`` one model). "other" is what is left above two plain passes: the
statistics and the OMP subtracted, so it is the network's own time above its floor (a walk's
pass is not a plain pass: full-width producers, kept values, checks) and the set-up. The floor
is 2 (the original and the pruned network each see the data once); #13's targets are <= 3 for the MobileNets and <= 4 for the ResNets.
"""

from __future__ import annotations

import argparse
import collections
import functools
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES: collections.Counter = collections.Counter()


def _timed(owner, name: str, phase: str) -> Callable[[], None]:
    """Wrap ``owner.name`` so that its seconds add to ``PHASES[phase]``; returns the undo."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[phase] += time.perf_counter() - t0

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, fn)


def phases(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, size: int) -> dict:
    """One greedy selection of ``model`` with its phases timed (seconds)."""
    import gslim.compress.budget as budget_mod
    import gslim.compress.omp as omp
    import gslim.compress.select as select
    import gslim.compress.sums as sums
    from gslim.recipe import CompressConfig

    undo = [
        _timed(select, "planning_curves", "planning pass"),
        _timed(budget_mod, "knapsack_widths", "knapsack"),
        _timed(omp, "_greedy_select", "OMP paths"),  # (greedy_select looks it up at each call)
        _timed(sums.StatsAccumulator, "add", "statistics sums"),
        _timed(sums.StatsAccumulator, "add_dense", "statistics sums"),
    ]
    PHASES.clear()
    kernel0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    try:
        cfg = CompressConfig(criterion="greedy", target_macs=0.5, round_to=8, bn_recalib=False)
        res = select.compress_model(model, size, x, y, cfg, seed=0, batch_size=64)
    finally:
        for u in undo:
            u()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {k: PHASES[k] for k in ("planning pass", "knapsack", "statistics sums", "OMP paths")}
    # (kernel time is mostly first touches of memory the process had not used yet: page faults)
    out["kernel s"], out["peak RSS MB"] = usage.ru_stime - kernel0, usage.ru_maxrss / 1024
    out["selection"] = res.seconds
    out["walk"] = res.seconds - out["planning pass"] - out["knapsack"]
    return out


def rewritten_forward_seconds(model: torch.nn.Module, x: torch.Tensor, size: int) -> float:
    """One pass as the selection's passes run the network (compress/fast_passes.py: BatchNorm
    folded into its conv, channels-last images on a CPU), every foldable pair folded."""
    from selection_speed import forward_seconds

    from gslim.compress.fast_passes import foldable_pairs, folded_batchnorm, statistics_layout
    from gslim.compress.units import trace

    with folded_batchnorm([model], foldable_pairs(trace(model, size))):
        return forward_seconds(model, statistics_layout(x))


def in_passes(seconds: dict, forward_s: float) -> dict:
    """The phases in forward passes; "other" = the selection less two passes, the sums, the OMP
    and the knapsack."""
    out = {k: v / forward_s for k, v in seconds.items() if k not in ("kernel s", "peak RSS MB")}
    out["other"] = out["selection"] - 2 - out["statistics sums"] - out["OMP paths"] - out["knapsack"]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="mobilenet_v2,mobilenet_v3_large,resnet18,resnet50")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from gslim.host_memory import keep_freed_memory

    keep_freed_memory()  # first: before the images and models exist (as selection_speed.py)
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore")
    from selection_speed import calibration, forward_seconds

    from gslim.models import build_architecture

    x, y, desc = calibration(a.images, a.size, "auto")
    cols = ["planning pass", "walk", "knapsack", "statistics sums", "OMP paths", "other"]
    print(f"{a.images} images at {a.size} px ({desc}), 50% MACs, {a.threads} thread(s); in forward passes\n")
    print(
        "| model | forward s | rewritten pass s | selection s | passes | rewritten passes | "
        + " | ".join(cols)
        + " | kernel s | peak RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * (len(cols) + 2))
    for arch in [s.strip() for s in a.archs.split(",") if s.strip()]:
        torch.manual_seed(0)
        model = build_architecture(arch, 1000).eval()
        before = forward_seconds(model, x)
        seconds = phases(model, x, y, a.size)
        fwd = (before + forward_seconds(model, x)) / 2  # the mean of one before and one after
        fast = rewritten_forward_seconds(model, x, a.size)
        r = in_passes(seconds, fwd)
        print(
            f"| {arch} | {fwd:.2f} | {fast:.2f} | {seconds['selection']:.2f} | {r['selection']:.2f} | "
            + f"{seconds['selection'] / fast:.2f} | "
            + " | ".join(f"{r[c]:.2f}" for c in cols)
            + f" | {seconds['kernel s']:.2f} | {seconds['peak RSS MB']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
