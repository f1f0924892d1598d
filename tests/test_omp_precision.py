"""The greedy path's precision (``compress.omp_precision``): float32 arithmetic on float64
statistics, errors summed in float64, the re-fit untouched, float64 where the ridge is too small
to protect a float32 path."""

from __future__ import annotations

import pytest
import torch

from conftest import lstsq_error
from gslim.compress import greedy, omp, planning
from gslim.compress.omp import MIN_RIDGE_FLOAT32, Stats, greedy_select, path_dtype


def _problem(C: int, group: int, outs: int = 8, N: int = 600, seed: int = 0):
    torch.manual_seed(seed)
    X = torch.randn(N, C * group, dtype=torch.float64)
    X[:, :group] += 0.8 * X[:, group : 2 * group]  # correlated channels
    scale = torch.linspace(0.2, 3.0, C * group, dtype=torch.float64)[torch.randperm(C * group)]
    W = torch.randn(C * group, outs, dtype=torch.float64) * scale[:, None]  # clear gaps between channels
    Y = X @ W + 0.05 * torch.randn(N, outs, dtype=torch.float64)
    return X, Y, Stats(X.T @ X, X.T @ Y, float((Y**2).sum()), group, rows=N)


@pytest.mark.parametrize("group,block_share", [(1, None), (9, None), (9, 1 / 16)])
def test_a_float32_path_takes_the_float64_order_with_float64_errors(group, block_share):
    X, Y, st = _problem(48, group)
    ref_order, ref_path = greedy_select([st], ridge=1e-2, block_share=block_share)
    order, path = greedy_select([st], ridge=1e-2, block_share=block_share, dtype=torch.float32)
    assert order == ref_order
    assert path == pytest.approx(ref_path, rel=1e-4, abs=1e-7)


def test_the_state_computes_in_the_path_dtype_and_keeps_its_errors_in_float64():
    _, _, st = _problem(16, 3)
    state = omp._GroupOmpState(st, 1e-2, 8, torch.float32)
    assert state.Gr.dtype == state.c.dtype == state.R.dtype == state.V.dtype == torch.float32
    state.add(torch.tensor([2]))
    assert state.errs.dtype == state.err.dtype == torch.float64
    assert st.G.dtype == torch.float64  # the statistics themselves are not touched


def test_a_float32_paths_errors_are_the_exact_errors_of_its_order():
    # summed in float64: the path's error after k channels is the least-squares error of those k
    # channels (a ridge too small to bias it), not a float32 running difference
    X, Y, st = _problem(60, 1, N=2000)
    order, path = greedy_select([st], ridge=1e-6, dtype=torch.float32)
    for k in (5, 20, 40, 60):
        # (float32 resolves the error to a few 1e-6 of ||Y||^2: the last, near-exact steps)
        assert path[k - 1] == pytest.approx(lstsq_error(X, Y, order[:k]), rel=1e-4, abs=5e-6)


def test_a_ridge_too_small_for_float32_runs_the_path_in_float64():
    assert path_dtype("float32", 1e-2) == torch.float32
    assert path_dtype("float32", MIN_RIDGE_FLOAT32) == torch.float32
    assert path_dtype("float32", MIN_RIDGE_FLOAT32 / 10) == torch.float64
    assert path_dtype("float32", 0.0) == torch.float64
    assert path_dtype("float64", 1e-2) == torch.float64
    with pytest.raises(ValueError):
        path_dtype("float16", 1e-2)


@pytest.mark.parametrize("precision,expected", [(None, torch.float32), ("float64", torch.float64)])
def test_compress_model_runs_every_greedy_path_in_the_recipes_precision(precision, expected, monkeypatch):
    from gslim.compress.select import compress_model
    from gslim.models import build_architecture
    from gslim.recipe import CompressConfig

    seen = []
    real = omp.greedy_select

    def spy(stats, **kw):
        seen.append(kw.get("dtype"))
        return real(stats, **kw)

    monkeypatch.setattr(planning, "greedy_select", spy)
    monkeypatch.setattr(greedy, "greedy_select", spy)
    torch.manual_seed(0)
    model = build_architecture("resnet18", 10).eval()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    extra = {} if precision is None else {"omp_precision": precision}
    cfg = CompressConfig(criterion="greedy", target_macs=0.6, round_to=8, bn_recalib=False, **extra)
    compress_model(model, 32, x, y, cfg, seed=0, batch_size=8)
    assert seen and set(seen) == {expected}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_path_leaves_the_statistics_as_they_were(dtype):
    # the state updates its residual cross term in place: it must be its own copy of B, in
    # either precision (in float64 a cast alone would hand it B itself)
    _, _, st = _problem(24, 1, outs=6)
    G, B = st.G.clone(), st.B.clone()
    greedy_select([st], k=10, ridge=1e-2, dtype=dtype)
    assert torch.equal(st.G, G) and torch.equal(st.B, B)
