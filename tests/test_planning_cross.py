"""The planning pass forms each consumer's cross term B = X^T Y from its summed Gram and its own
weights (Y = X W there), not from the rows: the same sums, the same curves."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from gslim.compress import planning
from gslim.compress.calibrate import StatsAccumulator, consumer_rows, target_map, target_rows, unit_columns
from gslim.compress.units import find_units
from gslim.recipe import CompressConfig


def _pair(**kw) -> tuple[StatsAccumulator, StatsAccumulator]:
    return (
        StatsAccumulator(1.0, torch.Generator().manual_seed(0), holdout=0.3, **kw),
        StatsAccumulator(1.0, torch.Generator().manual_seed(0), holdout=0.3, **kw),
    )


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.mark.parametrize(
    "layer", [nn.Linear(12, 5), nn.Conv2d(6, 4, 1), nn.Conv2d(3, 7, 3, padding=1, padding_mode="reflect")]
)
def test_sampled_rows_give_the_same_sums_with_b_from_the_weights(layer):
    torch.manual_seed(0)
    W = planning.own_weights(layer, _unit("u", []), "c", layer)
    rows, cross = _pair(), _pair(cross_weights=W)[0]
    for _ in range(3):
        x = torch.randn(4, 12) if isinstance(layer, nn.Linear) else torch.randn(4, layer.in_channels, 5, 5)
        with torch.no_grad():
            y = layer(x)
        sample = rows[0].draw(y.numel() // y.shape[1], 4)
        assert torch.equal(sample.held, cross.draw(y.numel() // y.shape[1], 4).held)
        X, Y = consumer_rows(layer, x, sample.pick), target_rows(layer, y, sample.pick)
        rows[0].add(X, Y, sample.held)
        cross.add(X, Y, sample.held)
    a, b = rows[0].result(1), cross.result(1)
    assert torch.equal(a.G, b.G) and a.yy == b.yy and a.rows == b.rows
    assert _close(b.B, a.B) and torch.allclose(b.B, b.G @ W)
    assert a.held is not None and torch.equal(a.held.G, b.held.G) and _close(b.held.B, a.held.B)


def test_dense_statistics_give_the_same_sums_with_b_from_the_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, 3, padding=1, bias=True)
    W = planning.own_weights(conv, _unit("u", []), "c", conv)
    rows = StatsAccumulator(1.0, torch.Generator().manual_seed(0), holdout=0.4, dense=True)
    cross = StatsAccumulator(1.0, torch.Generator().manual_seed(0), holdout=0.4, dense=True, cross_weights=W)
    for n in (3, 1, 4):
        x = torch.randn(n, 5, 6, 6)
        with torch.no_grad():
            y = target_map(conv, conv(x))  # (less the bias: the target is X W exactly)
        held = rows.draw(n * 36, n).held
        assert torch.equal(held, cross.draw(n * 36, n).held)
        rows.add_dense(conv, x, y, held)
        cross.add_dense(conv, x, y, held)
    a, b = rows.result(9), cross.result(9)
    assert torch.equal(a.G, b.G) and a.yy == b.yy and _close(b.B, a.B)
    assert a.held is not None and _close(b.held.B, a.held.B)


def test_a_reader_of_a_concatenation_takes_the_weights_of_its_own_columns(monkeypatch):
    from gslim.compress import calibrate

    torch.manual_seed(0)
    conv = nn.Conv2d(10, 4, 3, padding=1)
    u = _unit("u", ["c"], width=6)
    for module in (planning, calibrate):  # the unit's 6 columns start after 3 others
        monkeypatch.setattr(module, "column_offset", lambda model, unit, layer: 3)
    W = planning.own_weights(conv, u, "c", conv)
    x = torch.randn(2, 10, 5, 5)
    with torch.no_grad():
        y = conv(x)
    X, Y = unit_columns(conv, u, "c", conv, consumer_rows(conv, x), target_rows(conv, y), 6)
    assert W.shape == (6 * 9, 4) and X.shape[1] == 6 * 9
    assert _close(X.double() @ W, Y.double())


def test_a_grouped_conv_forms_b_from_its_rows():
    assert planning.own_weights(nn.Conv2d(8, 8, 3, groups=2), _unit("u", []), "c", nn.Module()) is None


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18"])
def test_planning_curves_equal_those_with_b_from_the_rows(arch, monkeypatch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    size = 64
    graph = find_units(model, size, include_residual=False)
    cfg = CompressConfig(criterion="greedy", target_macs=0.5, omp_precision="float64")
    batches = list(torch.randn(48, 3, size, size).split(16))
    made = []
    real = planning.StatsAccumulator

    def spy(*args, **kw):
        made.append(kw.get("cross_weights") is not None)
        return real(*args, **kw)

    monkeypatch.setattr(planning, "StatsAccumulator", spy)
    gw = planning.planning_curves(model, graph, graph.units, batches, cfg, torch.Generator().manual_seed(0))
    # B from the weights where the rows are at least twice the columns (planning.cross_from_gram);
    # at 64 px and 48 images some consumers have fewer (ResNet-18's layer4 3x3 convs: 4,608
    # columns, 192 rows; MobileNetV3's classifier: 576 columns, 48 rows): both routes are taken
    assert any(made) and not all(made), made
    monkeypatch.setattr(planning, "own_weights", lambda *a: None)
    rows = planning.planning_curves(model, graph, graph.units, batches, cfg, torch.Generator().manual_seed(0))
    assert gw.keys() == rows.keys()
    for name in rows:
        a, b = torch.tensor(rows[name]), torch.tensor(gw[name])
        assert float((a - b).abs().max()) <= 1e-4 * max(float(a.abs().max()), 1e-12), name


def _unit(name: str, concat: list[str], width: int = 0):
    from gslim.compress.units import Unit

    return Unit(name=name, kind="internal", width=width, concat_before={c: [] for c in concat})


def test_a_consumer_with_few_sampled_rows_takes_its_targets_from_them_and_its_batchnorm_folds(monkeypatch):
    """Where a plain conv consumer's rows are sparsely sampled, the planning pass computes its
    targets from its input rows (Y = X W) and no hook reads its output: its BatchNorm folds into
    it for the pass. The targets kept for the walk and the curves are those read from the output,
    to float rounding."""
    from gslim.compress.fast_passes import foldable_pairs, folded_batchnorm

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    for m in model.modules():  # (non-trivial BatchNorms: a fold that went wrong shows)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    size = 64
    graph = find_units(model, size, include_residual=False)
    cfg = CompressConfig(criterion="greedy", target_macs=0.5, omp_precision="float64", max_positions=1000)
    batches = list(torch.randn(32, 3, size, size).split(16))
    pairs = dict(foldable_pairs(graph.traced))
    bn_calls: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}
    real_bn = nn.BatchNorm2d.forward

    def counted(self, x):
        bn_calls[names[self]] = bn_calls.get(names[self], 0) + 1
        return real_bn(self, x)

    monkeypatch.setattr(nn.BatchNorm2d, "forward", counted)
    decided: dict[str, bool] = {}
    real_rule = planning.targets_from_rows

    def spy(m, u, c, *args):
        decided[c] = real_rule(m, u, c, *args)
        return decided[c]

    def plan(rule):
        monkeypatch.setattr(planning, "targets_from_rows", rule)
        bn_calls.clear()
        store = planning.TargetStore()
        with folded_batchnorm([model], list(pairs.items())):
            curves = planning.planning_curves(
                model, graph, graph.units, batches, cfg, torch.Generator().manual_seed(0), store=store
            )
        return curves, store, dict(bn_calls)

    rows_curves, rows_store, rows_bn = plan(spy)
    from_rows = [c for c, chosen in decided.items() if chosen]
    assert from_rows and not all(decided.values())  # (the rule chose: some of each)
    for c in from_rows:
        assert c in pairs and rows_bn.get(pairs[c], 0) == 0, c  # folded: the BatchNorm never ran
    out_curves, out_store, out_bn = plan(lambda *a: False)
    assert all(out_bn.get(pairs[c], 0) == len(batches) for c in from_rows)  # (read from the output: run)
    assert rows_store.rows.keys() == out_store.rows.keys()
    for key, kept in out_store.rows.items():
        for (s_out, y_out), (s_rows, y_rows) in zip(kept, rows_store.rows[key]):
            assert (s_out.pick is None and s_rows.pick is None) or torch.equal(s_out.pick, s_rows.pick), key
            assert _close(y_rows, y_out, 1e-4), key
    for name in out_curves:
        a, b = torch.tensor(out_curves[name]), torch.tensor(rows_curves[name])
        assert float((a - b).abs().max()) <= 1e-3 * max(float(a.abs().max()), 1e-12), name
