"""Widths: a cost model of MACs/params as a function of unit widths, and the searches
that turn a global budget into per-unit widths.

MACs are counted the way fvcore counts them (one multiply-add per conv/linear weight
use, 2 per BatchNorm element), so the model agrees with the fvcore totals reported
at the end up to the width-independent remainder (pooling), which is added as an offset.

Channel counts are rounded *up* to a multiple of ``round_to`` (tensor-core and INT8
kernels run at multiples of 8 or 32; odd widths make real runtimes slower, not faster),
never below ``min_width`` and never above the original width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from gslim.compress.units import Unit, UnitGraph, layer_roles, shaped
from gslim.errors import GslimError


@dataclass
class _Layer:
    kind: str  # conv, dw, linear, bn
    in_unit: tuple[str, ...]  # the units among its input channels (several on a concatenation)
    out_unit: tuple[str, ...]
    cin: int
    cout: int
    groups: int
    kk: int
    spatial: int
    bias: bool


def _one(unit: Optional[str]) -> tuple[str, ...]:
    return (unit,) if unit is not None else ()


class CostModel:
    """MACs and parameters of the model for any assignment of unit widths."""

    def __init__(self, model: nn.Module, graph: UnitGraph, input_size: int, units: list[Unit]):
        from gslim.models import count_macs_params

        self.units = {u.name: u for u in units}
        self.full = {u.name: u.width for u in units}
        self.atom = {u.name: u.atom for u in units}
        reads, writes, carries = layer_roles(units)
        gm = shaped(graph, input_size)
        mods = dict(gm.named_modules())
        self.layers: list[_Layer] = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            mod = mods[node.target]
            shape = tuple(node.meta["tensor_meta"].shape)
            spatial = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
            name = node.target
            if isinstance(mod, nn.Conv2d):
                kk = mod.kernel_size[0] * mod.kernel_size[1]
                if name in carries:  # depthwise or grouped, carrying a unit
                    self.layers.append(
                        _Layer(
                            "dw",
                            tuple(carries[name]),
                            tuple(carries[name]),
                            mod.in_channels,
                            mod.out_channels,
                            mod.groups,
                            kk,
                            spatial,
                            mod.bias is not None,
                        )
                    )
                else:
                    self.layers.append(
                        _Layer(
                            "conv",
                            tuple(reads.get(name, ())),
                            _one(writes.get(name)),
                            mod.in_channels,
                            mod.out_channels,
                            mod.groups,
                            kk,
                            spatial,
                            mod.bias is not None,
                        )
                    )
            elif isinstance(mod, nn.Linear):
                self.layers.append(
                    _Layer(
                        "linear",
                        tuple(reads.get(name, ())),
                        _one(writes.get(name)),
                        mod.in_features,
                        mod.out_features,
                        1,
                        1,
                        # positions: 1 on a flat (N, C) input, H*W on a channels-last map (ConvNeXt)
                        int(torch.tensor(shape[1:-1]).prod()) if len(shape) > 2 else 1,
                        mod.bias is not None,
                    )
                )
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                u = tuple(carries.get(name, ()))
                self.layers.append(
                    _Layer("bn", u, u, mod.num_features, mod.num_features, 1, 1, spatial, True)
                )
        # the layers each unit's width reaches: a move of one unit re-prices only these
        self._of_unit = {
            u: [ly for ly in self.layers if u in ly.in_unit or u in ly.out_unit] for u in self.full
        }
        base_macs, base_params = count_macs_params(model, input_size)
        self.macs_offset = base_macs - self._macs(self.full)
        self.params_offset = base_params - self._params(self.full)

    def _w(self, widths: dict[str, int], units: tuple[str, ...], full: int) -> int:
        """The layer's width when its units have ``widths`` (the rest of its channels stay)."""
        return full + sum(widths.get(u, self.full[u]) - self.full[u] for u in units)

    def _layer_macs(self, ly: _Layer, widths: dict[str, int]) -> float:
        cin = self._w(widths, ly.in_unit, ly.cin)
        cout = self._w(widths, ly.out_unit, ly.cout)
        if ly.kind == "conv":
            return cout * (cin // ly.groups if ly.groups > 1 else cin) * ly.kk * ly.spatial
        if ly.kind == "dw":  # depthwise or grouped: the group width stays, groups go
            return cout * (ly.cin // ly.groups) * ly.kk * ly.spatial
        if ly.kind == "linear":
            return cin * cout * ly.spatial
        return 2 * cout * ly.spatial

    def _layer_params(self, ly: _Layer, widths: dict[str, int]) -> float:
        cin = self._w(widths, ly.in_unit, ly.cin)
        cout = self._w(widths, ly.out_unit, ly.cout)
        bias = cout if ly.bias else 0
        if ly.kind == "conv":
            return cout * (cin // ly.groups if ly.groups > 1 else cin) * ly.kk + bias
        if ly.kind == "dw":
            return cout * (ly.cin // ly.groups) * ly.kk + bias
        if ly.kind == "linear":
            return cin * cout + bias
        return 2 * cout

    def _macs(self, widths: dict[str, int]) -> float:
        return sum(self._layer_macs(ly, widths) for ly in self.layers)

    def _params(self, widths: dict[str, int]) -> float:
        return sum(self._layer_params(ly, widths) for ly in self.layers)

    def moves(self, metric: str, widths: dict[str, int], unit: str, ks: list[int]) -> list[float]:
        """MACs (or params) of the model with ``unit`` moved to each width of ``ks``, the others as
        in ``widths``: only the unit's layers are re-priced (the knapsack asks for every move of
        every unit, and pricing the whole model each time cost seconds on MobileNetV2)."""
        price = self._layer_macs if metric == "macs" else self._layer_params
        here = self.macs(widths) if metric == "macs" else self.params(widths)
        mine = self._of_unit[unit]
        rest = here - sum(price(ly, widths) for ly in mine)
        return [rest + sum(price(ly, {**widths, unit: k}) for ly in mine) for k in ks]

    def step(self, name: str, round_to: int) -> int:
        return unit_round_to(round_to, self.atom.get(name, 1))

    def macs(self, widths: dict[str, int]) -> float:
        return self._macs(widths) + self.macs_offset

    def params(self, widths: dict[str, int]) -> float:
        return self._params(widths) + self.params_offset


def width_options(full: int, round_to: int, min_width: int) -> list[int]:
    """Every width a unit may keep: multiples of ``round_to`` from the floor up, and ``full``."""
    return sorted(
        {round_width(k, full, round_to, min_width) for k in range(1, full + 1, max(round_to, 1))} | {full}
    )


def knapsack_widths(
    cost: CostModel,
    budget: Budget,
    curves: dict[str, list[float]],
    round_to: int,
    min_width: int,
    macs_weight: float = 0.0,
) -> dict[str, int]:
    """The least total greedy error (sum over units of the error curve) within the budget
    (:func:`gslim.compress.allocate.allocate`).

    ``macs_weight`` > 0 (latency budgets): the summed error curves are flat near their least
    value, and allocations within a hair of it keep MACs that differ by several percent for the
    same milliseconds. The knapsack is then solved twice: for the least summed error ``E0``, then
    with each unit's error lowered by ``macs_weight * E0 * (the share of the model's MACs the unit
    keeps at that width)``: weight 0.1 trades up to 1% more summed error for 10% of the model's
    MACs kept within the budget. A unit's share is priced with the other units at their least-error
    widths (exact where no layer reads two units, as in the MobileNets without their streams). The
    second allocation stands only if its summed error is within ``(1 + macs_weight) * E0`` and it
    keeps at least the first's MACs (an exact solve guarantees both; a linearised one may not)."""
    from gslim.compress.allocate import allocate

    options = {n: width_options(c, cost.step(n, round_to), min_width) for n, c in cost.full.items()}

    def error(name: str, k: int) -> float:
        curve = curves.get(name) or [0.0]
        # a tie-breaker far below any measured error: where a curve is flat (it reached its floor),
        # the wider width wins, so the budget is spent instead of left unused
        return curve[min(k, len(curve)) - 1] + 1e-7 * (1 - k / cost.full[name])

    def solve(err: Callable[[str, int], float]) -> dict[str, int]:
        try:
            return allocate(
                options,
                err,
                lambda w: budget.measure(cost, w),
                budget.target,
                moves=lambda w, u, ks: budget.moves(cost, w, u, ks),
            )
        except GslimError as exc:
            raise unreachable(budget, cost, {n: o[0] for n, o in options.items()}) from exc

    widths = solve(error)
    least = sum(error(n, k) for n, k in widths.items())
    if macs_weight <= 0 or least <= 0:
        return widths
    full_macs = cost.macs(cost.full)
    # MACs linearised around the least-error widths (one unit moved, the others where they are):
    # the second solve lands near them, and a layer that reads two units is priced where it will be
    kept = {
        n: dict(zip(ks, (m / full_macs for m in cost.moves("macs", widths, n, ks)), strict=True))
        for n, ks in options.items()
    }
    more = solve(lambda n, k: error(n, k) - macs_weight * least * kept[n][k])
    # an exact solve of both keeps these; the linearised one of a non-separable cost may not, and
    # then the least-error widths stand
    within = sum(error(n, k) for n, k in more.items()) <= (1 + macs_weight) * least
    return more if within and cost.macs(more) >= cost.macs(widths) else widths


def unreachable(budget: Budget, cost: CostModel, floor: dict[str, int]) -> GslimError:
    """The one error for a budget that the minimum widths ``floor`` already exceed."""
    base, smallest = budget.measure(cost, cost.full), budget.measure(cost, floor)
    fmt = ",.4g" if budget.metric == "latency" else ",.0f"
    unit = " ms" if budget.metric == "latency" else ""
    return GslimError(
        f"target {budget.metric} {budget.target:{fmt}}{unit} ({100 * budget.target / base:.1f}% of the model) is "
        f"unreachable: at the minimum widths the model still has {smallest:{fmt}}{unit} "
        f"({100 * smallest / base:.1f}%); lower compress.min_width or round_to, or raise the target"
    )


def unit_round_to(round_to: int, atom: int) -> int:
    """The step a unit's width moves in: a multiple of ``round_to`` made of whole groups of
    ``atom`` channels (a grouped conv carrying the unit)."""
    return math.lcm(max(round_to, 1), max(atom, 1))


def round_width(k: int, full: int, round_to: int, min_width: int) -> int:
    """Round up to a multiple of ``round_to``; at least ``min_width``; at most ``full``."""
    k = max(k, 1, min(min_width, full))
    if round_to > 1:
        k = int(math.ceil(k / round_to) * round_to)
    return min(k, full)


@dataclass
class Budget:
    metric: str  # "macs", "params" or "latency"
    target: float  # absolute count, or milliseconds
    predict: Optional[Callable[[dict[str, int]], float]] = None  # latency: the latency model's prediction
    # latency: the prediction for each move of one unit (widths, unit, widths of that unit)
    predict_moves: Optional[Callable[[dict[str, int], str, list[int]], list[float]]] = None

    def measure(self, cost: CostModel, widths: dict[str, int]) -> float:
        if self.predict is not None:
            return self.predict(widths)
        return cost.macs(widths) if self.metric == "macs" else cost.params(widths)

    def moves(self, cost: CostModel, widths: dict[str, int], unit: str, ks: list[int]) -> list[float]:
        """The cost with ``unit`` at each width of ``ks`` (the others as in ``widths``)."""
        if self.predict_moves is not None:
            return self.predict_moves(widths, unit, ks)
        if self.predict is not None:
            return [self.predict({**widths, unit: k}) for k in ks]
        return cost.moves(self.metric, widths, unit, ks)


def resolve_budget(cost: CostModel, target_macs: Optional[float], target_params: Optional[float]) -> Budget:
    if target_params is not None:
        base = cost.params(cost.full)
        return Budget("params", target_params * base if target_params <= 1 else target_params)
    base = cost.macs(cost.full)
    t = 0.5 if target_macs is None else target_macs
    return Budget("macs", t * base if t <= 1 else t)


def _search(
    widths_at: Callable[[float], dict[str, int]],
    budget: Budget,
    cost: CostModel,
    lo: float,
    hi: float,
    increasing: bool,
) -> tuple[float, dict[str, int]]:
    """Bisection on a scalar knob so that the cost is at most the budget, as large as possible.

    ``increasing``: the cost grows with the knob (a keep ratio); otherwise it shrinks (eps).
    """
    floor = widths_at(lo if increasing else hi)
    if budget.measure(cost, floor) > budget.target * (1 + 1e-9):
        raise unreachable(budget, cost, floor)
    good = lo if increasing else hi
    for _ in range(60):
        mid = (lo + hi) / 2
        ok = budget.measure(cost, widths_at(mid)) <= budget.target
        if ok == increasing:
            lo = mid
        else:
            hi = mid
        good = lo if increasing else hi
    return good, widths_at(good)


def uniform_widths(
    cost: CostModel, budget: Budget, round_to: int, min_width: int
) -> tuple[float, dict[str, int]]:
    """The same keep ratio in every unit, as large as the budget allows."""

    def at(r: float) -> dict[str, int]:
        return {
            n: round_width(int(math.ceil(r * c)), c, cost.step(n, round_to), min_width)
            for n, c in cost.full.items()
        }

    ratio, widths = _search(at, budget, cost, 0.0, 1.0, increasing=True)
    return ratio, fill_budget(cost, budget, widths, round_to)


def fill_budget(
    cost: CostModel,
    budget: Budget,
    widths: dict[str, int],
    round_to: int,
    gain: Optional[Callable[[str, int, int], float]] = None,
) -> dict[str, int]:
    """Spend what rounding left of the budget, one rounding step at a time.

    Each round widens the unit with the best ``gain(name, k, k_wider)`` per unit of cost
    among those that still fit; by default the relatively narrowest unit (which keeps a
    uniform allocation uniform up to one step).
    """
    widths = dict(widths)
    while True:
        here = budget.measure(cost, widths)
        best, best_score = None, -float("inf")
        for name in sorted(widths):
            k = widths[name]
            if k >= cost.full[name]:
                continue
            trial = dict(widths)
            trial[name] = min(cost.full[name], k + cost.step(name, round_to))
            extra = budget.measure(cost, trial) - here
            if budget.measure(cost, trial) > budget.target:
                continue
            score = -k / cost.full[name] if gain is None else gain(name, k, trial[name]) / max(extra, 1e-9)
            if score > best_score:
                best, best_score = trial, score
        if best is None:
            return widths
        widths = best


def curve_gain(curves: dict[str, list[float]]) -> Callable[[str, int, int], float]:
    """Error reduction of widening a unit from k to k2 channels, read off its greedy curve."""

    def gain(name: str, k: int, k2: int) -> float:
        curve = curves[name]
        at = lambda n: curve[n - 1] if n - 1 < len(curve) else (curve[-1] if curve else 0.0)  # noqa: E731
        return max(at(k) - at(k2), 0.0) + 1e-12

    return gain


def widths_for_eps(
    curves: dict[str, list[float]],
    full: dict[str, int],
    eps: float,
    round_to: int,
    min_width: int,
    atom: Optional[dict[str, int]] = None,
) -> dict[str, int]:
    """Per unit, the fewest channels whose relative error is at most eps (then rounded)."""
    out = {}
    for name, curve in curves.items():
        k = next((i + 1 for i, e in enumerate(curve) if e <= eps), full[name])
        out[name] = round_width(k, full[name], unit_round_to(round_to, (atom or {}).get(name, 1)), min_width)
    return out


def eps_widths(
    cost: CostModel, budget: Budget, curves: dict[str, list[float]], round_to: int, min_width: int
) -> tuple[float, dict[str, int]]:
    """The smallest eps whose per-unit widths fit the budget (searched on a log scale)."""

    def at(log_eps: float) -> dict[str, int]:
        return widths_for_eps(curves, cost.full, 10.0**log_eps, round_to, min_width, cost.atom)

    log_eps, widths = _search(at, budget, cost, -9.0, 0.0, increasing=False)
    # many units cross a rounding step at once as eps moves: spend the remainder where the
    # curves say one more step lowers the error most per MAC
    return 10.0**log_eps, fill_budget(cost, budget, widths, round_to, curve_gain(curves))
