"""Per-unit widths that minimise the greedy error under a budget: a multiple-choice knapsack.

Each unit u picks one width k from its options (multiples of ``round_to``); its cost is the
unit's greedy error curve at k (the relative reconstruction error the planning pass measured,
FPE-corrected). The constraint is any cost of the whole network: MACs, parameters or predicted
milliseconds (:mod:`gslim.compress.latency`), which need not be separable (a layer between two
units costs ``f(k_a, k_b)``).

:func:`allocate` solves it by sequential linearisation: around the current widths the cost is
replaced by its separable first-order form ``cost(w) + sum_u [cost(w with u=k) - cost(w)]``
(exact for a move of one unit, and exact everywhere when the cost is separable), the separable
problem is solved *exactly* by dynamic programming over the discretised budget, and this is
repeated from the new widths a few times. A final repair step uses the true cost: it narrows
the unit with the smallest error increase per unit of cost saved until the budget holds, then
widens the unit with the largest error decrease per cost while it still holds. The result is
never over budget; on a separable cost it is the knapsack optimum (tests check it against
brute force).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from gslim.errors import GslimError

Widths = dict[str, int]


def allocate(
    options: dict[str, list[int]],
    error: Callable[[str, int], float],
    cost: Callable[[Widths], float],
    budget: float,
    *,
    start: Optional[Widths] = None,
    rounds: int = 4,
    moves: Optional[Callable[[Widths, str, list[int]], list[float]]] = None,
) -> Widths:
    """Widths (one option per unit) with the least total ``error`` whose ``cost`` is at most ``budget``.
    ``moves(widths, unit, options)``, when given, is ``[cost({**widths, unit: k}) for k in options]``
    computed faster."""
    options = {u: sorted(set(v)) for u, v in options.items()}
    floor = {u: v[0] for u, v in options.items()}
    if cost(floor) > budget * (1 + 1e-9):
        raise GslimError(
            f"the budget {budget:,.4g} is unreachable: at the minimum widths the cost is {cost(floor):,.4g}"
        )
    widths = dict(start) if start is not None else {u: v[-1] for u, v in options.items()}
    seen = []
    for _ in range(rounds):
        widths = _linearised_step(options, error, cost, budget, widths, moves)
        if widths in seen:
            break
        seen.append(dict(widths))
    return _repair(options, error, cost, budget, widths)


def _linearised_step(options, error, cost, budget, widths: Widths, moves=None) -> Widths:
    here = cost(widths)
    if moves is None:
        moves = lambda w, u, ks: [cost({**w, u: k}) for k in ks]  # noqa: E731
    deltas = {u: [c - here for c in moves(widths, u, ks)] for u, ks in options.items()}
    errors = {u: [error(u, k) for k in ks] for u, ks in options.items()}
    return solve_separable(options, errors, deltas, budget - here)


def solve_separable(
    options: dict[str, list[int]],
    errors: dict[str, list[float]],
    costs: dict[str, list[float]],
    capacity: float,
    max_front: int = 4000,
) -> Widths:
    """Multiple-choice knapsack: one option per unit, least total error, total cost <= capacity.

    Dynamic programming over the Pareto front of (cost, error) of the units seen so far, with
    exact costs (no rounding, so feasibility is exact). The front is exact while it has at most
    ``max_front`` points (every small case); beyond that it keeps the best point per cost bucket
    of ``capacity / max_front``. With no feasible choice: the cheapest option of each unit.
    """
    units = list(options)
    # costs relative to each unit's cheapest option: all >= 0, so a partial sum over capacity
    # stays over it and can be dropped
    shift = {u: min(costs[u]) for u in units}
    capacity = capacity - sum(shift.values())
    cost = np.zeros(1)
    err = np.zeros(1)
    parents = []  # per unit: (index into the previous front, option index) of each point
    for u in units:
        cu = np.asarray(costs[u], dtype=float) - shift[u]
        eu = np.asarray(errors[u], dtype=float)
        found = _merged_front(cost, err, cu, eu, capacity)
        if found is None:
            return {v: options[v][int(np.argmin(costs[v]))] for v in units}
        c, e, prev, opt = found
        if len(c) > max_front:  # thin: the best point of each cost bucket
            bucket = np.floor((c - c[0]) / max(capacity - c[0], 1e-12) * max_front).astype(np.int64)
            last = np.r_[
                bucket[1:] != bucket[:-1], True
            ]  # errors fall with cost: a bucket's last is its best
            c, e, prev, opt = c[last], e[last], prev[last], opt[last]
        cost, err = c, e
        parents.append((prev, opt))
    i = int(np.argmin(err))
    out = {}
    for u, (prev, opt) in zip(reversed(units), reversed(parents), strict=True):
        out[u] = options[u][int(opt[i])]
        i = int(prev[i])
    return {u: out[u] for u in units}


def _merged_front(cost, err, cu, eu, capacity: float):
    """The Pareto front of (front point + one option of the next unit): ``(cost, error,
    front index, option index)`` sorted by cost with errors strictly falling, or None when no
    pair fits ``capacity``. A pair is on it when its error is below every cheaper pair's (by
    more than 1e-15); of pairs with equal cost, the least error and then the widest option
    (a tie goes to the wider option) stands for them all.

    Half the pairs of a MobileNetV2 allocation tie in cost with another, so the obvious way is
    a three-key sort by cost, error and option. Here one stable sort by cost and a running
    minimum leave only the pairs that beat every cheaper one, and only those few are sorted by
    error and option: the same front (the same widths on the recorded allocations of three
    models at two budgets), in half the time (MobileNetV2's 20 units, four linearised rounds, up
    to 470,000 pairs a unit: 0.94 -> 0.48 s, `python benchmarks/knapsack_speed.py`)."""
    K = len(cu)
    pair_cost = (cost[:, None] + cu[None, :]).ravel()
    flat = np.flatnonzero(pair_cost <= capacity + 1e-12 * max(1.0, abs(capacity)))
    if flat.size == 0:
        return None
    flat = flat[np.argsort(pair_cost[flat], kind="stable")]
    c = pair_cost[flat]
    e = (err[:, None] + eu[None, :]).ravel()[flat]
    new_cost = np.r_[True, c[1:] != c[:-1]]
    run = np.cumsum(new_cost) - 1  # each pair's run of equal costs
    starts = np.flatnonzero(new_cost)
    running = np.minimum.accumulate(e)
    cheaper = np.r_[np.inf, running[starts[1:] - 1]]  # per run: the least error of every cheaper pair
    beats = np.flatnonzero(e < cheaper[run] - 1e-15)
    # among those, per run: the least error, then the widest option
    beats = beats[np.lexsort((-(flat[beats] % K), e[beats], run[beats]))]
    first = np.r_[True, run[beats][1:] != run[beats][:-1]]
    keep = beats[first]
    return c[keep], e[keep], flat[keep] // K, flat[keep] % K


def _repair(options, error, cost, budget, widths: Widths) -> Widths:
    """Narrow until the true cost fits, then widen while it still fits (best ratio first)."""
    widths = dict(widths)
    while cost(widths) > budget * (1 + 1e-12):
        here = cost(widths)
        best, best_score = None, math.inf
        for u, ks in options.items():
            # the next narrower option that saves anything: on a runtime's channel staircase one
            # rounding step below a block's top costs what the top costs
            for k in reversed(ks[: ks.index(widths[u])]):
                trial = {**widths, u: k}
                saved = here - cost(trial)
                if saved > 0:
                    score = (error(u, k) - error(u, widths[u])) / saved
                    if score < best_score:
                        best, best_score = trial, score
                    break
        if best is None:
            raise GslimError(
                f"cannot meet the budget {budget:,.4g}: narrowing no unit lowers the cost {here:,.4g}"
            )
        widths = best
    while True:
        here = cost(widths)
        best, best_score = None, 0.0
        for u, ks in options.items():
            i = ks.index(widths[u])
            if i + 1 >= len(ks):
                continue
            trial = {**widths, u: ks[i + 1]}
            c = cost(trial)
            if c > budget:
                continue
            gain = error(u, widths[u]) - error(u, ks[i + 1])
            score = gain / max(c - here, 1e-12)
            if gain > 0 and score > best_score:
                best, best_score = trial, score
        if best is None:
            return widths
        widths = best
