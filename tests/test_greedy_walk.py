"""The greedy walk's shortcuts (compress/segment_walk.py) change the cost, never the result.

After a unit's surgery the walk reruns only the segment's tail, from its consumer, on cached
values with the dropped channels sliced off, and keeps the original segment's output from the
first pass. Both must give what rerunning everything gives, and a graph the shortcut does not
capture must fall back to the full rerun (with a warning), not to a wrong selection.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

from gslim.compress import calibrate, planning, segment_walk
from gslim.compress.select import compress_model
from gslim.recipe import CompressConfig


@pytest.fixture(autouse=True)
def _passes_as_written(monkeypatch):
    """The shortcuts must give what rerunning gives bit for bit, so these tests run the network as
    written: the passes' rewrites (compress/fast_passes.py) round differently where a layer runs
    in another width or with a hook on it (oneDNN's channels-last kernels block by width; a
    consumer is unfolded while the original's hook reads its output), and in these random-weight
    networks near-tied channels then swap. tests/test_fast_passes.py checks the rewrites."""
    monkeypatch.setattr("gslim.compress.select.foldable_pairs", lambda gm: [])
    monkeypatch.setattr("gslim.compress.select.statistics_layout", lambda t: t)


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    for m in model.modules():  # non-trivial BN so that channels differ in what they carry
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.2, 1.5)
    return model


def _compress(model: torch.nn.Module, x: torch.Tensor):
    cfg = CompressConfig(criterion="greedy", target_macs=0.5, round_to=8, bn_recalib=False)
    res = compress_model(model, 32, x, None, cfg, seed=0, batch_size=16)
    return res, {u.name: list(u.order) for u in res.units}


def _plain_chain() -> torch.nn.Module:
    """A VGG-style chain: every conv consumes the previous unit and produces the next, so the
    whole feature extractor is one segment of the walk."""
    torch.manual_seed(0)
    layers, c = [], 3
    for w in (16, 24, 24, 32):
        layers += [torch.nn.Conv2d(c, w, 3, padding=1, bias=False), torch.nn.BatchNorm2d(w), torch.nn.ReLU()]
        c = w
    model = torch.nn.Sequential(
        *layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 10)
    ).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    return model


def _small_densenet() -> torch.nn.Module:
    """DenseNet's graph (every layer's output a unit read inside the later concatenations), small."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(
        growth_rate=8, block_config=(3, 3), num_init_features=16, bn_size=2, num_classes=10
    ).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    return model


def _build(arch: str) -> torch.nn.Module:
    return {"plain_chain": _plain_chain, "densenet": _small_densenet}.get(arch, lambda: _model(arch))()


@pytest.mark.parametrize(
    "arch", ["mobilenet_v3_small", "resnet18", "mobilenet_v2", "plain_chain", "densenet"]
)
def test_resuming_from_the_consumer_selects_what_a_full_rerun_selects(arch, monkeypatch):
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the shortcut must not fall back here
        fast, fast_orders = _compress(_build(arch), x)
    monkeypatch.setattr(segment_walk, "RESUME_CACHE_BYTES", -1)  # no cached values: every segment rerun whole
    slow, slow_orders = _compress(_build(arch), x)
    assert fast.widths == slow.widths and fast_orders == slow_orders
    with torch.no_grad():
        torch.testing.assert_close(fast.model(x[:8]), slow.model(x[:8]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["plain_chain", "mobilenet_v2", "densenet"])
def test_a_chain_of_units_in_one_segment_runs_each_layer_once_in_the_walk(arch):
    # plain_chain: four units, one segment; MobileNetV2: the stem, features.1 and features.2's
    # expansion are three chained units; DenseNet: the stem and the first dense block are one
    # segment, its layers' outputs units read inside every later concatenation (their passes
    # resume before the concatenation). Each unit's pass resumes where the previous one stopped.
    model = _build(arch)
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    images = []
    stem.register_forward_hook(lambda m, a, o: images.append(a[0].shape[0]))  # (copied to the pruned model)
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _compress(model, x)
    # the planning pass (the original network) and the walk (the pruned one) see every batch once
    # (before the chain, the walk ran the segment once per unit in it: 1 + 4 or 1 + 3 times);
    # beside those, only the check images (a few per resumed pass) and the trace's example inputs
    batch = 16
    assert images.count(batch) == 2 * len(x) // batch, images
    assert all(n <= segment_walk.RESUME_CHECK_IMAGES for n in images if n != batch), images


def test_the_walk_keeps_whole_set_activations_only_where_a_segment_holds_a_unit():
    """Every image's activation is kept at each cut of the walk. A ResNet's stem (conv, BatchNorm,
    ReLU, max-pool) holds no unit: it is part of the first block's segment, not four cuts of
    whole-set 112 x 112 maps; past the last unit nothing runs (the head's output is never read)."""
    from gslim.compress import greedy
    from gslim.compress.units import find_units

    model = _model("resnet18")
    graph = find_units(model, 32, include_residual=False)
    units = graph.units
    merged = greedy.segments_for(graph, units, model, merge_idle=True)
    ends = [max(graph.node_index[graph.consumer_node[c]] for c in u.consumers) for u in units]
    holds = [any(seg.start < e <= seg.end for e in ends) for seg in merged]
    assert all(holds[:-1]) and len(merged) <= len(units) + 1, holds
    first = {n.target for n in merged[0].module.graph.nodes if n.op == "call_module"}
    assert {"conv1", "bn1", "relu", "maxpool", "layer1.0.conv1", "layer1.0.conv2"} <= first
    calls = []
    model.fc.register_forward_hook(
        lambda m, a, o: calls.append(a[0].shape[0])
    )  # (copied to the pruned model)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _compress(model, x)
    # the planning pass runs the whole original network once per batch; the walk never reaches fc
    assert calls.count(16) == 2, calls


def test_an_se_units_second_pass_starts_at_its_squeeze(monkeypatch):
    # an SE unit is selected in two passes (the second after its surgery and the squeeze's
    # re-fit); the second starts from the first's values at the squeeze, so the expansion conv
    # before it runs once in the walk (before: twice), and the selection is unchanged
    model = _model("mobilenet_v3_small")
    expand = model.features[4].block[0][0]  # the first SE block with an expansion
    images = []
    expand.register_forward_hook(lambda m, a, o: images.append(a[0].shape[0]))  # (copied to the pruned model)
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fast, fast_orders = _compress(model, x)
    batch = 16
    assert images.count(batch) == 2 * len(x) // batch, images  # the planning pass and the walk
    monkeypatch.setattr(segment_walk.SegmentWalk, "unit_sliced", lambda *a: None)  # no resume there
    _, slow_orders = _compress(_model("mobilenet_v3_small"), x)
    assert fast_orders == slow_orders


def test_a_shortcut_that_does_not_reproduce_the_segment_falls_back_to_the_full_rerun(monkeypatch):
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref, ref_orders = _compress(_model("mobilenet_v3_small"), x)
    # cached values that are not what the segment computes (stale ones, say): the tail is wrong
    sliced = segment_walk._Step.sliced  # (the resumed pass and the segment's end both check)
    monkeypatch.setattr(
        segment_walk._Step,
        "sliced",
        lambda self, values, width, keep: tuple(1.5 * v for v in sliced(self, values, width, keep)),
    )
    with pytest.warns(UserWarning, match="recomputed whole"):
        res, orders = _compress(_model("mobilenet_v3_small"), x)
    assert res.widths == ref.widths and orders == ref_orders


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18"])
def test_targets_kept_by_planning_replace_the_original_network_in_the_walk(arch, monkeypatch):
    # every row taken, none held out: both ways then fit the very same rows, so they must agree
    defaults = calibrate.StatsAccumulator.__init__.__defaults__  # (holdout first)
    monkeypatch.setattr(calibrate.StatsAccumulator.__init__, "__defaults__", (0.0,) + defaults[1:])
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig(
        criterion="greedy", target_macs=0.5, round_to=8, bn_recalib=False, max_positions=10**6
    )

    def run(cap: int):
        monkeypatch.setattr(planning, "TARGET_STORE_BYTES", cap)
        model = _model(arch)
        calls = []
        stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        stem.register_forward_hook(lambda m, *a: calls.append(m))  # (copied to the pruned model too)
        res = compress_model(model, 32, x, None, cfg, seed=0, batch_size=4)
        return res, {u.name: list(u.order) for u in res.units}, sum(m is stem for m in calls)

    kept, kept_orders, kept_calls = run(planning.TARGET_STORE_BYTES)
    rerun, rerun_orders, rerun_calls = run(0)  # nothing kept: the walk runs the original network
    # the original network's first layer: with kept targets only in the planning pass (2 batches)
    assert kept_calls == 2 and rerun_calls > 2
    assert kept.widths == rerun.widths and kept_orders == rerun_orders
    with torch.no_grad():
        torch.testing.assert_close(kept.model(x), rerun.model(x), rtol=1e-4, atol=1e-5)


def test_the_walk_lets_go_of_a_segments_input_batch_by_batch_as_it_computes_the_output():
    """A segment's input and output are both whole-set activations, held together while the walk
    ran the segment's end (ResNet-50, 224 px, 256 images: 1.6 GB at layer1; the in-use heap's peak
    3.13 GB, 2.60 GB letting go). Each input batch is let go once its output batch exists."""
    import weakref

    model = _model("resnet18")
    block = model.layer1[1]  # a segment of its own: its input is the walk's whole-set activation
    seen, alive_at_end = [], []
    block.conv1.register_forward_hook(  # (copied to the pruned model: the hooks tell the two apart)
        lambda m, a, o: seen.append(weakref.ref(a[0])) if m is not block.conv1 and len(a[0]) == 16 else None
    )
    block.bn2.register_forward_hook(
        lambda m, a, o: (
            alive_at_end.append(sum(r() is not None for r in seen))
            if m is not block.bn2 and len(a[0]) == 16
            else None
        )
    )
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _compress(model, x)
    # the walk's first pass over the block sees its four input batches, the segment's end then
    # runs once per batch: before batch i's end, batches 0..i-1 of the input are gone
    assert len(seen) == 4 and alive_at_end == [4, 3, 2, 1], alive_at_end


def test_an_se_units_second_pass_resumes_where_another_value_alive_at_the_squeeze_is_as_wide(
    monkeypatch, capfd
):
    # RegNetY: a block's inner width (the SE unit) equals its input's, which is alive at the
    # squeeze for the shortcut. Only the unit's own values are cut there (by the graph, not by
    # their width): cutting the shortcut too failed the resumed pass (FX printed its traceback),
    # and the second pass ran from the segment's input again.
    model = _model("regnet_y_400mf")
    producer = getattr(model.trunk_output.block2, "block2-1").f.a[0]  # the SE unit's producer
    images = []
    producer.register_forward_hook(
        lambda m, a, o: images.append(a[0].shape[0])
    )  # (copied to the pruned model)
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fast, fast_orders = _compress(model, x)
    assert "FX-traced" not in capfd.readouterr().err
    assert images.count(16) == 2 * len(x) // 16, images  # the planning pass and the walk's first pass
    monkeypatch.setattr(segment_walk.SegmentWalk, "unit_sliced", lambda *a: None)  # no resume there
    slow, slow_orders = _compress(_model("regnet_y_400mf"), x)
    assert fast_orders == slow_orders and fast.widths == slow.widths
