"""Greedy forward selection with re-fitting, as linear algebra on second-order statistics.

A unit's consumer computes ``Y = X W`` where the rows of X are positions and its
columns come in groups, one group per input channel (1 column for a 1x1 conv or a
Linear, k*k columns for a k x k conv, as ``F.unfold`` lays them out). Selecting a set
S of channels and re-fitting W by least squares leaves the error

    E(S) = ||Y||^2 - B_S^T G_SS^-1 B_S,       G = X^T X (+ ridge),  B = X^T Y.

Greedy optimization (Ye, Wu & Liu, NeurIPS 2020) adds, one group at a time, the group
whose addition lowers E(S) the most, re-fitting after each step. That is orthogonal
matching pursuit over groups, done here entirely in Gram space: V holds X^T q for the
orthonormal basis q of the selected columns, ``c`` the part of B not yet explained and
``R`` each candidate's residual Gram block, so every step costs O(F * K * g) with no
pass over the data. The drop in error from adding group j is tr(c_j^T R_j^-1 c_j).

Several consumers reading the same channels (a residual stream, or a stem read by a
block and its shortcut) keep one state each and are scored jointly: the chosen channel
is the one that lowers the *sum* of their errors.

The statistics are float64 sums; the path's own arithmetic (the Schur complement, the residual
cross term, the scores) runs in ``dtype``, float32 by default in gslim's recipes
(``compress.omp_precision``): it is arithmetic-bound on a CPU, so float32 about halves it on
wide Grams (ResNet-18's 4,608-column paths: 6.3 -> 2.9 s), and the ridge keeps every residual
block at least ``ridge`` times the mean feature energy away from singular, far above float32's
rounding. The errors along the path are summed in float64, and
the re-fit of the kept channels (:func:`refit`) is float64 whatever the path's precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from gslim.errors import GslimError


@dataclass
class Stats:
    """Second-order statistics of one consumer (float64)."""

    G: torch.Tensor  # (F, F)
    B: torch.Tensor  # (F, O)
    yy: float  # ||Y||^2
    group: int  # columns per channel
    rows: int = 0
    held: Optional[Any] = None  # the same sums over rows kept out of the fit (or sums.HeldMaps / HeldRows)

    @property
    def channels(self) -> int:
        return self.G.shape[0] // self.group


class _GroupOmpState:
    """One consumer's greedy state. A step needs the chosen group's column block of the Schur
    complement ``Gr - V V^T``; early on it is computed from the basis (left-looking: one read
    of V, cheap while V is narrow), later from ``Gr`` with the basis folded into it in blocks
    (right-looking: one matrix product per block of steps instead of a read of the whole,
    memory-bound, basis at every step). Same arithmetic, reordered.

    A fold also drops the chosen groups' rows and columns from every part of the state (Gr, the
    residual cross term, the residual blocks and the basis): no later step reads them, and the
    fold's product, the largest cost of a long path on a wide Gram, shrinks with the square of
    what is left. Groups are addressed by their original index; ``local`` maps them to rows."""

    #: a path that ends before the basis has this share of Gr's columns is not folded at all
    #: (4,608 columns, 200 of 512 groups: 2.4 s left-looking, 2.8 s folded) ...
    FOLD_PATHS_TO = 0.5
    #: ... a longer one from when the basis has this share ...
    FOLD_FROM = 0.25
    #: ... then every time this many more basis columns have been added. Measured on a
    #: 4,608-column Gram (ResNet's 512-channel 3x3 consumers), full path, one thread: 12.8 s
    #: left-looking, 7.0 s folding from a quarter in blocks of 261 columns (29 groups of 9).
    #: Since a fold drops the chosen rows, wider blocks pay (the same Gram, two threads,
    #: planning path / 266 single steps): 256 columns 1.92 / 2.08 s, 768 1.56 / 1.93 s, 1,024
    #: 1.57 / 2.00 s; no fold 1.84 / 2.23 s; before the rows were dropped, 256: 2.44 / 2.22 s.
    FOLD_COLUMNS = 768

    def __init__(self, st: Stats, ridge: float, capacity: int, dtype: torch.dtype = torch.float64):
        g, F = st.group, st.G.shape[0]
        dev = st.G.device
        self.fold_from = self.FOLD_FROM * F if capacity * g >= self.FOLD_PATHS_TO * F else float("inf")
        self.g, self.C, self.F = g, F // g, F
        lam = ridge * float(torch.diagonal(st.G).mean().clamp_min(1e-12))
        self.Gr = st.G.to(dtype, copy=True)  # (the state's own)
        self.Gr.diagonal().add_(lam)  # (no F x F identity: at 9,216 columns each is 340 MB written)
        self.c = thin_cross(st.B, st.rows).to(dtype, copy=True)  # (the state's own: updated in place)
        idx = torch.arange(self.C, device=dev)
        blocks = self.Gr.view(self.C, g, self.C, g)[idx, :, idx, :]  # (C, g, g) diagonal blocks
        self.R = blocks.clone()
        self.capacity = capacity
        self.V = torch.zeros(F, capacity * g, dtype=dtype, device=dev)
        self.k = 0
        self.folded = 0  # groups of V already subtracted from Gr (Gr is this state's own copy)
        self.groups = idx  # the original index of each group still in the state (its rows)
        self.local = idx.clone()  # original index -> row group (-1: dropped by a fold)
        self.taken = torch.zeros(self.C, dtype=torch.bool, device=dev)  # chosen, not yet dropped
        self.yy = float(st.yy)
        # the error after each step, kept on the device: a step reads nothing back to the host
        # (on a GPU a read is a synchronisation, and the loop is thousands of small kernels)
        self.errs = torch.empty(capacity, dtype=torch.float64, device=dev)
        self.err = torch.tensor(self.yy, dtype=torch.float64, device=dev)
        self.columns = torch.arange(g, device=dev)
        self.eye = torch.eye(g, dtype=dtype, device=dev)

    def scores(self) -> torch.Tensor:
        """The drop in error from adding each group, by original index (0 for dropped groups,
        which the caller has marked taken)."""
        if self.g == 1:
            # a norm, not pow(2).sum(1): no F x O temporary (2,048 x 2,048: 0.6 ms against 10 ms)
            local = torch.linalg.vector_norm(self.c, dim=1).square() / self.R.view(-1).clamp_min(1e-30)
        else:
            cj = self.c.view(-1, self.g, self.c.shape[1])
            # tr(c_j^T R_j^-1 c_j) = <R_j^-1, c_j c_j^T>: g x g products per candidate instead of
            # g x O solves (2.5x faster at C=256, g=9, O=256). R is small and well conditioned
            # (ridge). (inv_ex: no error check, which on a GPU would read the status back every step)
            local = (torch.linalg.inv_ex(self.R).inverse * (cj @ cj.transpose(1, 2))).sum((1, 2))
        if local.shape[0] == self.C:
            return local
        return local.new_zeros(self.C).index_copy_(0, self.groups, local)

    def add(self, groups: torch.Tensor) -> None:
        """Add ``groups`` (a device index tensor of original indices) in their order. One group:
        the chosen block of the Schur complement comes from the candidates' residual blocks R.
        Several: one block step (the planning curves' path) -- one Schur block, one Cholesky
        factor and one rank-(m*g) update of the residual instead of m rank-g ones, so the F x O
        residual is read once; the same arithmetic as m single steps (block Cholesky), and the
        errors after each group stay exact for this order."""
        g, m = self.g, groups.numel()
        # before the first fold every group is its own row (``local`` is the identity): no gather
        rows = self.local[groups] if self.folded else groups
        idx = self._columns(rows)
        pending = self.V[:, : (self.k - self.folded) * g]
        # Gr is symmetric: its rows are its columns, and a row is one contiguous read where a
        # column gathers an element from every row (4,608 x 4,608: 0.01 ms against 0.39 ms)
        cols = torch.addmm(self.Gr.index_select(0, idx).T, pending, pending.index_select(0, idx).T, alpha=-1)
        c_sel = self.c.index_select(0, idx)
        if m == 1 and g == 1:  # scalar Cholesky factor: avoid the triangular solves
            root = self.R.view(-1).index_select(0, rows).clamp_min(1e-30).sqrt()
            v, u = cols / root, c_sel / root
        else:
            block = self.R.index_select(0, rows)[0] if m == 1 else cols.index_select(0, idx)
            L = torch.linalg.cholesky_ex(block).L  # SPD: the ridge bounds it below (no status read)
            v = torch.linalg.solve_triangular(L, cols.T, upper=False).T  # (F, m*g)
            u = torch.linalg.solve_triangular(L, c_sel, upper=False)  # (m*g, O)
        # in place: a rank-g update through a temporary costs 10x more (F x O written twice)
        self.c.addmm_(v, u, alpha=-1)
        vb = v.view(-1, g, m * g)
        self.R.baddbmm_(vb, vb.transpose(1, 2), alpha=-1)
        self.R[rows] = self.eye  # selected: residual is zero; keep solves regular
        # index_fill_, not ``taken[rows] = True``: a setitem copies the scalar from the host, and
        # on a GPU that copy waits for the queue -- one stall per step (device check on an H100)
        self.taken.index_fill_(0, rows, True)
        start = (self.k - self.folded) * g
        self.V[:, start : start + m * g] = v
        # the errors in float64 whatever the path's precision: a long path subtracts many small drops
        if m == 1:
            self.errs[self.k] = self.err.sub_(u.pow(2).sum(dtype=torch.float64))  # (err: the state's own)
        else:  # (the planning path: a cumulative sum is not the step-by-step rounding, no matter)
            drops = u.view(m, g, -1).pow(2).sum((1, 2), dtype=torch.float64)
            self.errs[self.k : self.k + m] = self.err - drops.cumsum(0)
            self.err = self.errs[self.k + m - 1].clone()
        self.k += m
        if self.k * g >= self.fold_from and (self.k - self.folded) * g >= min(self.FOLD_COLUMNS, self.F):
            self._fold()

    def _columns(self, rows: torch.Tensor) -> torch.Tensor:
        """The columns of row groups ``rows`` (a device tensor), g per group, in their order."""
        if self.g == 1:
            return rows  # (two ops fewer per step: on a GPU each is a launch)
        return (rows[:, None] * self.g + self.columns).view(-1)

    def _fold(self) -> None:
        """Subtract the basis added since the last fold from Gr, on the groups not chosen only."""
        g = self.g
        left = self.groups.shape[0] - (self.k - self.folded)  # groups not chosen (known on the host)
        # the rows not taken, in order, without reading the mask back (a sort, not a nonzero)
        keep = torch.argsort(self.taken.to(torch.int8), stable=True)[:left]
        cols = self._columns(keep)
        block = self.V[:, : (self.k - self.folded) * g].index_select(0, cols)
        self.Gr = self.Gr.index_select(0, cols).index_select(1, cols).addmm_(block, block.T, alpha=-1)
        self.c = self.c.index_select(0, cols)
        self.R = self.R.index_select(0, keep)
        self.groups = self.groups.index_select(0, keep)
        self.local.fill_(-1).index_copy_(0, self.groups, torch.arange(left, device=keep.device))
        self.taken = torch.zeros(left, dtype=torch.bool, device=keep.device)
        self.V = self.V.new_zeros(left * g, (self.capacity - self.k) * g)
        self.folded = self.k


def thin_cross(B: torch.Tensor, rows: int) -> torch.Tensor:
    """A matrix B~ with B~ B~^T = B B^T and at most about ``rows`` columns (B itself where that
    would not be much narrower: the caller copies it into its own precision).

    The greedy path (every score and every error) depends on B only through B B^T, and
    B = X^T Y has rank at most the number of rows. A consumer with many outputs and few rows
    (a Linear reads one row per image: VGG's 4,096-wide classifier at 128 images) then carries
    an F x O residual through every step for a rank-``rows`` content. B~ = Q L, with Q an
    orthonormal basis of B's range (from B times a seeded Gaussian sketch, exact when the rank
    is at most the sketch's width) and L L^T = Q^T B B^T Q.
    """
    features, outputs = B.shape
    width = rows + 16 if rows else outputs
    if width > outputs // 2 or width > features:
        return B
    sketch = torch.randn(outputs, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Q, _ = torch.linalg.qr(B @ sketch.to(B.device))  # (F, width): B's range, rank <= rows
    P = Q.T @ B
    # L L^T = P P^T; eigh rather than Cholesky: P P^T is singular where the rank is below width
    vals, vecs = torch.linalg.eigh(P @ P.T)
    return Q @ (vecs * vals.clamp_min(0.0).sqrt())


def greedy_select(
    stats: list[Stats],
    k: Optional[int] = None,
    eps: Optional[float] = None,
    ridge: float = 1e-3,
    min_k: int = 1,
    block_share: Optional[float] = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[list[int], list[float]]:
    """Greedy forward selection over channels shared by ``stats`` (one per consumer).

    Stops after ``k`` channels, or at the first size whose relative error (summed over
    consumers) is at most ``eps``; with neither, runs the whole path. Returns the channels
    in the order they were added and the relative error after each addition.

    ``block_share`` (the planning curves only, never the selection): once n channels are
    chosen, the next ``floor(block_share * n)`` best-scoring ones are added together in one
    block step, scored once instead of after each addition. The errors stay exact for the
    order taken; the order is greedy at a resolution of that share of the width.

    ``dtype``: the precision of the path's arithmetic (the module's docstring); the errors
    returned are summed in float64 either way.
    """
    C = stats[0].channels
    if any(st.channels != C for st in stats):
        raise ValueError("all consumers of a unit must read the same number of channels")
    # The loop is many small tensor ops: with more than one thread each op pays an OpenMP
    # barrier, and on a busy machine that costs 10-100x. One thread, unless the Gram is large.
    threads = torch.get_num_threads()
    if stats[0].G.shape[0] <= 2048:
        torch.set_num_threads(1)
    try:
        return _greedy_select(stats, k, eps, ridge, min_k, C, block_share, dtype)
    finally:
        torch.set_num_threads(threads)


def _greedy_select(
    stats: list[Stats],
    k: Optional[int],
    eps: Optional[float],
    ridge: float,
    min_k: int,
    C: int,
    block_share: Optional[float],
    dtype: torch.dtype,
) -> tuple[list[int], list[float]]:
    limit = C if k is None else min(k, C)
    if k is None:
        # past the point where the selected columns outnumber the rows the fit is exact: the
        # unregularised error cannot fall further, so a full path stops there
        limit = min(
            limit, max(1, -(-min(st.rows for st in stats) // stats[0].group)) if stats[0].rows else limit
        )
    states = [_GroupOmpState(st, ridge, limit, dtype) for st in stats]
    g, dev = stats[0].group, stats[0].G.device
    total = sum(s.yy for s in states) or 1.0
    order = torch.empty(limit, dtype=torch.long, device=dev)
    taken = torch.zeros(C, dtype=torch.bool, device=dev)
    # the choices and errors stay on the device; an eps stop reads them back every few steps
    # (every step on a CPU, where a read costs nothing) and cuts the path at the first size
    # that meets eps, so the result is the same as stopping there
    check_every = _eps_check_steps(dev)
    n = checked = 0
    while n < limit:
        score = states[0].scores()  # (a fresh tensor: filled in place; no ``0 +`` of a sum())
        for s in states[1:]:
            score += s.scores()
        score.masked_fill_(taken, -float("inf"))
        m = block_size(block_share, n, limit - n, g)
        chosen = torch.argmax(score).view(1) if m == 1 else torch.topk(score, m).indices
        for s in states:
            s.add(chosen)
        taken.index_fill_(0, chosen, True)  # (not a setitem: no host copy, no GPU stall; see add)
        order[n : n + m] = chosen
        n += m
        if eps is not None and (n - checked >= check_every or n == limit):
            path = _relative_path(states, checked, n, total)
            hit = next((i for i, rel in enumerate(path) if rel <= eps and checked + i + 1 >= min_k), None)
            if hit is not None:
                n = checked + hit + 1
                break
            checked = n
    path = _relative_path(states, 0, n, total)
    if not all(math.isfinite(rel) for rel in path):
        # (the factorisations do not check their status on the device: this read does, once)
        raise GslimError(
            "greedy selection: the channel statistics are singular (duplicate or all-zero channels "
            "with no ridge); set compress.ridge above 0"
        )
    return order[:n].tolist(), path


#: float32 paths rely on the ridge to keep residual blocks away from singular: below this
#: (relative) ridge the path runs in float64 whatever ``compress.omp_precision`` says
MIN_RIDGE_FLOAT32 = 1e-4


def path_dtype(precision: str, ridge: float) -> torch.dtype:
    """The dtype of a greedy path's arithmetic for ``compress.omp_precision`` and ``compress.ridge``."""
    if precision not in ("float32", "float64"):
        raise ValueError(f"unknown precision {precision!r}")
    return torch.float32 if precision == "float32" and ridge >= MIN_RIDGE_FLOAT32 else torch.float64


#: a block step adds at most this many columns (its Cholesky factor is (m*g)^2)
MAX_BLOCK_COLUMNS = 512
#: on a GPU, an eps-driven path reads its errors back every this many steps
EPS_CHECK_STEPS = 32


def block_size(block_share: Optional[float], chosen: int, left: int, group: int) -> int:
    """Groups the next step adds: one, or with ``block_share`` that share of those chosen so far
    (at most ``left``, and at most MAX_BLOCK_COLUMNS columns)."""
    if block_share is None:
        return 1
    return max(1, min(int(block_share * chosen), left, MAX_BLOCK_COLUMNS // group))


def _eps_check_steps(device: torch.device) -> int:
    return 1 if device.type == "cpu" else EPS_CHECK_STEPS


def _relative_path(states: list[_GroupOmpState], start: int, stop: int, total: float) -> list[float]:
    """The relative error (summed over the consumers) after each step from ``start`` to ``stop``."""
    err = sum(s.errs[start:stop] for s in states)
    return (err.clamp_min(0.0) / total).tolist()


def group_columns(groups: list[int], g: int, device: torch.device) -> torch.Tensor:
    """The columns of ``groups`` (g per group, channel-major), in their order, as one index
    tensor on ``device`` (one small op, not one per group: on a GPU each op is a launch)."""
    return (torch.as_tensor(groups, dtype=torch.long)[:, None] * g + torch.arange(g)).view(-1).to(device)


def refit(st: Stats, keep: list[int], ridge: float = 1e-3) -> tuple[torch.Tensor, float]:
    """Least-squares consumer weights for the kept channels (in the given order) and the exact
    relative error they leave (without the ridge term). Returns W of shape (len(keep)*g, O)."""
    g = st.group
    cols = group_columns(keep, g, st.G.device)
    G = st.G[cols][:, cols]
    B = st.B[cols]
    lam = ridge * float(torch.diagonal(st.G).mean().clamp_min(1e-12))
    Gr = G
    Gr.diagonal().add_(lam)  # (G is a copy)
    L, info = torch.linalg.cholesky_ex(Gr)  # SPD with a ridge: Cholesky, half of an LU solve's work
    W = torch.cholesky_solve(B, L) if int(info) == 0 else torch.linalg.solve(Gr, B)
    # the error without the ridge term, from (G + lam I) W = B: <W, G W> = <W, B> - lam ||W||^2
    # (no k x k x O product: a 1,040-channel Linear with 4,096 outputs spent seconds there)
    err = st.yy - float((W * B).sum()) - lam * float(W.pow(2).sum())
    return W, max(err, 0.0) / (st.yy or 1.0)


def subset_error(st: Stats, keep: list[int], W: torch.Tensor) -> float:
    """Relative error of given consumer weights W (rows for ``keep``'s columns) on ``st``'s rows."""
    g = st.group
    cols = group_columns(keep, g, st.G.device)
    G, B = st.G[cols][:, cols], st.B[cols]
    W = W.to(G.dtype)
    err = st.yy - 2.0 * float((W * B).sum()) + float((W * (G @ W)).sum())
    return max(err, 0.0) / (st.yy or 1.0)


def prediction_error_curve(path: list[float], rows: int, group: int) -> list[float]:
    """In-sample error path corrected for the fit's optimism (Akaike's final prediction error).

    With n rows and p = k*group unknowns per output, a least-squares fit's expected error on
    new rows is about its in-sample error times (n + p) / (n - p); at p >= n the in-sample
    error says nothing. The budget allocation reads these curves, so a unit whose fit only
    looks perfect because it has few rows (a Linear consumer has one row per image) is not
    cut hard. The curve is made non-increasing: a width never looks worse than a narrower one.
    """
    out, best = [], float("inf")
    for k, err in enumerate(path, start=1):
        p = k * group
        fpe = err * (rows + p) / (rows - p) if rows > p else float("inf")
        best = min(best, fpe, 1.0)
        out.append(best)
    return out


def coarsen(st: Stats, atom: int) -> Stats:
    """The same statistics with ``atom`` consecutive channels as one selectable group (the
    channels a grouped conv keeps or drops together; columns are laid out channel-major)."""
    if atom == 1:
        return st
    # (held-out data, gslim.compress.sums.HeldMaps / HeldRows, is read per channel: as it is)
    return replace(
        st, group=st.group * atom, held=coarsen(st.held, atom) if isinstance(st.held, Stats) else st.held
    )


def channels_of(groups: list[int], atom: int) -> list[int]:
    """The channels of the selected groups of ``atom`` channels, in selection order."""
    return [g * atom + i for g in groups for i in range(atom)]


def per_channel_curve(curve: list[float], atom: int) -> list[float]:
    """A curve over kept groups as a curve over kept channels: a width of c channels needs
    ceil(c / atom) groups."""
    return [curve[(c - 1) // atom] for c in range(1, len(curve) * atom + 1)]
