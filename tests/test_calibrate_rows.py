"""Sampled regression rows gathered straight from a consumer's input equal the same rows of the
full unfold, for every conv geometry and padding mode the statistics support."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gslim.compress.calibrate import consumer_rows, row_count, target_rows

CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding=1, stride=2),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=(3, 5), padding=(1, 2), stride=(2, 1)),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=1),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=7, stride=2, padding=3, bias=False),
]


@pytest.mark.parametrize("kw", CONVS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sampled_rows_equal_the_rows_of_the_full_layout(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, **kw)
    x = torch.randn(3, 5, 11, 9)
    y = conv(x)
    n = row_count(conv, y)
    full_x, full_y = consumer_rows(conv, x), target_rows(conv, y)
    assert full_x.shape[0] == full_y.shape[0] == n
    for pick in (torch.tensor([0, n - 1]), torch.nonzero(torch.rand(n) < 0.3).flatten(), torch.arange(n)):
        assert torch.equal(consumer_rows(conv, x, pick), full_x[pick])
        assert torch.equal(target_rows(conv, y, pick), full_y[pick])
    # the fit reproduces the conv from gathered rows: weight rows in unfold's (C, kh, kw) order
    pick = torch.arange(0, n, 3)
    w = conv.weight.reshape(conv.out_channels, -1)
    assert torch.allclose(consumer_rows(conv, x, pick) @ w.T, target_rows(conv, y, pick), atol=1e-5)
    # sampled targets have their own memory: an in-place op after the hook cannot change them
    taken = target_rows(conv, y, pick)
    kept = taken.clone()
    y.detach().neg_()
    assert torch.equal(taken, kept)


def test_linear_rows_and_their_own_memory():
    lin = nn.Linear(4, 3)
    x = torch.randn(6, 4)
    y = lin(x)
    pick = torch.tensor([1, 4])
    rows = consumer_rows(lin, x, pick)
    assert torch.equal(rows, x[pick]) and torch.allclose(target_rows(lin, y, pick), (x @ lin.weight.T)[pick])
    taken, whole = rows.clone(), consumer_rows(lin, x)
    x.neg_()  # an in-place op after the hook cannot change rows already taken
    assert torch.equal(rows, taken) and torch.equal(whole, -x)


def test_a_linear_on_a_channels_last_map_has_one_row_per_position():
    """ConvNeXt's pointwise Linears read (N, H, W, C): every position is a regression row (a
    row per image would have been 1/(H*W) of the data, and the NCHW layout the wrong axes)."""
    from gslim.compress.calibrate import row_fraction

    lin = nn.Linear(4, 3)
    x = torch.randn(2, 5, 6, 4)
    y = lin(x)
    n = row_count(lin, y)
    assert n == 2 * 5 * 6
    pick = torch.tensor([0, 7, n - 1])
    assert torch.equal(consumer_rows(lin, x, pick), x.reshape(-1, 4)[pick])
    assert torch.allclose(target_rows(lin, y, pick), (x.reshape(-1, 4) @ lin.weight.T)[pick], atol=1e-6)
    assert row_fraction(lin, y.shape, images=1000, max_rows=3000) == pytest.approx(0.1)


@pytest.mark.parametrize("width", [40, 1700])
def test_gram_sums_equal_the_whole_product_however_they_are_blocked(width):
    """A wide Gram is summed block by block over its upper triangle and mirrored at the end: the
    result is the symmetric X^T X of every row added, like a narrow one's single product."""
    from gslim.compress.calibrate import StatsAccumulator

    torch.manual_seed(0)
    acc = StatsAccumulator(1.0, torch.Generator().manual_seed(0), holdout=0.0)
    xs = [torch.randn(n, width) for n in (30, 1, 50)]
    ys = [torch.randn(x.shape[0], 3) for x in xs]
    for x, y in zip(xs, ys):
        acc.add(x, y, None)
    st = acc.result(1)
    X, Y = torch.cat(xs).double(), torch.cat(ys).double()
    assert torch.equal(st.G, st.G.T)
    assert torch.allclose(st.G, X.T @ X, rtol=1e-5, atol=1e-3) and torch.allclose(st.B, X.T @ Y, atol=1e-3)
    assert st.rows == 81 and abs(st.yy - float(Y.pow(2).sum())) < 1e-6


def test_held_out_rows_kept_as_rows_measure_the_error_their_sums_did():
    """The walk keeps a sampled consumer's held-out rows as they are (their error: one product)
    instead of summing an F x F Gram of them: the same error of any weights (closer to the exact
    one, where the sums' yy - 2 <W, B> + <W, G W> cancels), and no held-out Gram."""
    from gslim.compress.calibrate import StatsAccumulator
    from gslim.compress.omp import subset_error
    from gslim.compress.sums import HeldRows, held_error

    torch.manual_seed(0)
    g, C, outs = 9, 7, 5  # a 3 x 3 consumer's columns: channel-major, 9 per channel
    W_true = torch.randn(g * C, outs)
    sums, rows = (
        StatsAccumulator(0.5, torch.Generator().manual_seed(3), held_as_data=m) for m in (False, True)
    )
    held_x, held_y = [], []
    for _ in range(4):
        sample = sums.draw(40, 1)
        assert torch.equal(rows.draw(40, 1).pick, sample.pick)
        X = torch.randn(sample.pick.numel(), g * C)
        Y = X @ W_true + 0.1 * torch.randn(X.shape[0], outs)
        sums.add(X, Y, sample.held)
        rows.add(X, Y, sample.held)
        held_x.append(X[sample.held].double())
        held_y.append(Y[sample.held].double())
    a, b = sums.result(g), rows.result(g)
    assert isinstance(b.held, HeldRows) and rows.held.G is None  # no held-out Gram was summed
    assert b.held.rows == a.held.rows > 0 and b.held.yy == pytest.approx(a.held.yy, rel=1e-12)
    assert torch.equal(a.G, b.G)  # the fitted sums are the same
    X, Y = torch.cat(held_x), torch.cat(held_y)
    for keep in ([0, 2, 5], list(range(C))):
        cols = torch.tensor([c * g + i for c in keep for i in range(g)])
        for W in (torch.randn(len(cols), outs, dtype=torch.float64), W_true[cols].double()):
            exact = float((X[:, cols] @ W - Y).pow(2).sum() / Y.pow(2).sum())
            assert held_error(b.held, keep, W) == pytest.approx(exact, rel=1e-5)
            assert subset_error(a.held, keep, W) == pytest.approx(exact, rel=1e-2)
