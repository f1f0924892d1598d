"""The selection's passes with BatchNorm folded into its conv and the images channels-last
(compress/fast_passes.py): the same network function, the modules as they were afterwards, and a
hooked layer (a consumer, whose own output is a regression target) seen as written."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from gslim.compress import fast_passes
from gslim.compress.fast_passes import channels_selected, foldable_pairs, folded_batchnorm, statistics_layout
from gslim.compress.select import compress_model
from gslim.compress.units import trace
from gslim.recipe import CompressConfig


def _mobilenet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    for m in model.modules():  # non-trivial BN: a fold that drops a term shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.2, 1.5)
            m.bias.data.normal_(0, 0.3)
    return model


class _Interleaved(nn.Module):
    """conv -> BN pairs that must not fold: a conv read twice, a BN after another layer ran, a
    conv with a bias (folds), and a conv whose BN is shared."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.c, self.other, self.bn_c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.d, self.bn_shared = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))  # folds (the conv has a bias)
        y = self.b(x)
        x = self.bn_b(y) + y  # the conv's output read twice: no fold
        z = self.c(x)
        w = self.other(x)  # a layer between the conv and its BN: no fold
        x = self.bn_c(z) + w
        x = self.bn_shared(self.d(x))
        return self.bn_shared(x)  # a BN run twice: no fold


def test_the_pairs_are_a_conv_and_the_batchnorm_right_after_it_on_its_output_alone():
    assert foldable_pairs(trace(_Interleaved().eval(), 8)) == [("a", "bn_a")]
    pairs = foldable_pairs(trace(_mobilenet(), 32))
    assert ("features.0.0", "features.0.1") in pairs and (
        "features.1.conv.0.0",
        "features.1.conv.0.1",
    ) in pairs
    assert all(c.endswith(".0") or c.endswith("conv.1") or c.endswith("conv.2") for c, _ in pairs), pairs


def test_a_folded_network_computes_what_it_computes_unfolded_and_is_as_before_afterwards():
    model = _mobilenet()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pairs = foldable_pairs(trace(model, 32))
    calls = []
    original_bn = nn.BatchNorm2d.forward
    with torch.no_grad():
        ref = model(x)
        try:  # (counting the BatchNorms that still run)
            nn.BatchNorm2d.forward = lambda self, t: calls.append(self) or original_bn(self, t)
            with folded_batchnorm([model], pairs):
                out = model(x)
        finally:
            nn.BatchNorm2d.forward = original_bn
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(calls) == len(bns) - len(pairs)  # every paired BN ran inside its conv
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_a_hooked_conv_and_later_surgery_are_seen_at_each_call():
    model = _mobilenet()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expand, bn = model.features[2].conv[0][0], model.features[2].conv[0][1]  # expansion conv + BN
    pairs, seen = foldable_pairs(trace(model, 32)), []
    handle = expand.register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    with torch.no_grad():
        model(x)  # as written: the hook sees the conv's own output, before its BatchNorm
        with folded_batchnorm([model], pairs):
            hooked = model.features[:3](x)
            handle.remove()
            # surgery inside the block: the fold reads the layers' parameters at each call
            bn.running_mean.add_(0.5)
            expand.weight.mul_(0.7)
            folded = model.features[:3](x)
        torch.testing.assert_close(seen[1], seen[0])  # a consumer's target is its own output
        torch.testing.assert_close(folded, model.features[:3](x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(folded, hooked, rtol=1e-3, atol=1e-3)


def test_channels_selected_is_index_select_and_keeps_a_channels_last_map_channels_last():
    x = torch.randn(3, 10, 5, 6, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([0, 3, 4, 9])
    cl = statistics_layout(x)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    out = channels_selected(cl, 1, keep)
    assert torch.equal(out, x.index_select(1, keep)) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_selected(x, 1, keep), x.index_select(1, keep))  # planar: as before
    assert torch.equal(channels_selected(x, 3, keep[:2]), x.index_select(3, keep[:2]))


def test_greedy_selects_on_folded_channels_last_passes_what_it_selects_on_plain_ones(monkeypatch):
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig(criterion="greedy", target_macs=0.5, round_to=8, bn_recalib=False)

    def run():
        res = compress_model(_mobilenet(), 32, x, None, cfg, seed=0, batch_size=16)
        return res, {u.name: list(u.order) for u in res.units}

    fast, fast_orders = run()
    monkeypatch.setattr("gslim.compress.select.foldable_pairs", lambda gm: [])
    monkeypatch.setattr("gslim.compress.select.statistics_layout", lambda t: t)
    plain, plain_orders = run()
    assert fast.widths == plain.widths
    same = sum(fast_orders[k] == plain_orders[k] for k in fast_orders)
    assert same == len(fast_orders), (same, len(fast_orders))
    with torch.no_grad():
        torch.testing.assert_close(fast.model(x[:8]), plain.model(x[:8]), rtol=1e-3, atol=1e-4)
    # the slim model is a plain one: no per-call forward left on its layers, planar weights
    assert not any("forward" in m.__dict__ for m in fast.model.modules())
    assert all(p.is_contiguous() for p in fast.model.parameters())
    assert fast_passes.foldable_pairs(trace(fast.model, 32))  # (its pairs are still pairs)


def test_a_folded_output_that_reaches_its_batchnorm_as_another_tensor_is_an_error_not_normalised_twice():
    model = _mobilenet()
    conv, bn = model.features[0][0], model.features[0][1]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), folded_batchnorm([model], [("features.0.0", "features.0.1")]):
        first = conv(x)
        second = conv(x)  # e.g. every batch's conv output computed before the first BatchNorm ran
        with pytest.raises(RuntimeError, match="did not return"):
            bn(first)
        assert bn(conv(x)) is not None and second is not None


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_the_fold_leaves_out_exactly_the_convs_whose_output_ends_a_walk_segment(arch):
    """A pair is left unfolded only where the walk really ends a segment after its conv (its
    merged cuts, as it runs), not at every place it could: ResNet's stem conv, whose stretch the
    walk merges into the first block, folds with its BatchNorm."""
    from gslim.compress.greedy import segments_for, walk_cut_layers
    from gslim.compress.units import find_units

    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    graph = find_units(model, 64, include_residual=False)
    segments = segments_for(graph, [u for u in graph.units if u.kind == "internal"], model, merge_idle=True)
    nodes = list(graph.traced.graph.nodes)
    ends = {str(nodes[s.start].target) for s in segments if nodes[s.start].op == "call_module"}
    # (the model's output layer may be a cut too: nothing runs after it)
    assert ends <= walk_cut_layers(graph) <= ends | {str(nodes[segments[-1].end].target)}
    if arch == "resnet18":
        assert ("conv1", "bn1") in foldable_pairs(graph.traced) and "conv1" not in ends


class _Residuals(nn.Module):
    """Residual sums FX records as ``a + b``: one whose conv-BN operand only the sum reads (it
    may take the sum), one whose BN output is read again after it, one of two placeholders' worth
    (the input and a ReLU, which returns its input), and a conv's output that a sum broadcasts
    to a larger shape (the rewrite's guard then computes it out of place)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.pool = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x)) + x  # the BN's output (a folded conv's) is read by the sum alone
        z = self.bn2(self.conv2(y))
        w = z + y  # z is read again below: not reused
        v = w + torch.relu(w)  # neither operand is a conv's or BN's output
        g = self.pool(v.mean((2, 3), keepdim=True))  # (N, 4, 1, 1)
        return g + v + z  # g broadcasts up to (N, 4, H, W): computed out of place


def _reusing(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in fast_passes._REUSING]


def test_a_residual_sum_is_written_into_a_conv_output_only_it_reads_and_computes_the_same_bits():
    torch.manual_seed(0)
    model = _Residuals().eval()
    plain, rewritten = (
        torch.fx.symbolic_trace(model),
        fast_passes.reuse_add_operands(torch.fx.symbolic_trace(model)),
    )
    # the first sum, and the broadcast one (whose guard computes it out of place: shapes differ)
    assert _reusing(rewritten) == ["add", "add_3"]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        outs = []
        for gm in (plain, rewritten):  # folded: the BN returns its conv's output, which takes the sum
            with folded_batchnorm([gm], foldable_pairs(gm)):
                outs.append(gm(x.clone()))
        assert torch.equal(outs[1], outs[0])  # bit for bit
        seen = []  # (a hook on the BN: unfolded, its own output takes the sum)
        handle = model.bn.register_forward_hook(lambda m, a, out: seen.append(out.data_ptr()))
        try:
            first_sum = fast_passes.reuse_add_operands(_first_sum(model))
            out = first_sum(x.clone())
        finally:
            handle.remove()
        assert out.data_ptr() == seen[0]
        assert torch.equal(out, model.bn(model.conv(x)) + x)


def _first_sum(model: _Residuals) -> torch.fx.GraphModule:
    """The graph of :class:`_Residuals` up to its first sum."""
    gm = torch.fx.symbolic_trace(model)
    first = next(n for n in gm.graph.nodes if n.name == "add")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (first,)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def test_a_split_does_not_write_into_a_value_the_cut_keeps():
    """Split right after the BN, the sum's operand is a placeholder of the tail -- a value the walk
    keeps for its next pass -- and the tail's sum goes back to a new tensor."""
    from gslim.compress.calibrate import split_before_node

    torch.manual_seed(0)
    model = _Residuals().eval()
    gm = fast_passes.reuse_add_operands(torch.fx.symbolic_trace(model))
    assert fast_passes.reuses_add_operands(gm)
    split = split_before_node(gm, "add")
    assert "bn" in split.live and "add" not in _reusing(split.tail) and "add" in _reusing(gm)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        live = split.head(x.clone())
        kept = [v.clone() for v in live]
        out = split.tail(*live)
        assert all(torch.equal(a, b) for a, b in zip(live, kept))  # the kept values are as they were
        assert torch.equal(out, gm(x.clone()))


def test_the_walk_reusing_sums_selects_what_it_selects_with_plain_sums(monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig(criterion="greedy", target_macs=0.5, round_to=8, bn_recalib=False)

    def run():
        res = compress_model(model, 32, x, None, cfg, seed=0, batch_size=16)
        return res, {u.name: list(u.order) for u in res.units}

    reusing, reusing_orders = run()
    monkeypatch.setattr("gslim.compress.greedy.reuse_add_operands", lambda gm: gm)
    monkeypatch.setattr("gslim.compress.calibrate.reuses_add_operands", lambda gm: False)
    plain, plain_orders = run()
    assert reusing.widths == plain.widths and reusing_orders == plain_orders
    for (name, a), (_, b) in zip(reusing.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(a, b), name
