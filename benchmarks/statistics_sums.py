"""Two costs of the greedy's statistics, each against the way it was formed before (#13).

    python benchmarks/statistics_sums.py [--part grams,planning] [--widths 448,576,960,1152,1280,1536,2304]
        [--archs resnet18,resnet50,mobilenet_v2] [--images 256] [--size 224] [--rounds 2] [--threads 2]

* ``grams``: a Gram of ``16 x width`` rows added in 4 batches and completed
  (``gslim.compress.sums._Sums``), as one product per batch against the current blocking (upper
  blocks from ``MIN_BLOCKED`` columns on, mirrored once), interleaved, medians of ``--rounds``
  (at least 3); the largest entry difference relative to the largest entry.
* ``planning``: the planning pass (``gslim.compress.planning.planning_curves``: one pass of the
  original network, every unit's statistics and curve) with each consumer's cross term B summed
  from its rows against B = G W from its own weights, interleaved, medians; random-init weights,
  Gaussian images, 50% MACs; the largest difference of a curve point relative to the curve's
  largest value. Host memory is kept (``GSLIM_HOST_MEMORY=keep``) as ``selection_speed.py`` does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def _median_pair(a: Callable[[], object], b: Callable[[], object], rounds: int) -> tuple[float, float, list]:
    ta, tb, outs = [], [], []
    for _ in range(rounds):
        for f, ts in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            outs.append(f())
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), outs[-2:]


def gram_rows(widths: list[int], rounds: int) -> list[str]:
    from gslim.compress.sums import _Sums

    def build(X: torch.Tensor, blocked: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            s = _Sums()
            if not blocked:
                s.MIN_BLOCKED = 1 << 30  # (an instance attribute: one product per batch)
            for xb in X.split(-(-X.shape[0] // 4)):
                s.add(xb, xb[:, :8])
            s.complete()
            return s.G

        return run

    out = [
        "| columns | rows | one product ms | blocked ms | ratio | max diff (rel.) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for F in widths:
        X = torch.randn(16 * F, F, generator=torch.Generator().manual_seed(F))
        one, blk, (G1, G2) = _median_pair(build(X, False), build(X, True), max(rounds, 3))
        diff = float((G1 - G2).abs().max() / G1.abs().max())
        out.append(f"| {F} | {16 * F} | {1e3 * one:.0f} | {1e3 * blk:.0f} | {blk / one:.2f} | {diff:.1e} |")
    return out


def planning_rows(archs: list[str], images: int, size: int, rounds: int) -> list[str]:
    import torchvision

    from gslim.compress import planning
    from gslim.compress.units import find_units
    from gslim.recipe import CompressConfig

    cfg = CompressConfig(criterion="greedy", target_macs=0.5)
    out = [
        "| model | B from the rows s | B = G W s | ratio | max curve diff (rel.) |",
        "|---|---:|---:|---:|---:|",
    ]
    real = planning.own_weights
    for arch in archs:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(num_classes=1000).eval()
        x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1))
        graph = find_units(model, size, include_residual=False)
        batches = list(x.split(64))
        with torch.no_grad():
            model(batches[0])  # warm-up

        def run(own: Callable) -> Callable[[], dict]:
            def go() -> dict:
                planning.own_weights = own
                try:
                    gen = torch.Generator().manual_seed(0)
                    return planning.planning_curves(model, graph, graph.units, batches, cfg, gen)
                finally:
                    planning.own_weights = real

            return go

        rows_s, gw_s, (a, b) = _median_pair(run(lambda *args: None), run(real), rounds)
        diff = max(
            float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max() / max(abs(v) for v in a[k] + [1e-12]))
            for k in a
        )
        out.append(f"| {arch} | {rows_s:.2f} | {gw_s:.2f} | {gw_s / rows_s:.2f} | {diff:.1e} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="grams,planning")
    ap.add_argument("--widths", default="448,576,960,1152,1280,1536,2304")
    ap.add_argument("--archs", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    parts = args.part.split(",")
    if not parts or set(parts) - {"grams", "planning"}:
        ap.error(f"--part: a comma-separated list of grams and planning (got {args.part!r})")
    from gslim.host_memory import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, medians of {args.rounds} interleaved rounds\n")
    if "grams" in parts:
        print("\n".join(gram_rows([int(w) for w in args.widths.split(",")], args.rounds)) + "\n")
    if "planning" in parts:
        archs = [a for a in args.archs.split(",") if a]
        print(f"planning pass: {args.images} images at {args.size} px")
        print("\n".join(planning_rows(archs, args.images, args.size, args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
