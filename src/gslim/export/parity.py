"""Numerical parity of exported artifacts: ONNX Runtime vs PyTorch, with explicit tolerances.

A runner (a backend of :mod:`gslim.runtime`: ONNX Runtime CPU here, TensorRT in
:mod:`gslim.export.tensorrt`) is a context manager with ``infer(batch) -> logits``, so sessions and device memory are always released. The
comparison is the same for every artifact: max and mean absolute difference of the logits,
top-1 agreement, and the largest reference logit (the scale relative tolerances use).

A tolerance is scaled by ``max(1, max|reference logit|)`` (``relative=True``, the default):
floating point errs in proportion to the magnitude of the values it carries, so a fixed
absolute bound fails healthy exports of confident models (a ResNet-50 with logits of ~20
differs from ONNX Runtime by ~1e-4 in FP32) while the floor of 1 keeps the bound absolute
for the usual logit range. ``relative=False`` gives a strictly absolute bound.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from gslim.errors import GslimError

#: FP32 ONNX vs PyTorch: both compute in FP32; only op order and fusions differ (observed:
#: 1e-6..2e-5 at logit scale ~1, about 5e-6 of the logit scale in general).
FP32_TOLERANCE = 1e-4
#: FP16 ONNX vs PyTorch (relative to max(1, max|logit|)): FP16 keeps 11 significant bits
#: (unit roundoff 4.9e-4); rounding every weight and activation through ~20-50 layers grows
#: that to a few 1e-3 of the logit scale, so 1e-2 passes healthy conversions with margin and
#: still fails overflow, a wrong cast or a broken kernel, which err by whole units.
FP16_TOLERANCE = 1e-2
#: Batch sizes that a dynamic-batch file must accept (the issue's "batch 1 and batch 8").
CHECK_BATCHES = (1, 8)


def ort_cpu(path: Path, threads: Optional[int] = None):
    """The ONNX Runtime CPU backend of the runtime layer (:mod:`gslim.runtime`) for a check:
    ``with ort_cpu(p) as r: r.infer(x)``; ``threads`` defaults to torch's intra-op setting."""
    from gslim.runtime import BackendOptions, OrtCPU
    from gslim.runtime.base import host_threads

    return OrtCPU(Path(path), BackendOptions(threads=threads or host_threads(), fit_batches=False))


def compare(reference: np.ndarray, output: np.ndarray) -> dict:
    """Max/mean absolute difference, top-1 agreement and reference scale of two (N, classes) arrays."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if ref.shape != out.shape:
        raise GslimError(f"output shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}")
    finite = bool(np.isfinite(out).all())
    diff = np.abs(ref - out)
    return {
        "max_abs_diff": float(diff.max()) if finite else math.inf,
        "mean_abs_diff": float(diff.mean()) if finite else math.inf,
        "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
        "max_abs_reference": float(np.abs(ref).max()),
        "finite": finite,
    }


def limit_for(tolerance: float, max_abs_reference: float, relative: bool) -> float:
    return tolerance * max(1.0, max_abs_reference) if relative else tolerance


def batch_plan(
    n: int,
    batch_size: int,
    static_batch: Optional[int],
    check_batches: Iterable[int] = CHECK_BATCHES,
    max_batch: Optional[int] = None,
    min_batch: int = 1,
) -> list[np.ndarray]:
    """Index arrays to run: the check batch sizes first (cycling images if there are fewer),
    then every image in chunks of ``batch_size``. A static batch pads its last chunk by cycling."""
    if n < 1:
        raise GslimError("parity needs at least one image")
    plans: list[np.ndarray] = []
    if static_batch is not None:
        for start in range(0, n, static_batch):
            plans.append(np.arange(start, start + static_batch) % n)
        return plans
    hi = max_batch or max([batch_size, *check_batches])
    for b in check_batches:
        if min_batch <= b <= hi:
            plans.append(np.arange(b) % n)
    step = max(min_batch, min(batch_size, hi))
    for start in range(0, n, step):
        idx = np.arange(start, min(start + step, n))
        if len(idx) < min_batch:
            idx = np.arange(start, start + min_batch) % n
        plans.append(idx)
    return plans


def torch_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """FP32 CPU eval-mode logits of ``model`` (the caller's training flag is restored)."""
    m = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    p = next(m.parameters(), None)
    if p is not None and (p.device.type != "cpu" or p.dtype != torch.float32):
        import copy

        m = copy.deepcopy(m).cpu().float()
    was_training = m.training
    m.eval()
    outs = []
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                outs.append(m(images[start : start + batch_size].cpu().float()).float().numpy())
    finally:
        m.train(was_training)
    return np.concatenate(outs)


def run_plan(infer, images: torch.Tensor, plan: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Run ``infer`` over the plan; returns (image index per row, output rows, batch sizes run)."""
    rows, outs, sizes = [], [], []
    for idx in plan:
        out = infer(images[torch.as_tensor(idx)])
        if out.shape[0] != len(idx):
            raise GslimError(f"the runtime returned {out.shape[0]} rows for a batch of {len(idx)}")
        rows.append(idx)
        outs.append(out)
        sizes.append(int(len(idx)))
    return np.concatenate(rows), np.concatenate(outs), sorted(set(sizes))


def onnx_parity(
    model: nn.Module,
    onnx_path: Path,
    images: torch.Tensor,
    *,
    tolerance: float,
    batch_size: int = 32,
    relative: bool = True,
    raise_on_fail: bool = True,
    label: str = "ONNX",
    threads: Optional[int] = None,
) -> dict:
    """Compare ONNX Runtime (CPU) on ``onnx_path`` with the PyTorch model on ``images``.

    A dynamic-batch file also runs batch 1 and batch 8. Raises :class:`GslimError` (one line)
    when the max abs difference exceeds ``tolerance`` x ``max(1, max|logit|)`` (just
    ``tolerance`` with ``relative=False``) unless ``raise_on_fail`` is False; the returned
    dict always says ``passed``.
    """
    if images.ndim != 4 or images.shape[0] < 1:
        raise GslimError(f"parity images must be a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    if tolerance <= 0:
        raise GslimError(f"parity tolerance must be positive, got {tolerance}")
    images = images.detach().cpu().float().contiguous()
    reference = torch_logits(model, images, batch_size)
    with ort_cpu(onnx_path, threads) as runner:
        plan = batch_plan(images.shape[0], batch_size, runner.fixed_batch)
        rows, outputs, sizes = run_plan(runner.infer, images, plan)
    stats = compare(reference[rows], outputs)
    return finish_report(
        stats,
        label=label,
        path=Path(onnx_path),
        images=int(images.shape[0]),
        batch_sizes=sizes,
        tolerance=tolerance,
        relative=relative,
        raise_on_fail=raise_on_fail,
        against="PyTorch",
        runtime="onnxruntime CPUExecutionProvider",
    )


def finish_report(
    stats: dict,
    *,
    label: str,
    path: Path,
    images: int,
    batch_sizes: list[int],
    tolerance: Optional[float],
    relative: bool,
    raise_on_fail: bool,
    against: str,
    runtime: str,
    min_top1: Optional[float] = None,
) -> dict:
    """Add the verdict to ``stats``; raise the one-line error when it failed and that is wanted."""
    limit = limit_for(tolerance, stats["max_abs_reference"], relative) if tolerance is not None else None
    ok_diff = stats["finite"] and (limit is None or stats["max_abs_diff"] <= limit)
    ok_top1 = min_top1 is None or stats["top1_agreement"] >= min_top1
    report = {
        "path": str(path),
        "runtime": runtime,
        "reference": against,
        "images": images,
        "batch_sizes": batch_sizes,
        # NaN/inf outputs are recorded as null (JSON has no infinity) with finite=False
        **{
            k: (stats[k] if math.isfinite(stats[k]) else None)
            for k in ("max_abs_diff", "mean_abs_diff", "top1_agreement", "max_abs_reference")
        },
        "finite": stats["finite"],
        "tolerance": tolerance,
        "tolerance_kind": "relative" if relative else "absolute",
        "effective_limit": limit,
        "min_top1_agreement": min_top1,
        "passed": bool(ok_diff and ok_top1),
    }
    if not report["passed"]:
        report["error"] = failure_message(report, label)
        if raise_on_fail:
            raise GslimError(report["error"])
    return report


def failure_message(report: dict, label: str) -> str:
    name = Path(report["path"]).name
    if not report["finite"]:
        return (
            f"{label} parity failed for {name}: the outputs contain NaN or infinity "
            f"(top-1 agreement {report['top1_agreement']:.1%} over {report['images']} images)"
        )
    tail = (
        f"(mean {report['mean_abs_diff']:.2e}, top-1 agreement {report['top1_agreement']:.1%} "
        f"over {report['images']} images)"
    )
    limit = report["effective_limit"]
    if limit is not None and report["max_abs_diff"] > limit:
        scaled = report["tolerance_kind"] == "relative" and report["max_abs_reference"] > 1.0
        how = (
            f"{limit:.2e} (tolerance {report['tolerance']:g} x max|logit| {report['max_abs_reference']:.3g})"
            if scaled
            else f"the tolerance {report['tolerance']:g}"
        )
        return (
            f"{label} parity failed for {name}: "
            f"max |{report['runtime'].split()[0]} - {report['reference']}| = "
            f"{report['max_abs_diff']:.2e} exceeds {how} {tail}"
        )
    return (
        f"{label} parity failed for {name}: top-1 agreement {report['top1_agreement']:.1%} is below "
        f"{report['min_top1_agreement']:.0%} (max diff {report['max_abs_diff']:.2e}, "
        f"over {report['images']} images)"
    )
