"""Units, slimming, greedy selection and the compress CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from conftest import lstsq_error, slim_vs_masked
from gslim.compress import omp
from gslim.compress.omp import Stats, greedy_select, refit
from gslim.compress.select import compress_model
from gslim.compress.units import find_units
from gslim.errors import GslimError
from gslim.models import ModelSpec, count_macs_params, load_model, save_checkpoint
from gslim.recipe import CompressConfig

SIX = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet34", "resnet50"]


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("arch", SIX + ["efficientnet_b0", "mnasnet0_5"])
def test_slimmed_equals_masked(arch):
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.get_model(arch, num_classes=10))
    graph = find_units(model, 32)
    kinds = {u.kind for u in graph.units}
    assert "internal" in kinds and "residual" in kinds
    g = torch.Generator().manual_seed(1)
    keeps = {u.name: torch.randperm(u.width, generator=g)[: max(1, u.width // 3)] for u in graph.units}
    diff, slim = slim_vs_masked(model, keeps)
    assert sum(p.numel() for p in slim.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    assert diff <= 1e-5


def test_width_changing_grouped_convs_and_se_bottlenecks_are_left_alone_with_reasons():
    graph = find_units(torchvision.models.get_model("regnet_y_400mf", num_classes=10), 32)
    assert "squeeze-and-excitation" in " ".join(r for _, r in graph.skipped)
    assert any(u.kind == "residual" for u in graph.units)
    # a grouped conv with more outputs than inputs: its groups pair input and output ranges of
    # different sizes, so neither side's channels can be removed alone
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=4), nn.ReLU(), nn.Conv2d(16, 4, 1)
    )
    reasons = " ".join(r for _, r in find_units(model, 32).skipped)
    assert "grouped conv 2 with 8 inputs and 16 outputs" in reasons


@pytest.mark.parametrize("fold_columns", [None, 3])
@pytest.mark.parametrize("group", [1, 4])
def test_greedy_refit_is_monotone_and_least_squares_optimal(group, fold_columns, monkeypatch):
    if fold_columns is not None:  # the basis folded into the Gram every few steps (right-looking)
        monkeypatch.setattr(omp._GroupOmpState, "FOLD_COLUMNS", fold_columns)
    torch.manual_seed(0)
    C, outs, N = 12, 6, 500
    X = torch.randn(N, C * group, dtype=torch.float64)
    X[:, :group] += 0.8 * X[:, group : 2 * group]  # correlated channels: plain ranking would be fooled
    sparse = torch.randn(C * group, outs, dtype=torch.float64) * (torch.rand(C * group, 1) > 0.5)
    Y = X @ sparse
    st = Stats(X.T @ X, X.T @ Y, float((Y**2).sum()), group)
    order, path = greedy_select([st], ridge=0.0)
    assert all(b <= a + 1e-12 for a, b in zip(path, path[1:])), "error must never increase"
    for k in range(1, C + 1):
        cols = [j * group + t for j in order[:k] for t in range(group)]
        assert path[k - 1] == pytest.approx(lstsq_error(X, Y, cols), abs=1e-9)
        _, err = refit(st, sorted(order[:k]), ridge=0.0)
        assert err == pytest.approx(path[k - 1], abs=1e-9)

    # each step is the best single addition (greedy), checked by brute force
    def err_with(chosen, j):
        return lstsq_error(X, Y, [c * group + t for c in chosen + [j] for t in range(group)])

    for step in range(C):
        best = min(err_with(order[:step], j) for j in range(C) if j not in order[:step])
        assert err_with(order[:step], order[step]) == pytest.approx(best, abs=1e-9)


class _Block(nn.Module):
    """conv-bn-relu expand, then a 1x1 projection that reads only ``support`` channels."""

    def __init__(self, support: list[int]):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.proj = nn.Conv2d(16, 8, 1, bias=False)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            mask = torch.zeros(16)
            mask[support] = 1.0
            self.proj.weight.mul_(mask.view(1, -1, 1, 1))

    def forward(self, x):
        h = self.proj(self.act(self.bn(self.stem(x))))
        return self.head(h.mean((2, 3)))


def test_greedy_finds_the_channels_a_block_depends_on():
    torch.manual_seed(0)
    support = [1, 4, 9, 13]
    model = _Block(support).eval()
    x = torch.randn(64, 3, 12, 12)
    cfg = CompressConfig(criterion="greedy", eps=1e-4, ridge=1e-6, round_to=1, min_width=1, bn_recalib=False)
    result = compress_model(model, 12, x, None, cfg)
    rep = next(u for u in result.units if u.name == "stem")
    assert sorted(rep.order) == support
    assert rep.rel_error < 1e-4
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-4)


def test_greedy_beats_magnitude_on_the_discrepancy_it_minimises():
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.get_model("mobilenet_v2", num_classes=10))
    x = torch.randn(96, 3, 32, 32)
    out = {}
    for crit in ("greedy", "l1"):
        r = compress_model(
            model, 32, x, None, CompressConfig(criterion=crit, target_macs=0.5, bn_recalib=False)
        )
        with torch.no_grad():
            ref = model(x)
            out[crit] = float(((r.model(x) - ref) ** 2).mean() / (ref**2).mean())
    assert out["greedy"] < out["l1"]


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_small", "resnet18"])
@pytest.mark.parametrize("criterion", ["greedy", "l1", "uniform"])
def test_budget_is_met_within_one_rounding_step(arch, criterion):
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.get_model(arch, num_classes=10))
    x = torch.randn(64, 3, 32, 32)
    base_macs, _ = count_macs_params(model, 32)
    for target in (0.7, 0.4):
        r = compress_model(model, 32, x, None, CompressConfig(criterion=criterion, target_macs=target))
        macs, _ = count_macs_params(r.model, 32)
        assert macs <= target * base_macs * 1.001
        assert abs(macs / base_macs - r.budget["planned_fraction"]) < 0.002
        assert all(w % 8 == 0 or w == u.width for u in r.units for w in [u.kept])
        # one more rounding step on the widest-kept unit would exceed... at least the budget is used
        assert macs >= (target - 0.15) * base_macs


def test_unreachable_budget_is_one_clear_error():
    model = torchvision.models.get_model("mobilenet_v2", num_classes=10).eval()
    with pytest.raises(GslimError, match="unreachable"):
        compress_model(
            model,
            32,
            torch.randn(8, 3, 32, 32),
            None,
            CompressConfig(criterion="l1", target_macs=0.01, min_width=64, round_to=8),
        )


@pytest.mark.parametrize("rescale", [True, False])
def test_greedy_loss_adds_the_channel_that_lowers_the_loss_most(rescale):
    torch.manual_seed(0)
    model = _Block([2, 5, 11]).eval()
    x = torch.randn(48, 3, 12, 12)
    with torch.no_grad():
        y = model(x).argmax(1)
    cfg = CompressConfig(
        criterion="greedy-loss",
        target_params=0.9,
        round_to=1,
        min_width=1,
        loss_batch=48,
        loss_candidates=16,
        loss_rescale=rescale,
        bn_recalib=False,
    )
    result = compress_model(model, 12, x, y, cfg)
    rep = next(u for u in result.units if u.name == "stem")

    def loss_with(channels):  # brute force: mask the projection's input to the given channels
        m = copy.deepcopy(model)
        mask = torch.zeros(16)
        # the published Frank-Wolfe step: n selected channels of N, each scaled by N/n
        mask[channels] = 16 / len(channels) if rescale else 1.0
        with torch.no_grad():
            m.proj.weight.mul_(mask.view(1, -1, 1, 1))
            return float(nn.functional.cross_entropy(m(x), y))

    for step in range(3):
        chosen = rep.order[:step]
        best = min(loss_with(chosen + [j]) for j in range(16) if j not in chosen)
        assert loss_with(rep.order[: step + 1]) == pytest.approx(best, rel=1e-5)
    assert loss_with(rep.order[:3]) < loss_with([0, 1, 3])
    # the slim model computes what the scaled mask of its kept channels computes
    kept = sorted(rep.order[: rep.kept])
    scale = 16 / len(kept) if rescale else 1.0
    torch.testing.assert_close(
        result.model.proj.weight, model.proj.weight[:, kept] * scale, rtol=1e-6, atol=1e-7
    )


def test_criteria_are_deterministic_under_a_seed():
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.get_model("mobilenet_v3_small", num_classes=10))
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    for crit in ("bn", "random", "greedy"):
        cfg = CompressConfig(criterion=crit, target_macs=0.6)
        a = compress_model(model, 32, x, y, cfg, seed=3)
        b = compress_model(model, 32, x, y, cfg, seed=3)
        assert a.to_json()["units"] == b.to_json()["units"]
        assert a.widths == b.widths and a.widths


def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.get_model("resnet18", num_classes=10))
    x = torch.randn(32, 3, 32, 32)
    r = compress_model(model, 32, x, None, CompressConfig(target_macs=0.5, prune_residual=True))
    path = tmp_path / "slim.pt"
    save_checkpoint(r.model, ModelSpec("resnet18", 10, 32, widths=r.widths), path)
    loaded, spec = load_model(path)
    assert spec.widths == r.widths
    for (k, v), (k2, v2) in zip(r.model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with torch.no_grad():
        assert torch.equal(loaded(x), r.model(x))


def test_prune_residual_narrows_stage_widths():
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.get_model("mobilenet_v2", num_classes=10))
    # 256 images: with 64, the late streams (1x1 and 2x2 maps at 32 px) have fewer regression
    # rows than unknowns, and their only "cheap" look came from in-sample errors that read ~0
    x = torch.randn(256, 3, 32, 32)
    for crit in ("greedy", "l1"):
        r = compress_model(
            model, 32, x, None, CompressConfig(criterion=crit, target_macs=0.25, prune_residual=True)
        )
        assert any(u.kind == "residual" and u.kept < u.width for u in r.units), crit
        assert r.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_compress_cli_writes_checkpoint_and_selection(tmp_path, capsys):
    from gslim.cli import main

    model = _randomise_bn(torchvision.models.get_model("mobilenet_v2", num_classes=10))
    base = tmp_path / "base.pt"
    save_checkpoint(model, ModelSpec("mobilenet_v2", 10, 32), base)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\nmodel: {arch: mobilenet_v2, num_classes: 10, input_size: 32}\n"
        "data: {kind: synthetic, calib_images: 64, batch_size: 32}\n"
        f"run_dir: {tmp_path / 'run'}\ncompress: {{target_macs: 60%}}\n"
    )
    args = ["compress", str(recipe), "--model", str(base), "--no-progress"]
    with pytest.raises(SystemExit) as ex:
        main(args)
    assert ex.value.code == 0
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert sel["criterion"] == "greedy" and 0.5 < sel["macs_fraction"] <= 0.6
    assert {"name", "width", "kept", "order", "rel_error"} <= set(sel["units"][0])
    slim, spec = load_model(tmp_path / "run" / "slim.pt")
    assert spec.widths == sel["widths"]
    # a finished result is not overwritten silently
    with pytest.raises(SystemExit) as ex:
        main(args)
    assert ex.value.code != 0
    assert "--force" in capsys.readouterr().err
    # a budget option on the command line replaces the recipe's
    with pytest.raises(SystemExit) as ex:
        main(args + ["--force", "--criterion", "l1", "--target-macs", "40%"])
    assert ex.value.code == 0
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert sel["criterion"] == "l1" and sel["macs_fraction"] <= 0.4


def test_compress_cli_rejects_bad_values(tmp_path, capsys):
    from gslim.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["compress", "--eps", "0", "--run-dir", str(tmp_path)])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "compress.eps" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("arch", SIX)
def test_compressed_models_export_to_onnx_with_parity(arch, tmp_path):
    from gslim.export.onnx import export_onnx
    from gslim.export.parity import onnx_parity

    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.get_model(arch, num_classes=10))
    x = torch.randn(32, 3, 32, 32)
    r = compress_model(
        model, 32, x, None, CompressConfig(criterion="l1", target_macs=0.5, prune_residual=True)
    )
    path = save_checkpoint(r.model, ModelSpec(arch, 10, 32, widths=r.widths), tmp_path / "slim.pt")
    slim, _ = load_model(path)
    onnx_path = export_onnx(slim, 32, tmp_path / "slim.onnx", opset=17)
    # random weights with randomised BN statistics amplify float32 rounding through 50 layers
    # (ResNet-50 reaches 2e-4 on logits of 2); the trained demo model passes at 1e-4
    result = onnx_parity(slim, onnx_path, x[:16], tolerance=1e-3)
    assert result["passed"] and result["top1_agreement"] == 1.0


class _SplitsItsInput(nn.Module):
    """A space read by a conv and also split in halves by ``chunk`` (ShuffleNet-V2's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.conv2(b), self.conv3(x)], 1)
        return self.fc(y.mean((2, 3)))


def test_a_space_split_by_chunk_is_left_alone_with_its_reason():
    # removing channels before a chunk moves the split point: the halves would change
    model = _SplitsItsInput().eval()
    graph = find_units(model, 16)
    assert "conv1" not in [u.name for u in graph.units]
    assert any("splits or reduces the channels" in r for _, r in graph.skipped)
    x = torch.randn(32, 3, 16, 16)
    r = compress_model(model, 16, x, None, CompressConfig(eps=0.5, bn_recalib=False))
    with torch.no_grad():
        assert r.model(x[:2]).shape == (2, 4)


def test_a_consumer_with_few_rows_and_many_outputs_follows_the_same_path_on_its_thin_cross_term():
    torch.manual_seed(0)
    C, outs, N = 40, 64, 12  # 12 rows (a Linear at 12 images), 64 outputs: B has rank <= 12
    X = torch.randn(N, C, dtype=torch.float64)
    Y = X @ torch.randn(C, outs, dtype=torch.float64) + 0.1 * torch.randn(N, outs, dtype=torch.float64)
    st = Stats(X.T @ X, X.T @ Y, float((Y**2).sum()), 1, rows=N)
    thin = omp.thin_cross(st.B, st.rows)
    assert thin.shape[1] < outs
    torch.testing.assert_close(thin @ thin.T, st.B @ st.B.T, rtol=1e-10, atol=1e-10)
    order, path = greedy_select([st], k=30, ridge=1e-2)
    full_order, full_path = greedy_select(
        [Stats(st.G, st.B, st.yy, 1, rows=0)], k=30, ridge=1e-2
    )  # (B whole)
    assert order == full_order
    assert path == pytest.approx(full_path, abs=1e-12)
