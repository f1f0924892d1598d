"""Selection speed at ImageNet size: gslim greedy vs greedy-loss vs Torch-Pruning, at 50% MACs.

    python benchmarks/selection_speed.py [--archs mobilenet_v2,mobilenet_v3_large,resnet18,resnet50,vgg11_bn]
        [--images 256] [--size 224] [--budget 50%] [--max-seconds 300] [--max-memory-gb 8]

Models have random weights and 1000 classes (selection cost does not depend on what the
weights learned). Calibration: ``--images`` Fashion-MNIST training images resized to
``--size`` (gslim's calibration loader; grey expanded to 3 channels, labels 0-9), or
Gaussian noise with random labels where Fashion-MNIST is not installed (``--data`` says
which was used). For each model, in one process:

* ``forward``: one plain forward pass over the calibration images (eval, no_grad, batch 64)
  — the unit every other time is divided by, so the ratios carry across machines. On Linux a
  batch of 64 at 224 px makes activations larger than glibc's mmap threshold, which the kernel
  zeroes on every pass; on a VM that can be most of the forward (``host_memory.py`` measures
  it). So by default (``--host-memory keep``) this process keeps freed blocks, as
  ``GSLIM_HOST_MEMORY=keep`` makes the CLI do, and the counts are the selection's own;
  ``--host-memory default`` times glibc as it starts (the tables in BENCHMARKS.md before
  2026-12-05 were measured that way unless they say otherwise);
* ``greedy``: ``compress_model`` (criterion greedy, target MACs, round_to 8) — wall time of
  selection + slimming, all included (planning pass, budget search, OMP, re-fit, surgery);
* ``greedy-loss``: the same with criterion greedy-loss, run in a child process with a
  ``--max-seconds`` wall-clock cut and an address-space cap of ``--max-memory-gb`` (it
  scores candidates in batches of ~4096 images, which at 224 px can exceed any sane cap).
  A cut run is reported as "> N s" with the number of units finished; beside it, an
  *estimate* from the exact count of candidate evaluations it would make times the measured
  per-image cost of the part of the network each evaluation runs (``estimate_s``);
* ``tp-magnitude`` / ``tp-taylor``: Torch-Pruning MetaPruner (round_to 8, final Linear
  ignored) at the pruning ratio whose fvcore MACs meet the budget (bisected first, not
  timed); the time is one importance + pruning step at that ratio, plus for Taylor the
  gradients over the calibration images.

Prints a markdown table and writes ``--json`` (default benchmarks/results/selection_speed.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import budget_fraction, log, tp_available, tp_prune  # noqa: E402

DEFAULT_ARCHS = "mobilenet_v2,mobilenet_v3_large,resnet18,resnet50,vgg11_bn"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=DEFAULT_ARCHS)
    ap.add_argument("--images", type=int, default=256, help="calibration images")
    ap.add_argument("--size", type=int, default=224, help="input resolution")
    ap.add_argument("--budget", default="50%", help="MACs budget (fraction of the base model)")
    ap.add_argument("--methods", default="greedy,greedy-loss,tp-magnitude,tp-taylor")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="greedy-loss wall-clock cut per model")
    ap.add_argument("--max-memory-gb", type=float, default=8.0, help="greedy-loss child address-space cap")
    ap.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--host-memory",
        choices=("keep", "default"),
        default="keep",
        help="keep: large freed tensors stay in the process (gslim.host_memory, GSLIM_HOST_MEMORY=keep), "
        "so neither the forward nor the selection is timed with the kernel zeroing fresh pages; "
        "default: glibc as it starts",
    )
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/selection_speed.json"))
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------ data


def calibration(n: int, size: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    from gslim.data import calibration_batch
    from gslim.recipe import DEFAULT_FASHION_MNIST, DataConfig

    if kind in ("auto", "fashion-mnist") and Path(DEFAULT_FASHION_MNIST).is_dir():
        cfg = DataConfig(kind="fashion-mnist", calib_images=n, workers=0, batch_size=64)
        x, y = calibration_batch(cfg, size, 1000, seed)
        return x, y, f"Fashion-MNIST, {n} training images resized to {size}x{size} (grey as 3 channels)"
    if kind == "fashion-mnist":
        raise SystemExit(f"Fashion-MNIST not found at {DEFAULT_FASHION_MNIST}")
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, size, size, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        f"synthetic N(0,1) images, {n} at {size}x{size}, random labels",
    )


@torch.no_grad()
def forward_seconds(model: nn.Module, x: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    model(x[:batch])  # warm-up at the timed batch size (ResNet-50: the first pass 10% slower otherwise)
    t0 = time.perf_counter()
    for xb in x.split(batch):
        model(xb)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ greedy-loss


def _greedy_loss_child(model, size, x, y, cfg, max_bytes, queue) -> None:
    from gslim.compress.select import compress_model

    if max_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    t0 = time.perf_counter()

    def progress(name, done, total):
        queue.put(("unit", name, done, total, time.perf_counter() - t0))

    try:
        res = compress_model(model, size, x, y, cfg, seed=0, batch_size=64, progress=progress)
        queue.put(("done", res.seconds))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which prints it
        queue.put(
            (
                "error",
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                time.perf_counter() - t0,
            )
        )


def run_greedy_loss(model, size, x, y, cfg, max_seconds: float, max_gb: float) -> dict:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    max_bytes = int(max_gb * 2**30) if max_gb > 0 else 0
    proc = ctx.Process(
        target=_greedy_loss_child, args=(model, size, x, y, cfg, max_bytes, queue), daemon=True
    )
    t0 = time.perf_counter()
    proc.start()
    out: dict[str, Any] = {"units_done": 0, "units": None}
    while True:
        remaining = max_seconds - (time.perf_counter() - t0)
        if remaining <= 0:
            break
        try:
            msg = queue.get(timeout=min(remaining, 5.0))
        except Exception:  # noqa: BLE001 - queue.Empty
            if not proc.is_alive() and queue.empty():
                out["status"] = "died"
                out["error"] = f"child exited with code {proc.exitcode}"
                break
            continue
        if msg[0] == "unit":
            out["units_done"], out["units"] = msg[2], msg[3]
            out["last_unit_s"] = msg[4]
        elif msg[0] == "done":
            out.update({"status": "done", "seconds": msg[1]})
            break
        else:
            out.update({"status": "error", "error": msg[1], "seconds_until_error": msg[2]})
            break
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        out.setdefault("status", "cut")
        out["cut_after_s"] = max_seconds
    proc.join(1)
    return out


def greedy_loss_estimate(model: nn.Module, size: int, cfg, fwd_per_image: float, images: int) -> dict:
    """Seconds greedy-loss would spend, from its exact count of candidate evaluations.

    It scores each candidate on ``loss_batch`` images by running the network from the
    unit's block onwards; per unit, step i scores min(sample, C - i) candidates with
    ``sample = loss_candidates or ceil(C / k * ln 100)``. The per-image cost of that part
    is its share of fvcore MACs times the measured full forward time per image (ignores
    the unit's own slimming, which makes later evaluations a little cheaper).
    """
    import logging

    from fvcore.nn import FlopCountAnalysis

    from gslim.compress import budget as budget_mod
    from gslim.compress.units import find_units

    work = copy.deepcopy(model).eval()
    graph = find_units(work, size, include_residual=False)
    units = graph.units
    cost = budget_mod.CostModel(work, graph, size, units)
    budget = budget_mod.resolve_budget(cost, cfg.target_macs, None)
    _, widths = budget_mod.uniform_widths(cost, budget, cfg.round_to, cfg.min_width)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        fca = FlopCountAnalysis(work, torch.zeros(1, 3, size, size))
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        by_mod = fca.by_module()
        total = fca.total()
    leaf = [n for n, m in work.named_modules() if n and not list(m.children())]
    order = {n: i for i, n in enumerate(leaf)}
    evals_total, seconds = 0, 0.0
    per_eval = min(cfg.loss_batch, images)
    for u in units:
        C, k = u.width, widths.get(u.name, u.width)
        if k >= C:
            continue
        sample = cfg.loss_candidates or max(1, math.ceil(C / k * math.log(100.0)))
        evals = sum(min(sample, C - i) for i in range(k))
        start = min(order.get(p, 0) for p in u.producers)
        rest = sum(by_mod.get(n, 0) for n in leaf[start:])
        evals_total += evals
        seconds += evals * per_eval * fwd_per_image * rest / max(total, 1)
    return {
        "candidate_evaluations": evals_total,
        "images_per_evaluation": per_eval,
        "estimate_s": seconds,
        "units": len(units),
    }


# ------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    host_memory = "glibc default"
    if args.host_memory == "keep":  # first: before the calibration images and models exist
        from gslim.host_memory import keep_freed_memory

        host_memory = keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore")
    from gslim.compress.select import compress_model
    from gslim.environment import environment_info
    from gslim.models import build_architecture, count_macs_params
    from gslim.recipe import CompressConfig

    frac = budget_fraction(args.budget)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ok, why = tp_available()
    skipped = {}
    if not ok:
        skipped = {m: why for m in methods if m.startswith("tp-")}
        methods = [m for m in methods if not m.startswith("tp-")]
    x, y, data_desc = calibration(args.images, args.size, args.data)
    log(f"calibration data: {data_desc}")
    report: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "environment": environment_info("cpu"),
        "threads": args.threads,
        "host_memory": host_memory,
        "data": data_desc,
        "images": args.images,
        "size": args.size,
        "budget": args.budget,
        "max_seconds": args.max_seconds,
        "max_memory_gb": args.max_memory_gb,
        "skipped": skipped,
        "rows": [],
    }
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        torch.manual_seed(0)
        model = build_architecture(arch, 1000).eval()
        base_macs, base_params = count_macs_params(model, args.size)
        fwd = forward_seconds(model, x)
        row: dict[str, Any] = {"arch": arch, "macs": base_macs, "params": base_params, "forward_s": fwd}
        log(f"[{arch}] {base_macs / 1e6:.0f} M MACs; one forward pass over {args.images} images: {fwd:.1f} s")
        cfg = CompressConfig(criterion="greedy", target_macs=frac, round_to=8, bn_recalib=False)
        if "greedy" in methods:
            res = compress_model(model, args.size, x, y, cfg, seed=0, batch_size=64)
            macs, _ = count_macs_params(res.model, args.size)
            row["greedy"] = {"seconds": res.seconds, "macs_fraction": macs / base_macs}
            # the forward pass again after the greedy, and their mean as the unit: on a shared
            # machine one measurement moved 14.5-19.0 s (ResNet-50) between runs minutes apart
            after = forward_seconds(model, x)
            row["forward_s_each"] = [fwd, after]
            fwd = row["forward_s"] = (fwd + after) / 2
            log(
                f"[{arch}] greedy: {res.seconds:.1f} s ({res.seconds / fwd:.1f} forward passes of "
                f"{fwd:.1f} s, the mean of one before and one after), MACs {100 * macs / base_macs:.1f}%"
            )
            del res
        if "greedy-loss" in methods:
            lcfg = cfg.model_copy(update={"criterion": "greedy-loss"})
            est = greedy_loss_estimate(model, args.size, lcfg, fwd / args.images, args.images)
            gl = run_greedy_loss(model, args.size, x, y, lcfg, args.max_seconds, args.max_memory_gb)
            gl.update({k: v for k, v in est.items() if k != "units"})
            gl["units"] = gl.get("units") or est["units"]
            row["greedy-loss"] = gl
            log(
                f"[{arch}] greedy-loss: {gl.get('status')} {gl.get('seconds') or gl.get('error') or ''} "
                f"(units {gl['units_done']}/{gl['units']}); estimate {est['estimate_s']:.0f} s "
                f"for {est['candidate_evaluations']:,} candidate evaluations x {est['images_per_evaluation']} images"
            )
        for m in [m for m in methods if m.startswith("tp-")]:
            t0 = time.perf_counter()
            pruned, info = tp_prune(model, m, args.size, x, y, frac * base_macs, 8, 64)
            macs, _ = count_macs_params(pruned, args.size)
            row[m] = {
                "seconds": info["select_s"],
                "gradient_s": info["gradient_s"],
                "search_s": time.perf_counter() - t0,
                "pruning_ratio": info["pruning_ratio"],
                "macs_fraction": macs / base_macs,
            }
            log(
                f"[{arch}] {m}: {info['select_s']:.1f} s at ratio {info['pruning_ratio']:.3f} "
                f"(MACs {100 * macs / base_macs:.1f}%; bisection {row[m]['search_s']:.0f} s, not counted)"
            )
            del pruned
        report["rows"].append(row)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
    print(markdown(report))
    return 0


def _cell(entry: Optional[dict], fwd: float, max_seconds: float) -> tuple[str, str]:
    if entry is None:
        return "—", "—"
    if "status" in entry:  # greedy-loss
        if entry["status"] == "done":
            s = entry["seconds"]
            return f"{s:.1f}", f"{s / fwd:.1f}"
        est = entry.get("estimate_s")
        tail = f"; est. {est:,.0f} s" if est else ""
        if entry["status"] == "cut":
            return (
                f"> {max_seconds:.0f} (cut after {entry['units_done']}/{entry['units']} units{tail})",
                f"> {max_seconds / fwd:.0f} (est. {est / fwd:,.0f})" if est else f"> {max_seconds / fwd:.0f}",
            )
        return (
            f"failed: {entry.get('error', '')[:80]} after {entry['units_done']}/{entry['units']} units{tail}",
            f"est. {est / fwd:,.0f}" if est else "—",
        )
    return f"{entry['seconds']:.1f}", f"{entry['seconds'] / fwd:.1f}"


def markdown(report: dict) -> str:
    head = [
        "model",
        "MACs",
        "forward s (before / after)",
        "greedy s",
        "×fwd (×faster fwd)",
        "greedy-loss s",
        "×fwd",
        "tp-magnitude s",
        "×fwd",
        "tp-taylor s",
        "×fwd",
        "greedy-loss / greedy",
    ]
    lines = [
        f"\n{report['images']} calibration images at {report['size']}x{report['size']} ({report['data']}), "
        f"budget {report['budget']} MACs, {report['threads']} thread(s), host memory "
        f"{report.get('host_memory', 'glibc default')}, {report['environment']['cpu']}\n",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for r in report["rows"]:
        fwd = r["forward_s"]
        each = r.get("forward_s_each")  # with the greedy: one forward before it and one after
        cells = [
            r["arch"],
            f"{r['macs'] / 1e6:.0f} M",
            f"{fwd:.1f}" + (f" ({each[0]:.1f} / {each[1]:.1f})" if each else ""),
        ]
        for m in ("greedy", "greedy-loss", "tp-magnitude", "tp-taylor"):
            cells += list(_cell(r.get(m), fwd, report["max_seconds"]))
        g, gl = r.get("greedy"), r.get("greedy-loss")
        if g and each:  # the conservative count beside the mean's: one forward can read up to 2x slow
            cells[4] += f" ({g['seconds'] / min(each):.1f})"
        ratio = "—"
        if g and gl:
            if gl.get("status") == "done":
                ratio = f"{gl['seconds'] / g['seconds']:.0f}x"
            elif gl.get("status") == "cut":
                ratio = f"> {report['max_seconds'] / g['seconds']:.0f}x (est. {gl['estimate_s'] / g['seconds']:,.0f}x)"
            elif gl.get("estimate_s"):
                ratio = f"est. {gl['estimate_s'] / g['seconds']:,.0f}x"
        cells.append(ratio)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
