"""Concatenations along the channels (#11): DenseNet's dense connections, GoogLeNet's Inception
branches, ShuffleNet-V2's split and shuffle. Each input of a concatenation is a unit of its own,
sliced at its column range in every reader; what cannot be sliced is left alone with a reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.densenet import DenseNet

from conftest import slim_vs_masked
from gslim.compress.latency import model_layers
from gslim.compress.select import compress_model
from gslim.compress.units import find_units
from gslim.models import ModelSpec, count_macs_params, load_model, save_checkpoint
from gslim.recipe import CompressConfig


def _random_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def _tiny_densenet() -> nn.Module:
    """DenseNet's structure at a test's size: two dense blocks of two layers, a transition."""
    torch.manual_seed(0)
    return _random_bn(
        DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10)
    )


def _googlenet() -> nn.Module:
    """torchvision's GoogLeNet at full width (Inception concatenations of four branches)."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True)
    return _random_bn(model)


@pytest.mark.parametrize("build", [_tiny_densenet, _googlenet], ids=["densenet", "googlenet"])
def test_concatenated_spaces_are_units_and_slim_equals_masked(build):
    model = build()
    graph = find_units(model, 32)
    # every concatenated input is a unit; only the network's input and output stay whole
    assert sorted(r for _, r in graph.skipped) == ["network input", "network output"]
    on_concat = [u for u in graph.units if u.concat_before]
    assert len(on_concat) >= 4 and any(any(before) for u in on_concat for before in u.concat_before.values())
    g = torch.Generator().manual_seed(1)
    keeps = {u.name: torch.randperm(u.width, generator=g)[: max(1, u.width // 3)] for u in graph.units}
    diff, slim = slim_vs_masked(model, keeps)
    assert diff <= 1e-5
    assert sum(p.numel() for p in slim.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())


def test_shufflenet_leaves_only_its_shuffled_branch_outputs_whole():
    model = _random_bn(torchvision.models.get_model("shufflenet_v2_x0_5", num_classes=10))
    graph = find_units(model, 32)
    reasons = [r for _, r in graph.skipped]
    # the branch outputs go through the channel shuffle; the rest is the network's input/output
    assert sum("channel shuffle" in r for r in reasons) == len(reasons) - 2 == 19
    assert len([u for u in graph.units if ".branch2." in u.name]) == 16
    g = torch.Generator().manual_seed(1)
    keeps = {u.name: torch.randperm(u.width, generator=g)[: max(1, u.width // 2)] for u in graph.units}
    assert slim_vs_masked(model, keeps)[0] <= 1e-5


def test_the_latency_model_prices_layers_that_read_several_units(tmp_path, monkeypatch):
    """A conv on a concatenation reads several units: its timed axis is its total input width."""
    from gslim.compress.latency import LatencyModel
    from gslim.compress.latency_table import LatencySettings, LatencyTable
    from gslim.compress.slim import slim_unit
    from test_latency import _mac_timer

    _mac_timer(monkeypatch)  # layer and model times proportional to MACs
    model = _tiny_densenet()
    graph = find_units(model, 32)
    layers = model_layers(graph, graph.units, 32)
    several = [ly for ly in layers if len(ly.in_units) > 1]
    assert several and all(ly.axes()[0] == "in" for ly in several)
    settings = LatencySettings(backend="ort-cpu", threads=1)
    table = LatencyTable.open(settings, tmp_path / "table.json")
    lm = LatencyModel.build(model, graph, graph.units, 32, settings, table, round_to=2, min_width=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        widths = {u.name: 2 * int(torch.randint(1, u.width // 2 + 1, (1,), generator=g)) for u in graph.units}
        slim = copy.deepcopy(model)
        for u in find_units(slim, 32).units:
            slim_unit(slim, u, torch.arange(widths[u.name]))
        # the timer is 1e-6 ms per conv/Linear MAC: the predicted saving is the MACs saved, exactly
        saved = 1e-6 * (_conv_linear_macs(slim) - _conv_linear_macs(model))
        assert saved < 0 and lm.predict(widths) - lm.full_ms == pytest.approx(saved, rel=1e-6)


def _conv_linear_macs(model: nn.Module) -> int:
    total = 0

    def count(mod, args, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return total


def test_concat_models_meet_a_budget_and_greedy_refits_each_segment(tmp_path):
    from gslim.export.onnx import export_onnx
    from gslim.export.parity import onnx_parity

    model = _tiny_densenet()
    x, held = torch.randn(96, 3, 32, 32), torch.randn(64, 3, 32, 32)
    base, _ = count_macs_params(model, 32)
    errors = {}
    for criterion in ("greedy", "l1", "bn", "greedy-loss"):
        # random running statistics do not describe the data, so re-estimating them would change
        # the model itself; the comparison is of the selection and re-fit alone
        cfg = CompressConfig(
            criterion=criterion, target_macs=0.5, round_to=2, bn_recalib=False, loss_candidates=4
        )
        r = compress_model(model, 32, x, torch.randint(0, 10, (96,)), cfg)
        macs, _ = count_macs_params(r.model, 32)
        assert 0.4 * base <= macs <= 0.5 * base * 1.001, criterion
        with torch.no_grad():
            ref = model(held)
            errors[criterion] = float(((r.model(held) - ref) ** 2).mean() / (ref**2).mean())
    # each input of a concatenation is re-fitted where it is read: far closer than magnitude
    assert errors["greedy"] < 0.1 * errors["l1"]
    onnx_path = export_onnx(r.model, 32, tmp_path / "slim.onnx", opset=17)
    assert onnx_parity(r.model, onnx_path, held[:8], tolerance=1e-3)["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["densenet121", "googlenet"])
def test_full_size_concat_models_meet_half_the_macs_and_load_back_exactly(arch, tmp_path):
    kwargs = {"aux_logits": False, "init_weights": True} if arch == "googlenet" else {}
    torch.manual_seed(0)
    model = _random_bn(torchvision.models.get_model(arch, num_classes=10, **kwargs))
    x = torch.randn(32, 3, 32, 32)
    base, _ = count_macs_params(model, 32)
    r = compress_model(model, 32, x, None, CompressConfig(criterion="l1", target_macs=0.5))
    macs, _ = count_macs_params(r.model, 32)
    assert 0.45 * base <= macs <= 0.5 * base * 1.001
    path = save_checkpoint(r.model, ModelSpec(arch, 10, 32, widths=r.widths), tmp_path / "slim.pt")
    slim, _ = load_model(path)  # the concatenated widths come back from the checkpoint's shapes
    with torch.no_grad():
        assert torch.equal(slim(x[:4]), r.model.eval()(x[:4]))


class _OddConcats(nn.Module):
    """One space concatenated with itself, another joined along the batch: neither can be sliced
    as an independent input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(3, 8, 1)
        self.mix = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = torch.relu(self.a(x))
        twice = torch.cat([a, a, self.c(x)], 1)  # a's channels appear at two column ranges
        b = torch.relu(self.b(x))
        batch = torch.cat([b, b], 0)[: x.shape[0]]  # a cat along the batch, not the channels
        return self.fc((self.mix(twice) + batch).mean((2, 3)))


def test_a_space_read_twice_or_joined_along_the_batch_is_left_alone():
    graph = find_units(_OddConcats().eval(), 16)
    reasons = dict((desc.split(" produced by ")[1], r) for desc, r in graph.skipped)
    assert "reads it twice through one concatenation" in reasons["a"]
    assert "does not join channel maps along the channels" in reasons["b"]
    assert "c" in [u.name for u in graph.units]  # the other input of the concatenation is a unit
