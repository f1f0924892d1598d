"""The width knapsack's front merge: one sort by cost against the three-key sort, on the
allocations a real compress asks for.

    python benchmarks/knapsack_speed.py [--archs mobilenet_v2,mobilenet_v3_large,resnet50] \
        [--budgets 50%,30%] [--repeats 3]

For each model and MACs budget, one greedy ``compress_model`` (random-init torchvision weights,
64 Gaussian images at 32 px: the allocation's inputs are the units' options, error curves and
costs, whose sizes do not depend on the resolution) records every call of
:func:`gslim.compress.allocate.solve_separable`; then those calls are replayed with gslim's
front merge and with the plain one (every pair sorted by cost, error and option, as
``tests/test_latency.py`` spells it), alternated, and the medians printed with whether the two
chose the same widths. The allocation runs on the host whatever the device, so on a GPU these
seconds are not hidden behind the statistics.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def plain_front(cost, err, cu, eu, capacity):
    K = len(cu)
    c = (cost[:, None] + cu[None, :]).ravel()
    e = (err[:, None] + eu[None, :]).ravel()
    prev, opt = np.repeat(np.arange(len(cost)), K), np.tile(np.arange(K), len(cost))
    fits = c <= capacity + 1e-12 * max(1.0, abs(capacity))
    if not fits.any():
        return None
    c, e, prev, opt = c[fits], e[fits], prev[fits], opt[fits]
    order = np.lexsort((-opt, e, c))
    c, e, prev, opt = c[order], e[order], prev[order], opt[order]
    best_before = np.minimum.accumulate(np.concatenate(([np.inf], e[:-1])))
    on = e < best_before - 1e-15
    return c[on], e[on], prev[on], opt[on]


def record(arch: str, budget: float) -> list:
    import gslim.compress.allocate as allocate
    from gslim.compress.select import compress_model
    from gslim.models import build_architecture
    from gslim.recipe import CompressConfig

    calls, solve = [], allocate.solve_separable

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return solve(*args, **kwargs)

    allocate.solve_separable = recording
    try:
        torch.manual_seed(0)
        model = build_architecture(arch, 1000).eval()
        x = torch.randn(64, 3, 32, 32)
        y = torch.zeros(64, dtype=torch.long)
        cfg = CompressConfig(criterion="greedy", target_macs=budget, round_to=8, bn_recalib=False)
        compress_model(model, 32, x, y, cfg, seed=0, batch_size=64)
    finally:
        allocate.solve_separable = solve
    return calls


def replay(calls: list, merge) -> tuple[float, list]:
    import gslim.compress.allocate as allocate

    kept, allocate._merged_front = allocate._merged_front, merge
    try:
        t0 = time.perf_counter()
        out = [allocate.solve_separable(*a, **k) for a, k in calls]
        return time.perf_counter() - t0, out
    finally:
        allocate._merged_front = kept


def main() -> None:
    import gslim.compress.allocate as allocate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="mobilenet_v2,mobilenet_v3_large,resnet50")
    ap.add_argument("--budgets", default="50%,30%")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gslim_merge = allocate._merged_front
    print("| model | budget | units | calls | front merge (s) | three-key sort (s) | ratio | same widths |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for arch in a.archs.split(","):
        for b in a.budgets.split(","):
            frac = float(b.rstrip("%")) / 100 if b.endswith("%") else float(b)
            calls = record(arch, frac)
            fast, plain, same = [], [], True
            for _ in range(a.repeats):  # alternated: the machine's drift hits both
                t, out_fast = replay(calls, gslim_merge)
                fast.append(t)
                t, out_plain = replay(calls, plain_front)
                plain.append(t)
                same = same and out_fast == out_plain
            f, p = statistics.median(fast), statistics.median(plain)
            units = len(calls[0][0][0]) if calls else 0
            print(f"| {arch} | {b} | {units} | {len(calls)} | {f:.3f} | {p:.3f} | {p / f:.2f}x | {same} |")


if __name__ == "__main__":
    main()
