"""CNN families beyond MobileNet/ResNet (#11): grouped convs (ResNeXt, RegNet) and ConvNeXt's
channels-last blocks. Units are found, slimmed exactly, selected to a budget and exported."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from conftest import slim_vs_masked
from gslim.compress.select import compress_model
from gslim.compress.slim import slim_unit
from gslim.compress.units import find_units
from gslim.errors import GslimError
from gslim.models import ModelSpec, count_macs_params, load_model, save_checkpoint
from gslim.recipe import CompressConfig

FAMILIES = ["resnext50_32x4d", "regnet_y_400mf", "regnet_x_400mf", "convnext_tiny"]


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and layer scales: ConvNeXt's layer scale starts at 1e-6, which
    would make every block's contribution (and any slicing mistake in it) invisible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def _whole_groups(width: int, atom: int, frac: float, g: torch.Generator) -> list[int]:
    n = width // atom
    groups = torch.randperm(n, generator=g)[: max(1, round(frac * n))]
    return sorted(int(a) * atom + i for a in groups for i in range(atom))


def _tiny_convnext() -> nn.Module:
    """ConvNeXt's block structure at a test's size: two stages of one block."""
    torch.manual_seed(0)
    return _random(ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], num_classes=10))


def test_grouped_convs_are_carried_a_whole_group_at_a_time():
    model = torchvision.models.get_model("regnet_y_400mf", num_classes=10).eval()
    graph = find_units(model, 32)
    grouped = [u for u in graph.units if u.atom > 1]
    assert grouped and all(u.atom == 8 for u in grouped)  # RegNetY-400MF's group width
    u = grouped[0]
    conv = next(m for m in u.members if isinstance(model.get_submodule(m), nn.Conv2d))
    assert model.get_submodule(conv).in_channels == u.width
    reasons = " ".join(r for _, r in graph.skipped)
    assert "squeeze-and-excitation" in reasons and "grouped conv" not in reasons
    with pytest.raises(GslimError, match="part of a group"):
        slim_unit(copy.deepcopy(model), u, list(range(4)) + list(range(8, 16)))
    with pytest.raises(GslimError, match="part of a group"):  # the right count, misaligned
        slim_unit(copy.deepcopy(model), u, list(range(4, 12)))


def test_convnext_hidden_linears_are_units_and_layer_norm_spaces_are_left_alone():
    graph = find_units(torchvision.models.get_model("convnext_tiny", num_classes=10), 32)
    hidden = [u for u in graph.units if u.producers[0].endswith("block.3")]
    assert len(hidden) == 18 and all(u.consumers == [u.producers[0][:-1] + "5"] for u in hidden)
    assert [u.width for u in hidden] == [4 * 96] * 3 + [4 * 192] * 3 + [4 * 384] * 9 + [4 * 768] * 3
    reasons = " ".join(r for _, r in graph.skipped)
    assert "layer_scale" in reasons  # the block outputs: a per-channel layer scale, not sliced


@pytest.mark.parametrize("arch", FAMILIES)
def test_slimmed_equals_masked_on_grouped_and_channels_last_families(arch):
    torch.manual_seed(0)
    model = _random(torchvision.models.get_model(arch, num_classes=10))
    units = find_units(model, 32).units
    g = torch.Generator().manual_seed(1)
    keeps = {u.name: _whole_groups(u.width, u.atom, 1 / 3, g) for u in units}
    diff, slim = slim_vs_masked(model, keeps)
    assert sum(p.numel() for p in slim.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    assert diff <= 1e-5


def test_greedy_refits_channels_last_linears_to_the_original_outputs():
    model = _tiny_convnext()
    x = torch.randn(64, 3, 32, 32)
    out = {}
    for crit in ("greedy", "l1"):
        r = compress_model(model, 32, x, None, CompressConfig(criterion=crit, target_macs=0.6, round_to=4))
        with torch.no_grad():
            ref = model(x)
            out[crit] = float(((r.model(x) - ref) ** 2).mean() / (ref**2).mean())
        assert all(u.kept < u.width for u in r.units)
    assert out["greedy"] < 0.5 * out["l1"]


@pytest.mark.parametrize("criterion", ["greedy", "greedy-loss", "l1", "random"])
def test_every_criterion_keeps_whole_groups(criterion):
    torch.manual_seed(0)
    model = _random(torchvision.models.get_model("regnet_x_400mf", num_classes=10))
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    cfg = CompressConfig(criterion=criterion, target_macs=0.5, loss_batch=16, loss_candidates=4)
    r = compress_model(model, 32, x, y, cfg)
    atoms = {u.name: u.atom for u in find_units(model, 32).units}
    assert any(atoms[u.name] > 8 and u.kept < u.width for u in r.units)  # group width 16
    for u in r.units:
        kept = sorted(u.order[: u.kept])
        assert len(kept) % atoms[u.name] == 0
        assert all(
            kept[i] // atoms[u.name] == kept[i + atoms[u.name] - 1] // atoms[u.name]
            for i in range(0, len(kept), atoms[u.name])
        )
    with torch.no_grad():
        assert r.model(x[:2]).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,criterion", [("resnext50_32x4d", "greedy"), ("regnet_y_400mf", "greedy"), ("convnext_tiny", "l1")]
)
def test_families_meet_half_the_macs_and_export_with_parity(arch, criterion, tmp_path):
    from gslim.export.onnx import export_onnx
    from gslim.export.parity import onnx_parity

    torch.manual_seed(0)
    model = _random(torchvision.models.get_model(arch, num_classes=10))
    x = torch.randn(32, 3, 64, 64)
    base, _ = count_macs_params(model, 64)
    r = compress_model(model, 64, x, None, CompressConfig(criterion=criterion, target_macs=0.5))
    macs, _ = count_macs_params(r.model, 64)
    assert 0.45 * base <= macs <= 0.5 * base * 1.001
    path = save_checkpoint(r.model, ModelSpec(arch, 10, 64, widths=r.widths), tmp_path / "slim.pt")
    slim, _ = load_model(path)  # the widths (and group counts) come back from the checkpoint
    with torch.no_grad():
        assert torch.equal(slim(x[:4]), r.model.eval()(x[:4]))
    onnx_path = export_onnx(slim, 64, tmp_path / "slim.onnx", opset=17)
    result = onnx_parity(slim, onnx_path, x[:8], tolerance=1e-3)
    assert result["passed"] and result["top1_agreement"] == 1.0
