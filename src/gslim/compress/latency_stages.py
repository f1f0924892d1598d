"""How much of a layer's isolated saving the whole network saves: two calibrations, averaged.

A layer timed alone pays what the network amortises or fuses away (ONNX Runtime CPU, for one,
reorders a lone conv's input and output into its blocked layout and back), so isolated savings
are not in-network savings. The ratio depends on two things, measured (ORT CPU 1 thread, 224 px):

- **how deep the cut**: probes with every unit cut alike save less per isolated millisecond the
  deeper they cut (MobileNetV2, every unit at 85/70/50/25%: 0.95, 0.91, 0.79, 0.77). The *depth
  map*: the probes' (isolated, in-network) savings, piecewise-linear through zero
  (:func:`savings_points`), applied to the total isolated saving.
- **where the cut is**: MobileNetV2 with each fifth of its units (in network order) cut to half
  alone saved 0.59-0.65 in-network ms per isolated ms in the first fifth (112 and 56 px) and
  1.26-1.29 in the last (7 px); MobileNetV3-large 0.32-0.46 at 112 px, 1.3-1.7 at 7 px. The
  knapsack cuts the early, high-resolution layers hardest, where the isolated table overstates
  the saving most, so the depth map alone predicted MobileNetV2 at 60% of its latency 11-17% too
  fast. The *stage model*: layers grouped by the pixel count of their input (small groups merged
  into a neighbour), one ratio per stage fitted by least squares on all probes (the uniform ones
  and one per stage, its units cut to a quarter), with a small ridge toward the pooled ratio.

Neither alone is right: on knapsack selections (MobileNetV2, MobileNetV3-large, EfficientNet-B0,
ResNet-18 at 60% and 35%; each calibration fitted twice; three sessions, 2-core Xeon;
benchmarks/latency_calibration.py) the depth map missed by 4.1-4.6% on average and by up to 17%,
the stage model (linear per stage: it cannot see that deep cuts save less) by 2.1-6.4% and up to
17%, too slow on the squeeze-excitation networks in two sessions; their mean by 2.7-3.6% and at
most 13%. The prediction is that mean. Both parts are linear in each layer's time or in the
total, so the knapsack's per-unit moves are priced like the whole model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import torch

from gslim.compress.budget import round_width, unit_round_to

if TYPE_CHECKING:  # pragma: no cover
    from gslim.compress.latency import LatencyModel, _Layer

ALPHA_RANGE = (0.1, 3.0)  # a ratio outside it is noise: a probe slower than the base, or implausibly fast
MIN_STAGE_SHARE = 0.1  # of the isolated time of the layers that change: smaller stages merge
RIDGE = 0.05  # toward the pooled ratio, relative to each stage's own probe's squared saving
# a stage probe cuts its units to a quarter: at half width one stage saved 6-14% of MobileNetV3-
# large, and two fits in a row disagreed by up to 0.15 in a ratio; at a quarter, 0.06 (one pair)
STAGE_CUT = 0.25


def layer_stages(
    layers: list["_Layer"], layer_ms: list[float], min_share: Optional[float] = None
) -> list[int]:
    """Each layer's stage: layers grouped by their input's pixel count, largest maps first; a
    group with less than ``min_share`` of the layers' isolated time joins the next smaller one
    (the last such joins the one before it)."""
    min_share = MIN_STAGE_SHARE if min_share is None else min_share
    pixels = sorted({ly.shape.hw[0] * ly.shape.hw[1] for ly in layers}, reverse=True)
    total = sum(layer_ms) or 1.0
    share = {
        p: sum(t for ly, t in zip(layers, layer_ms) if ly.shape.hw[0] * ly.shape.hw[1] == p) for p in pixels
    }
    groups: list[list[int]] = []
    acc: list[int] = []
    for p in pixels:
        acc.append(p)
        if sum(share[q] for q in acc) >= min_share * total:
            groups.append(acc)
            acc = []
    if acc:
        if groups:
            groups[-1].extend(acc)
        else:
            groups.append(acc)
    stage_of_pixels = {p: s for s, g in enumerate(groups) for p in g}
    return [stage_of_pixels[ly.shape.hw[0] * ly.shape.hw[1]] for ly in layers]


def savings_points(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(isolated, in-network) savings of the uniform probes as a usable depth map: sorted, only
    probes that saved something in isolation, each piece's slope kept in ALPHA_RANGE (a probe that
    timed slower than the base, or faster than plausible, is noise), so the map rises."""
    lo, hi = ALPHA_RANGE
    out: list[tuple[float, float]] = []
    for x, y in sorted(p for p in points if p[0] > 1e-9):
        x0, y0 = out[-1] if out else (0.0, 0.0)
        if x - x0 <= 1e-9:
            continue
        out.append((x, y0 + min(max((y - y0) / (x - x0), lo), hi) * (x - x0)))
    return out


def fit_alphas(iso: list[list[float]], saved: list[float], stages: int) -> tuple[list[float], float]:
    """Per-stage ratios from probes: ``iso[p][s]`` the isolated saving of probe p in stage s,
    ``saved[p]`` its measured in-network saving. Least squares with a ridge toward the pooled
    ratio (the slope of saved over the total isolated saving); each ratio kept in ALPHA_RANGE.
    Returns (per-stage ratios, pooled ratio)."""
    lo, hi = ALPHA_RANGE
    x = torch.tensor(iso, dtype=torch.float64).reshape(len(iso), stages)
    y = torch.tensor(saved, dtype=torch.float64)
    tot = x.sum(1)
    den = float(tot @ tot)
    pooled = min(max(float(tot @ y) / den, lo), hi) if den > 0 else 1.0
    scale = x.max(0).values.clamp_min(1e-12)  # each stage's largest probe saving
    d = torch.diag(RIDGE * scale**2)
    a = torch.linalg.solve(x.T @ x + d, x.T @ y + d @ torch.full((stages,), pooled, dtype=torch.float64))
    return [min(max(float(v), lo), hi) for v in a], pooled


def probe_widths(
    lm: "LatencyModel", units: list, round_to: int, min_width: int, fractions
) -> dict[str, dict]:
    """The probes' widths: every unit at each of ``fractions``, then for each stage the units
    whose saving lies mostly in it at STAGE_CUT of their width."""

    def cut(u, f: float) -> int:
        return round_width(int(math.ceil(f * u.width)), u.width, unit_round_to(round_to, u.atom), min_width)

    out = {f"probe{round(100 * f)}": {u.name: cut(u, f) for u in units} for f in fractions}
    full = {u.name: u.width for u in units}
    owned: dict[int, list] = {}
    for u in units:
        per_stage = lm.stage_deltas({**full, u.name: cut(u, STAGE_CUT)})
        if min(per_stage) < 0:
            owned.setdefault(min(range(len(per_stage)), key=per_stage.__getitem__), []).append(u)
    for s, us in sorted(owned.items()):
        out[f"stage{s}"] = {**full, **{u.name: cut(u, STAGE_CUT) for u in us}}
    return out


def calibrate(lm: "LatencyModel", model, units, input_size, settings, round_to, min_width, fractions) -> None:
    """Fit ``lm``'s per-stage ratios on probe models timed interleaved with the full model
    (first channels kept: only shapes matter); cached in the table under the model's key."""
    from gslim.compress import latency_table
    from gslim.compress.slim import first_channels_copy

    key = latency_table.model_key(model, input_size) + f":stages:{round_to}:{min_width}:{lm.align}"
    stored = lm.table.models.get(key)
    if isinstance(stored, dict) and len(stored.get("alphas", ())) == lm.stages and "savings" in stored:
        lm.alphas, lm.alpha, lm.full_ms = stored["alphas"], stored["pooled"], stored["full_ms"]
        lm.savings, lm.probes = [tuple(p) for p in stored["savings"]], stored["probes"]
        return
    widths = probe_widths(lm, units, round_to, min_width, fractions)
    probes = {label: first_channels_copy(model, units, w) for label, w in widths.items()}
    m = latency_table.measure_model(model, input_size, settings, others=probes)
    iso = {k: [-v for v in lm.stage_deltas(w)] for k, w in widths.items()}
    saved = {k: m["model"] - m[k] for k in widths}
    lm.alphas, lm.alpha = fit_alphas([iso[k] for k in widths], [saved[k] for k in widths], lm.stages)
    lm.savings = savings_points([(sum(iso[k]), saved[k]) for k in widths if k.startswith("probe")])
    lm.full_ms = m["model"]
    lm.probes = [
        {
            "label": k,
            "measured_ms": m[k],
            "isolated_saving_ms": sum(iso[k]),
            "predicted_ms": lm.predict({**lm.full, **w}),
        }
        for k, w in widths.items()
    ]
    record: dict[str, Any] = {
        "alphas": lm.alphas,
        "pooled": lm.alpha,
        "savings": [list(p) for p in lm.savings],
        "full_ms": lm.full_ms,
        "probes": lm.probes,
    }
    lm.table.models[key] = record
    lm.table.save()
