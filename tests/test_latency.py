"""The latency budget: knapsack allocation, the latency table and its cache, the closed loop."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from gslim.compress.allocate import allocate, solve_separable
from gslim.errors import GslimError

# --------------------------------------------------------------------------- allocation


def _random_case(rng: random.Random, units: int, options: int):
    opts, errs, costs = {}, {}, {}
    for u in range(units):
        ks = sorted(rng.sample(range(1, 20), options))
        e = sorted((rng.random() for _ in ks), reverse=True)  # wider: less error
        c = sorted(rng.randint(1, 9) for _ in ks)  # wider: costs more
        opts[f"u{u}"], errs[f"u{u}"], costs[f"u{u}"] = ks, e, c
    return opts, errs, costs


def _brute(opts, errs, costs, budget):
    best = None
    for pick in itertools.product(*[range(len(v)) for v in opts.values()]):
        names = list(opts)
        c = sum(costs[n][j] for n, j in zip(names, pick))
        e = sum(errs[n][j] for n, j in zip(names, pick))
        if c <= budget and (best is None or e < best - 1e-12):
            best = e
    return best


@pytest.mark.parametrize("seed", range(8))
def test_merged_front_equals_the_three_key_sort_with_many_ties(seed):
    """The knapsack's front merge takes one sort by cost and a running minimum; with costs and
    errors on coarse grids (most pairs tie in cost, many in cost and error) it must pick the
    same points, and of tied ones the same option, as sorting every pair by all three keys."""
    import sys
    from pathlib import Path

    import numpy as np

    from gslim.compress.allocate import _merged_front

    # the plain three-key sort lives with the benchmark that times the two against each other
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from knapsack_speed import plain_front

    rng = np.random.default_rng(seed)
    cost = np.unique(rng.integers(0, 40, size=30)).astype(float)  # a front: costs up ...
    err = np.sort(rng.integers(0, 12, size=len(cost)).astype(float) / 4)[::-1].copy()  # ... errors down
    cu = np.sort(rng.integers(0, 10, size=8)).astype(float)
    eu = np.sort(rng.integers(0, 6, size=8).astype(float) / 4)[::-1].copy()
    capacity = float(rng.integers(20, 50))
    want = plain_front(cost, err, cu, eu, capacity)
    got = _merged_front(cost, err, cu, eu, capacity)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)
    assert _merged_front(cost, err, cu, eu, -1.0) is None  # nothing fits


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_is_optimal_on_small_separable_cases(seed):
    rng = random.Random(seed)
    opts, errs, costs = _random_case(rng, rng.randint(2, 4), rng.randint(2, 4))
    floor = sum(min(c) for c in costs.values())
    budget = floor + rng.randint(0, 12)
    index = {n: {k: i for i, k in enumerate(ks)} for n, ks in opts.items()}

    def cost(w):
        return sum(costs[n][index[n][k]] for n, k in w.items())

    def error(n, k):
        return errs[n][index[n][k]]

    got = allocate(opts, error, cost, budget)
    assert cost(got) <= budget
    assert sum(error(n, k) for n, k in got.items()) == pytest.approx(_brute(opts, errs, costs, budget))
    # the separable solver alone, on the same numbers
    sep = solve_separable(opts, errs, {n: [float(c) for c in v] for n, v in costs.items()}, budget)
    assert cost(sep) <= budget
    assert sum(error(n, k) for n, k in sep.items()) == pytest.approx(_brute(opts, errs, costs, budget))


@pytest.mark.parametrize("seed", range(6))
def test_allocation_never_exceeds_a_coupled_budget(seed):
    rng = random.Random(100 + seed)
    names = [f"u{i}" for i in range(5)]
    opts = {n: list(range(8, 65, 8)) for n in names}
    pair = {(a, b): rng.random() for a, b in zip(names, names[1:])}  # a layer between two units: k_a * k_b
    lin = {n: rng.random() * 10 for n in names}

    def cost(w):
        return sum(v * w[a] * w[b] for (a, b), v in pair.items()) + sum(lin[n] * w[n] for n in names)

    curves = {n: [1.0 / (1 + rng.random() * k) for k in range(1, 65)] for n in names}
    full = cost({n: 64 for n in names})
    for frac in (0.3, 0.5, 0.8):
        got = allocate(opts, lambda n, k: curves[n][k - 1], cost, frac * full)
        assert cost(got) <= frac * full * (1 + 1e-12)
    with pytest.raises(GslimError, match="unreachable"):
        allocate(opts, lambda n, k: curves[n][k - 1], cost, 0.001 * full)


# --------------------------------------------------------------------------- the table


def test_repair_steps_down_a_staircase_where_one_step_saves_nothing():
    """On a runtime that computes 16 channels at a time, 24 costs what 32 costs: narrowing to
    meet the budget must look past the step that saves nothing."""
    from gslim.compress.allocate import _repair

    opts = {"a": [8, 16, 24, 32], "b": [8, 16, 24, 32]}
    cost = lambda w: sum(-(-k // 16) * 16 for k in w.values())  # noqa: E731
    error = lambda u, k: (32 - k) / 32 * (2.0 if u == "a" else 1.0)  # noqa: E731
    assert _repair(opts, error, cost, 48, {"a": 32, "b": 32}) == {"a": 32, "b": 16}


@pytest.mark.parametrize("arch", ["mobilenet_v2", "densenet", "regnet_x_400mf"])
def test_one_unit_moves_are_priced_like_the_whole_model(arch):
    """The knapsack prices every move of every unit by re-pricing only that unit's layers; the
    result must be the whole model's cost (concatenations and grouped convs included)."""
    import torchvision
    from torchvision.models.densenet import DenseNet

    from gslim.compress.budget import CostModel, width_options
    from gslim.compress.units import find_units

    if arch == "densenet":
        model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)
    else:
        model = torchvision.models.get_model(arch, num_classes=10)
    graph = find_units(model.eval(), 32)
    cost = CostModel(model, graph, 32, graph.units)
    rng = random.Random(0)
    options = {u.name: width_options(u.width, cost.step(u.name, 8), 8) for u in graph.units}
    widths = {u: rng.choice(ks) for u, ks in options.items()}
    for u in rng.sample(sorted(options), 6):
        for metric, whole in (("macs", cost.macs), ("params", cost.params)):
            got = cost.moves(metric, widths, u, options[u])
            want = [whole({**widths, u: k}) for k in options[u]]
            assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("weight", [0.05, 0.1, 1.0])
def test_macs_weight_keeps_more_macs_for_at_most_its_share_of_error(weight):
    """A latency budget's knapsack with ``macs_weight`` w: never over the budget, at least the MACs
    of the least-error allocation, and a summed error within (1 + w) of the least (the second
    solve's objective bounds it). A synthetic latency prices a unit's channel by its depth, not
    by its MACs, so the two objectives disagree."""
    import torchvision

    from gslim.compress.budget import Budget, CostModel, knapsack_widths
    from gslim.compress.units import find_units

    model = torchvision.models.get_model("mobilenet_v2", num_classes=10).eval()
    graph = find_units(model, 32, include_residual=False)  # as compress does by default
    cost = CostModel(model, graph, 32, graph.units)
    order = {u.name: i for i, u in enumerate(graph.units)}
    ms = lambda w: sum(k * (1 + order[u]) for u, k in w.items())  # noqa: E731
    budget = Budget("latency", 0.6 * ms(cost.full), ms)
    rng = random.Random(0)
    curves = {}
    for u in graph.units:  # flat near full width, steep near zero, with a little noise: like greedy's
        scale = rng.uniform(0.02, 0.2)
        curves[u.name] = [scale * (1 - k / u.width) ** 3 + 1e-4 * rng.random() for k in range(1, u.width + 1)]
    err = lambda w: sum(curves[u][k - 1] for u, k in w.items())  # noqa: E731
    least = knapsack_widths(cost, budget, curves, 8, 8)
    kept = knapsack_widths(cost, budget, curves, 8, 8, macs_weight=weight)
    assert ms(kept) <= budget.target * (1 + 1e-9)
    assert cost.macs(kept) > cost.macs(least)  # it moved: the test's case makes the objectives differ
    assert err(kept) <= (1 + weight) * err(least) + 1e-6
    assert knapsack_widths(cost, budget, curves, 8, 8, macs_weight=0.0) == least


def test_macs_weight_keeps_the_least_error_widths_when_the_second_solve_is_worse(monkeypatch):
    """The linearised knapsack of a non-separable cost is not exact: a second allocation that keeps
    fewer MACs, or errs by more than (1 + weight) of the least, is dropped for the first."""
    import torchvision

    import gslim.compress.allocate as allocate_mod
    from gslim.compress.budget import Budget, CostModel, knapsack_widths
    from gslim.compress.units import find_units

    model = torchvision.models.get_model("mobilenet_v3_small", num_classes=10).eval()
    graph = find_units(model, 32, include_residual=False)
    cost = CostModel(model, graph, 32, graph.units)
    budget = Budget("macs", 0.5 * cost.macs(cost.full))
    curves = {u.name: [(1 - k / u.width) ** 2 for k in range(1, u.width + 1)] for u in graph.units}
    least = knapsack_widths(cost, budget, curves, 8, 8)
    real, calls = allocate_mod.allocate, []

    def second_narrower(options, error, *args, **kwargs):
        calls.append(1)
        got = real(options, error, *args, **kwargs)
        return got if len(calls) == 1 else {u: ks[0] for u, ks in options.items()}  # fewer MACs

    monkeypatch.setattr(allocate_mod, "allocate", second_narrower)
    assert knapsack_widths(cost, budget, curves, 8, 8, macs_weight=0.1) == least
    assert len(calls) == 2


def test_table_cache_key_changes_with_threads_and_precision(tmp_path, monkeypatch):
    from gslim.compress.latency_table import LatencySettings, LatencyTable

    monkeypatch.setenv("GSLIM_CACHE", str(tmp_path))
    base = LatencyTable.open(LatencySettings(threads=1))
    assert base.path.parent == tmp_path / "latency"
    assert LatencyTable.open(LatencySettings(threads=1)).path == base.path  # the same context: the same table
    assert LatencyTable.open(LatencySettings(threads=2)).path != base.path
    assert LatencyTable.open(LatencySettings(precision="fp16")).path != base.path
    assert LatencyTable.open(LatencySettings(batch=8)).path != base.path
    base.entries["x"] = 1.0
    base.save()
    # a table measured under another context is refused by name, never silently reused
    with pytest.raises(GslimError, match="threads"):
        LatencyTable.open(LatencySettings(threads=4), path=base.path)


def test_table_measures_real_layers_once(tmp_path, monkeypatch):
    from gslim.compress.latency_table import LatencySettings, LatencyTable, LayerShape

    monkeypatch.setenv("GSLIM_CACHE", str(tmp_path))
    settings = LatencySettings(min_iters=3, min_seconds=0.0, warmup_s=0.0, rounds=1)
    shapes = [LayerShape("conv", 8, c, kernel=(3, 3), padding=(1, 1), hw=(8, 8)) for c in (8, 16)]
    shapes.append(LayerShape("linear", 16, 4))
    shapes.append(LayerShape("linear", 16, 4, hw=(4, 4)))  # at every position of a channels-last map
    table = LatencyTable.open(settings)
    table.measure(shapes, settings)
    assert table.measured_now == 4 and all(table.lookup(s) > 0 for s in shapes)
    again = LatencyTable.open(settings)
    again.measure(shapes, settings)
    assert again.measured_now == 0 and again.entries == table.entries
    data = json.loads(table.path.read_text())
    assert data["format"] == "gslim-latency-table" and data["context"]["threads"] == 1


def test_latency_layers_price_grouped_convs_and_channels_last_linears():
    """A grouped conv carrying a unit loses whole groups (its group width stays), and a Linear on
    a channels-last map (ConvNeXt) is timed at every position of that map."""
    import torchvision
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    from gslim.compress.latency import model_layers
    from gslim.compress.units import find_units

    graph = find_units(torchvision.models.get_model("regnet_x_400mf", num_classes=10), 32)
    u = next(u for u in graph.units if u.atom > 1)
    grouped = next(
        ly for ly in model_layers(graph, graph.units, 32) if ly.depthwise and ly.in_units == (u.name,)
    )
    s = grouped.at({u.name: u.width // 2})
    assert s.cin == s.cout == u.width // 2 and s.groups == u.width // 2 // u.atom
    assert s.module()(torch.randn(1, s.cin, *s.hw)).shape[1] == u.width // 2

    convnext = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)
    graph = find_units(convnext, 32)
    linears = [ly for ly in model_layers(graph, graph.units, 32) if ly.shape.op == "linear"]
    assert linears and all(ly.shape.hw in ((8, 8), (4, 4)) for ly in linears)  # stem stride 4, then 2
    s = linears[0].shape
    assert s.module()(torch.randn(1, s.cin, *s.hw)).shape == (1, *s.hw, s.cout)


def _mac_timer(monkeypatch, slow: float = 1.0):
    """Layer and model times proportional to MACs (a deterministic stand-in for a runtime); the
    whole slim model measures ``slow`` times what its MACs say."""
    import gslim.compress.latency_table as lat
    from gslim.models import count_macs_params

    def layers(shapes, settings):
        out = {}
        for s in shapes:
            hw = s.hw[0] * s.hw[1] // (s.stride[0] * s.stride[1])
            out[s.key()] = 1e-6 * s.cout * (s.cin // s.groups) * s.kernel[0] * s.kernel[1] * hw + 1e-3
        return out

    def model_ms(model, input_size, settings, table=None, *, others=None, **kw):
        ms = 1e-6 * count_macs_params(model, input_size)[0]
        if others is None:
            return ms
        # a slim model measured against its base runs slow; the calibration probes are timed
        # against "model", the base, and run as their MACs say
        factor = slow if "base" in others else 1.0
        return {
            "model": factor * ms,
            **{k: 1e-6 * count_macs_params(m, input_size)[0] for k, m in others.items()},
        }

    monkeypatch.setattr(lat, "_time_layers", layers)
    monkeypatch.setattr(lat, "measure_model", model_ms)


def _latency_run(tmp_path, monkeypatch, overrides, criterion="l1"):
    from gslim.compress.select import compress_model
    from gslim.compress.stage import compress_to_latency
    from gslim.models import build_model
    from gslim.recipe import parse_recipe

    monkeypatch.setenv("GSLIM_CACHE", str(tmp_path))
    r = parse_recipe(
        {
            "model": {"arch": "mobilenet_v2", "num_classes": 4, "input_size": 32},
            "compress": {"criterion": criterion, **overrides},
        }
    )
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 4).eval()
    x = torch.randn(8, 3, 32, 32)
    said = []

    def run(latency=None, curves=None):
        return compress_model(model, 32, x, None, r.compress, latency=latency, curves=curves, batch_size=8)

    return compress_to_latency(r, model, 32, run, say=said.append), said


def test_closed_loop_tightens_when_the_backend_is_slower_than_predicted(tmp_path, monkeypatch):
    _mac_timer(monkeypatch, slow=1.3)
    (res, info), said = _latency_run(tmp_path, monkeypatch, {"target_latency": "50%"})
    rounds = info["rounds"]
    assert len(rounds) >= 2 and sum("latency round" in s for s in said) == len(rounds)
    assert rounds[0]["measured_ms"] > rounds[0]["budget_ms"] * 1.03  # round 1 was over budget
    assert rounds[1]["planning_target_ms"] < rounds[0]["planning_target_ms"]  # so it tightened
    assert info["measured_ms"] <= info["budget_ms"] * 1.03


def test_latency_budget_is_met_on_an_exact_backend(tmp_path, monkeypatch):
    _mac_timer(monkeypatch, slow=1.0)
    (res, info), _ = _latency_run(tmp_path, monkeypatch, {"target_latency": "60%"}, criterion="greedy")
    assert info["measured_ms"] <= info["budget_ms"] * 1.03
    assert abs(info["prediction_error"]) < 0.1 and res.budget["allocation"] == "knapsack"
    assert res.budget["metric"] == "latency" and res.widths


@pytest.mark.parametrize(
    "block, noise, expect",
    [(16, 0.0, 16), (16, 0.02, 16), (32, 0.0, 32), (8, 0.0, 8), (1, 0.0, 8), (1, 0.02, 8), (None, 0.0, 8)],
)
def test_staircase_alignment_is_read_from_measured_steps(block, noise, expect):
    """Times flat inside each block of channels give that block; times linear in the width (block
    1) or flat overall (a launch-bound layer, None) give the step itself."""
    from gslim.compress.latency import staircase_alignment

    rng = random.Random(0)
    widths = list(range(32, 129, 8))
    base = [0.01 if block is None else 0.005 + 0.001 * (-(-w // block) * block) / 8 for w in widths]
    ms = [t * (1 + noise * (2 * rng.random() - 1)) for t in base]
    assert staircase_alignment(widths, ms, 8) == expect


def test_in_network_savings_map_is_piecewise_through_the_probes():
    """Probes that save less per isolated millisecond the deeper they cut give a concave map; a
    probe that timed slower than the base (noise) cannot make the map fall."""
    from gslim.compress.latency_stages import savings_points

    pts = savings_points([(4.9, 3.8), (0.8, 0.75), (2.1, 1.9)])
    assert [p[0] for p in pts] == [0.8, 2.1, 4.9] and [round(p[1], 6) for p in pts] == [0.75, 1.9, 3.8]
    noisy = savings_points([(1.0, -0.2), (2.0, 1.5)])
    assert noisy[0] == (1.0, 0.1) and noisy[1][1] > noisy[0][1]
    assert savings_points([(0.0, 0.3), (-1.0, 0.2)]) == []


def _staircase_timer(monkeypatch, block: int = 16):
    """A runtime whose layers cost what their channel counts rounded up to ``block`` cost."""
    import gslim.compress.latency_table as lat

    up = lambda c: -(-c // block) * block  # noqa: E731

    def layers(shapes, settings):
        out = {}
        for s in shapes:
            hw = s.hw[0] * s.hw[1] // (s.stride[0] * s.stride[1])
            per_group = up(s.cin) // s.groups if s.groups == s.cin else s.cin // s.groups
            out[s.key()] = 1e-6 * up(s.cout) * per_group * s.kernel[0] * s.kernel[1] * hw + 1e-3
        return out

    monkeypatch.setattr(lat, "_time_layers", layers)


@pytest.mark.parametrize("round_to", [8, 1])
def test_latency_widths_land_on_the_runtime_staircase(tmp_path, monkeypatch, round_to):
    """On a runtime that computes channels in blocks of 16, a width between two multiples costs
    the upper one: the model predicts so, and the budget buys the upper width."""
    _mac_timer(monkeypatch)
    _staircase_timer(monkeypatch, 16)
    (res, info), _ = _latency_run(tmp_path, monkeypatch, {"target_latency": "55%", "round_to": round_to})
    assert info["model"]["align"] == 16
    assert res.widths and all(w % 16 == 0 for w in res.widths.values()), res.widths  # the narrowed units


def test_latency_moves_are_predicted_like_the_whole_model(tmp_path, monkeypatch):
    from gslim.compress.latency import LatencyModel
    from gslim.compress.latency_table import LatencySettings, LatencyTable
    from gslim.compress.units import find_units
    from gslim.models import build_model

    _staircase_timer(monkeypatch, 16)
    monkeypatch.setenv("GSLIM_CACHE", str(tmp_path))
    model = build_model("mobilenet_v2", 4).eval()
    graph = find_units(model, 32)
    settings = LatencySettings()
    lm = LatencyModel.build(model, graph, graph.units, 32, settings, LatencyTable.open(settings), full_ms=2.0)
    assert lm.stages >= 2
    lm.alphas = [0.6 + 0.3 * s for s in range(lm.stages)]  # per-stage ratios and a depth map,
    lm.savings = [(0.5, 0.4), (1.0, 0.7)]  # as calibrate leaves them
    rng = random.Random(1)
    widths = {u.name: rng.choice([8, 16, u.width]) for u in graph.units}
    for u in graph.units[:6]:
        ks = [8, 16, 24, u.width]
        assert lm.predict_moves(widths, u.name, ks) == pytest.approx(
            [lm.predict({**widths, u.name: k}) for k in ks], rel=1e-12
        )


def test_no_staircase_means_no_alignment_even_with_a_fine_rounding_step(tmp_path, monkeypatch):
    _mac_timer(monkeypatch)
    (res, info), _ = _latency_run(tmp_path, monkeypatch, {"target_latency": "55%", "round_to": 1})
    assert info["model"]["align"] == 1


def test_a_second_latency_compress_reads_table_and_calibration_from_disk(tmp_path, monkeypatch):
    _mac_timer(monkeypatch)
    (res1, info1), _ = _latency_run(tmp_path, monkeypatch, {"target_latency": "60%"})
    (res2, info2), _ = _latency_run(tmp_path, monkeypatch, {"target_latency": "60%"})
    assert info1["model"]["alphas"] and info2["model"]["alphas"] == info1["model"]["alphas"]
    assert info2["model"]["measured_now"] == 0 and res2.widths == res1.widths


def test_unreachable_budget_and_unknown_backend_are_clear_errors(tmp_path, monkeypatch, make_recipe, run_cli):
    _mac_timer(monkeypatch)
    with pytest.raises(GslimError, match="unreachable: at the minimum widths"):
        _latency_run(tmp_path, monkeypatch, {"target_latency": "1%"})
    recipe = make_recipe({"model.arch": "mobilenet_v3_small"})
    res = run_cli(
        ["compress", recipe, "--target-latency", "50%", "--latency-backend", "nope", "--no-progress"]
    )
    assert (
        res.code == 2 and "unknown backend 'nope'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_latency_backend_is_one_clear_error(tmp_path, monkeypatch, make_recipe, run_cli):
    from gslim.models import ModelSpec, build_model, save_checkpoint

    monkeypatch.setenv("GSLIM_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "base.pt"
    save_checkpoint(build_model("mobilenet_v3_small", 4).eval(), ModelSpec("mobilenet_v3_small", 4, 32), ck)
    recipe = make_recipe({"model.arch": "mobilenet_v3_small"})
    res = run_cli(
        [
            "compress",
            recipe,
            "--model",
            ck,
            "--target-latency",
            "50%",
            "--latency-backend",
            "torch-cuda",
            "--no-progress",
        ]
    )
    assert res.code != 0 and "torch-cuda cannot run here" in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2 and not (tmp_path / "run" / "slim.pt").exists()


def test_cli_latency_budget_end_to_end_on_ort_cpu(tmp_path, monkeypatch, make_recipe, run_cli):
    """Real timings on this machine (values are not checked, only that they are recorded)."""
    from gslim.models import ModelSpec, build_model, save_checkpoint

    monkeypatch.setenv("GSLIM_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "base.pt"
    torch.manual_seed(0)
    save_checkpoint(build_model("mobilenet_v3_small", 4).eval(), ModelSpec("mobilenet_v3_small", 4, 32), ck)
    recipe = make_recipe(
        {
            "model.arch": "mobilenet_v3_small",
            "compress.latency.grid": 3,
            "compress.latency.max_rounds": 2,
            "compress.latency.tolerance": 0.5,
        }
    )
    res = run_cli(
        [
            "compress",
            recipe,
            "--model",
            ck,
            "--target-latency",
            "80%",
            "--latency-backend",
            "ort-cpu",
            "--no-progress",
        ]
    )
    assert res.code == 0, res.stderr
    assert "latency round 1" in res.stderr and "latency on ort-cpu" in res.stdout
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    lat = sel["latency"]
    assert {"budget_ms", "predicted_ms", "measured_ms", "prediction_error", "rounds", "table"} <= lat.keys()
    assert lat["table"]["measured_now"] > 0 and sel["budget"]["metric"] == "latency"
    assert lat["measured_ms"] <= lat["budget_ms"] * 1.5


def test_layer_timings_use_deployment_tf32_defaults_whatever_the_caller_set():
    from gslim.compress.latency_table import deployment_matmuls
    from gslim.compress.select import exact_matmuls

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with exact_matmuls(torch.device("cuda")):  # the selection's setting (flags only: no GPU needed)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        with deployment_matmuls():
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)
        assert torch.backends.cudnn.allow_tf32 is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_torch_cuda_tables_are_timed_as_cuda_graphs_and_keyed_apart():
    from gslim.compress.latency_table import LatencySettings, table_context, timing_graphs

    assert timing_graphs(LatencySettings(backend="torch-cuda")) is True
    assert timing_graphs(LatencySettings(backend="ort-cpu")) is None
    assert table_context(LatencySettings(backend="torch-cuda")).get("cuda_graphs") is True
    assert "cuda_graphs" not in table_context(LatencySettings(backend="torch-cpu"))


def test_in_network_savings_are_calibrated_per_resolution_stage(tmp_path, monkeypatch):
    """A runtime whose high-resolution layers save half their isolated time in the network and
    whose low-resolution layers save one and a half times it (as ORT CPU does, more mildly): the
    stage ratios are read from the probes, rising toward the small maps, and a cut of the early
    stage only is predicted at least a third closer than by the depth map through the uniform
    probes alone (the previous calibration)."""
    import gslim.compress.latency_table as lat
    from gslim.compress.latency import LatencyModel, _interp
    from gslim.compress.latency_stages import STAGE_CUT
    from gslim.compress.latency_table import LatencySettings, LatencyTable
    from gslim.compress.slim import first_channels_copy
    from gslim.compress.units import find_units
    from gslim.models import build_model

    _mac_timer(monkeypatch)  # isolated layers: 1e-6 x MACs + 1e-3 ms

    def in_network(model, size):
        total, hooks = [0.0], []

        def hook(mod, args, out):
            x = args[0]
            hw = x.shape[-2:] if isinstance(mod, torch.nn.Conv2d) else (1, 1)
            macs = out.numel() * (
                mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                if isinstance(mod, torch.nn.Conv2d)
                else mod.in_features
            )
            total[0] += (0.5 if hw[0] >= 8 else 1.5) * 1e-6 * macs

        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                hooks.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        for h in hooks:
            h.remove()
        return 1.0 + total[0]

    def model_ms(model, input_size, settings, table=None, *, others=None, **kw):
        ms = in_network(model, input_size)
        return (
            ms
            if others is None
            else {"model": ms, **{k: in_network(m, input_size) for k, m in others.items()}}
        )

    monkeypatch.setattr(lat, "measure_model", model_ms)
    monkeypatch.setenv("GSLIM_CACHE", str(tmp_path))
    model = build_model("mobilenet_v2", 4).eval()
    graph = find_units(model, 32)
    settings = LatencySettings()
    lm = LatencyModel.build(model, graph, graph.units, 32, settings, LatencyTable.open(settings))
    lm.calibrate(model, graph.units, 32, settings, 8, 8)
    assert lm.stages >= 3
    assert lm.alphas[0] < 0.7 and lm.alphas[-1] > 1.3, lm.alphas
    assert len(lm.savings) == 3 and {p["label"] for p in lm.probes} >= {"probe50", "stage0"}

    full = {u.name: u.width for u in graph.units}
    early = [u for u in graph.units if lm.stage_deltas({**full, u.name: max(8, u.width // 2)})[0] < 0]
    widths = {**full, **{u.name: max(8, int(u.width * (1 - STAGE_CUT) / 2)) for u in early}}
    slim = first_channels_copy(model, graph.units, widths)
    measured = in_network(slim, 32)
    xs, ys = zip(*([(0.0, 0.0)] + lm.savings))
    depth_only = lm.full_ms - _interp(list(xs), list(ys), -lm.delta(widths))
    assert abs(lm.predict(widths) - measured) < (2 / 3) * abs(depth_only - measured), (
        lm.predict(widths),
        depth_only,
        measured,
    )
