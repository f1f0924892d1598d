"""Where a greedy selection's time goes: a cProfile of ``compress_model`` and, on CUDA, the host
syncs it makes (each one stalls the host until the GPU has drained its queue).

    python benchmarks/selection_profile.py --arch mobilenet_v2 --size 224 --images 128   # prints a table

``benchmarks/device_check.py`` runs :func:`profile_selection` as its ``profile`` step on a lent GPU,
where the selection was found host-bound (BENCHMARKS "The first GPU run"). The numbers are
diagnostics, not timings to quote: cProfile slows every Python call.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import time
import warnings
from typing import Optional

import torch


def _top_functions(prof: cProfile.Profile, n: int) -> list[dict]:
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(filename.split("/")[-2:])
        rows.append(
            {"function": f"{short}:{line}({name})", "calls": calls, "tottime": tottime, "cumtime": cumtime}
        )
    rows.sort(key=lambda r: -r["tottime"])
    return [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows[:n]]


def profile_selection(
    model: torch.nn.Module, x: torch.Tensor, size: int, budget: float, top: int = 25
) -> dict:
    """One greedy selection of ``model`` to ``budget`` of its MACs on ``x`` (on x's device) under
    cProfile; on CUDA with torch's sync debug mode on, counting the host syncs by the line that
    made them. The model is not changed (compress_model works on a copy)."""
    from gslim.compress.select import compress_model
    from gslim.recipe import CompressConfig

    cuda = x.is_cuda
    prof = cProfile.Profile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        try:
            prof.enable()
            compress_model(model, size, x, None, CompressConfig(target_macs=budget), batch_size=64)
            if cuda:
                torch.cuda.synchronize()
        finally:
            prof.disable()
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        seconds = time.perf_counter() - t0
    syncs = collections.Counter(
        f"{'/'.join(w.filename.split('/')[-2:])}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message).lower()
    )
    return {
        "device": str(x.device),
        "seconds_under_profile": round(seconds, 2),
        "host_syncs": sum(syncs.values()),
        "sync_sites": [{"site": s, "count": c} for s, c in syncs.most_common(15)],
        "top_tottime": _top_functions(prof, top),
    }


def markdown(result: dict, arch: str) -> str:
    lines = [
        f"Selection profile, {arch} on {result['device']}: {result['seconds_under_profile']} s under "
        f"cProfile, {result['host_syncs']} host syncs",
        "",
        "| function | calls | tottime s | cumtime s |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['function']} | {r['calls']} | {r['tottime']} | {r['cumtime']} |" for r in result["top_tottime"]
    ]
    if result["sync_sites"]:
        lines += ["", "| host sync at | count |", "|---|---:|"]
        lines += [f"| {s['site']} | {s['count']} |" for s in result["sync_sites"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--host-memory",
        choices=("keep", "default"),
        default="keep",
        help="keep (as selection_speed.py): freed tensors stay in the process, no page faults per pass",
    )
    a = ap.parse_args(argv)
    if a.host_memory == "keep":  # first: before the images and the model exist
        from gslim.host_memory import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = torchvision.models.get_model(a.arch, weights=None, num_classes=10).to(dev).eval()
    x = torch.randn(a.images, 3, a.size, a.size, generator=torch.Generator().manual_seed(2)).to(dev)
    print(markdown(profile_selection(model, x, a.size, a.budget, a.top), a.arch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
