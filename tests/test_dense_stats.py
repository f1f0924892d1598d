"""Dense statistics of a k x k consumer (every position, one product per offset difference, the
cross term as a weight gradient) equal the statistics of the unfolded rows, and a selection made
with them equals the one made with every row sampled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gslim.compress import dense_stats
from gslim.compress.calibrate import StatsAccumulator, consumer_rows, target_map, target_rows
from gslim.compress.dense_stats import dense_cross, dense_gram, prefer_dense, supports_dense

GEOMETRIES = [
    (dict(kernel_size=3, padding=1), (7, 7)),
    (dict(kernel_size=3, padding=1), (2, 2)),
    (dict(kernel_size=3, padding=1), (1, 1)),
    (dict(kernel_size=3, padding=0), (6, 5)),
    (dict(kernel_size=3, padding=2, dilation=2), (9, 8)),
    (dict(kernel_size=5, padding=2), (6, 7)),
    (dict(kernel_size=(3, 5), padding=(1, 0)), (5, 9)),
    (dict(kernel_size=3, padding=3), (4, 4)),
    (dict(kernel_size=3, padding="same"), (5, 5)),
    (dict(kernel_size=4, padding="same"), (5, 4)),
]


@pytest.mark.parametrize("kw,hw", GEOMETRIES, ids=lambda v: str(v))
def test_dense_gram_and_cross_equal_those_of_the_unfolded_rows(kw, hw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **kw).double()
    assert supports_dense(conv)
    x = torch.randn(3, 4, *hw, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x)
    X, Y = consumer_rows(conv, x), target_rows(conv, y)
    G, B = dense_gram(conv, x.float()).double(), dense_cross(conv, x.float(), target_map(conv, y)).double()
    assert G.shape == (X.shape[1], X.shape[1])
    scale = float((X.T @ X).abs().max())
    assert float((G - X.T @ X).abs().max()) < 1e-5 * scale
    assert float((B - X.T @ Y).abs().max()) < 1e-5 * float((X.T @ Y).abs().max())
    assert torch.equal(G, G.T)
    assert B.is_contiguous() and G.is_contiguous()  # laid out as X^T Y and X^T X are


def test_dense_statistics_are_refused_where_they_would_not_be_exact():
    assert not supports_dense(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert not supports_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not supports_dense(nn.Conv2d(4, 4, 3, padding=1, groups=4))
    assert not supports_dense(nn.Conv2d(4, 4, 1))
    assert not supports_dense(nn.Linear(4, 4))


def test_dense_is_chosen_for_wide_late_maps_and_not_for_sparse_samples_or_tiny_maps():
    late = nn.Conv2d(512, 512, 3, padding=1)
    assert prefer_dense(late, (64, 512, 7, 7), 1.0, 49)  # ResNet's last stage, every row
    early = nn.Conv2d(64, 64, 3, padding=1)
    assert not prefer_dense(early, (64, 64, 56, 56), 0.01, 3136)  # 1% of the rows sampled
    assert not prefer_dense(nn.Conv2d(64, 64, 3, padding=1), (8, 64, 4, 4), 1.0, 16)  # overhead


def test_dense_held_out_share_is_whole_images_and_never_all_of_a_batch():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    acc = StatsAccumulator(1.0, torch.Generator().manual_seed(0), holdout=0.5, dense=True)
    held_images = fitted_images = 0
    for _ in range(20):
        x = torch.randn(4, 3, 6, 6)
        sample = acc.draw(4 * 36, 4)
        assert sample.pick is None and sample.held.shape == (4,) and not bool(sample.held.all())
        acc.add_dense(conv, x, target_map(conv, conv(x)), sample.held)
        held_images += int(sample.held.sum())
        fitted_images += int((~sample.held).sum())
    st = acc.result(9)
    assert held_images > 0 and st.rows == fitted_images * 36 and st.held.rows == held_images * 36
    one = StatsAccumulator(1.0, torch.Generator().manual_seed(0), holdout=0.99, dense=True)
    assert not bool(one.draw(36, 1).held.any())  # a one-image batch is fitted


@pytest.mark.parametrize("kw,hw", GEOMETRIES, ids=lambda v: str(v))
def test_held_out_images_kept_as_maps_measure_the_error_their_sums_did(kw, hw):
    """The walk keeps a dense consumer's held-out images as maps (their error: one conv) instead
    of summing their Gram and cross term: the same error of any weights, and no held-out Gram."""
    from gslim.compress.omp import subset_error
    from gslim.compress.sums import HeldMaps, held_error

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, **kw)
    sums, maps = (
        StatsAccumulator(1.0, torch.Generator().manual_seed(3), dense=True, held_as_data=m) for m in (0, 1)
    )
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(5, 6, *hw)
            y = target_map(conv, conv(x) + 0.1 * torch.randn_like(conv(x)))
            sample = sums.draw(0, 5)
            assert torch.equal(maps.draw(0, 5).held, sample.held)
            sums.add_dense(conv, x, y, sample.held)
            maps.add_dense(conv, x, y, sample.held)
    a, b = sums.result(conv.kernel_size[0] * conv.kernel_size[1]), maps.result(0)
    assert isinstance(b.held, HeldMaps) and maps.held.G is None  # no held-out Gram was summed
    assert b.held.rows == a.held.rows and b.held.yy == pytest.approx(a.held.yy, rel=1e-12)
    assert torch.equal(a.G, b.G)  # the fitted sums are the same
    kk = conv.kernel_size[0] * conv.kernel_size[1]
    for keep in ([0, 2, 5], list(range(6))):
        for W in (
            torch.randn(len(keep) * kk, 4, dtype=torch.float64),
            conv.weight.detach().double()[:, keep].reshape(4, -1).T,
        ):
            want = subset_error(a.held, keep, W)
            assert held_error(b.held, keep, W) == pytest.approx(want, rel=1e-5, abs=1e-9)


def _plain_net() -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    torch.manual_seed(0)
    net = nn.Sequential(
        *block(3, 16),
        *block(16, 24),
        nn.MaxPool2d(2),
        *block(24, 32),
        *block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.2, 0.2)
    return net.eval()


def test_a_batch_without_held_out_images_still_starts_the_held_out_sums():
    # under torchrun every rank all-reduces the held-out sums: a rank whose images were all
    # fitted must hold zeros of the same shapes, not nothing (the ranks would wait on each other)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    acc = StatsAccumulator(1.0, torch.Generator().manual_seed(0), holdout=0.2, dense=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        acc.add_dense(conv, x, target_map(conv, conv(x)), torch.tensor([False, False]))
    # (the Gram is summed offset-major, 9 offsets x 3 channels, and laid out as the columns at the end)
    assert acc.held.G is not None and acc.held.G.shape == (9, 3, 9, 3) and acc.held.B.shape == (27, 5)
    assert acc.held.rows == 0 and float(acc.held.G.abs().sum()) == 0.0
    st = acc.result(9)
    assert st.held is None and st.rows == 72


def test_a_selection_on_dense_statistics_equals_one_on_every_row_sampled(monkeypatch):
    from gslim.compress import calibrate
    from gslim.compress.select import compress_model
    from gslim.recipe import CompressConfig

    # every row, none held out: both ways fit the very same rows (well determined: 1,024+ rows
    # per consumer for at most 288 unknowns), so they must choose the same channels
    defaults = calibrate.StatsAccumulator.__init__.__defaults__
    monkeypatch.setattr(calibrate.StatsAccumulator.__init__, "__defaults__", (0.0,) + defaults[1:])
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig(criterion="greedy", target_macs=0.5, round_to=4, min_width=4, bn_recalib=False)
    chosen = {}

    def run(margin: float):
        monkeypatch.setattr(dense_stats, "DENSE_MARGIN", margin)
        dense = []
        real = calibrate.StatsAccumulator.add_dense
        monkeypatch.setattr(
            calibrate.StatsAccumulator, "add_dense", lambda s, *a: dense.append(1) or real(s, *a)
        )
        res = compress_model(_plain_net(), 16, x, None, cfg, seed=0, batch_size=8)
        chosen[margin] = len(dense)
        return res

    dense, sampled = run(float("inf")), run(0.0)
    assert chosen[float("inf")] > 0 and chosen[0.0] == 0
    assert dense.widths == sampled.widths and len(dense.units) == 3
    assert [u.order for u in dense.units] == [u.order for u in sampled.units]
    with torch.no_grad():
        a, b = dense.model(x), sampled.model(x)
    assert float((a - b).norm() / b.norm()) < 1e-4


@pytest.mark.parametrize("kw,hw", GEOMETRIES, ids=lambda v: str(v))
def test_a_dense_sum_over_batches_is_the_sum_of_their_whole_grams(kw, hw):
    # the sums add each batch's upper offset blocks only and mirror them once at the end: exactly
    # what summing every batch's whole (symmetric) float32 Gram in float64 gives, bit for bit
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **kw)
    batches = [torch.randn(3, 4, *hw) for _ in range(3)]
    weights = torch.zeros(conv.weight[0].numel(), 6, dtype=torch.float64)
    acc = StatsAccumulator(1.0, torch.Generator().manual_seed(0), 0.0, dense=True, cross_weights=weights)
    for x in batches:
        with torch.no_grad():
            y = conv(x)
        acc.add_dense(conv, x, target_map(conv, y), acc.draw(y[0, 0].numel() * 3, 3).held)
    expected = sum(dense_gram(conv, x).double() for x in batches)
    G = acc.result(conv.weight[0, 0].numel()).G
    assert torch.equal(G, expected) and torch.equal(G, G.T)
