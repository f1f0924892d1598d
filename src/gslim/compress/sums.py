"""The sums a consumer's regression is solved from: G = X^T X, B = X^T Y and ||Y||^2 in float64,
over sampled rows or (dense) every row, with a held-out share, summed in a way the batches' order
and their split across torchrun ranks cannot change."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gslim.compress.dense_stats import (
    add_dense_gram,
    channel_major,
    dense_cross,
    explicit_padding,
    mirror_offsets,
)
from gslim.compress.omp import Stats, group_columns, subset_error
from gslim.compress.shard import SINGLE, ExactSum, Shard
from gslim.errors import GslimError

HOLDOUT_FRACTION = 0.2  # of the sampled rows, kept out of the fit to measure its error honestly


class Sample(NamedTuple):
    """The rows one batch contributes: ``pick`` (indices into its rows) and, of those, the
    ``held`` ones (a mask; None without a held-out share). ``pick`` None: every row, through
    dense statistics (:mod:`gslim.compress.dense_stats`); ``held`` then masks whole images."""

    pick: Optional[torch.Tensor]
    held: Optional[torch.Tensor]


class StatsAccumulator:
    """Accumulates G = X^T X, B = X^T Y, ||Y||^2 in float64 over batches.

    Rows are sampled (``fraction``) and a seeded share of them (``holdout``) goes to a second,
    held-out set of the same sums: the fit uses the first, its error is measured on the second.
    ``draw`` gives the sample of a batch before its rows exist, so features and targets taken in
    different passes (pruned and original network) use the same rows. Each batch's sample comes
    from a generator seeded by (this accumulator's seed, the batch's index in the whole
    calibration set), so it is the same whichever torchrun rank runs the batch (``shard``);
    :meth:`result` all-reduces the sums across ranks.

    ``cross_weights`` (F x O, float64): weights W with Y = X W on every row added, which holds
    where Y is the consumer's own output on the same input (the planning pass). B = G W is then
    formed once from the summed G, not from the rows of each batch: one F x F x O product in
    place of a rows x F x O one or a backward-weight conv over every position (the planning pass
    passes W where that is the cheaper: :func:`gslim.compress.planning.cross_from_gram`), and
    exact where the rows' float32 product was rounded.
    """

    def __init__(
        self,
        fraction: float,
        generator: torch.Generator,
        holdout: float = HOLDOUT_FRACTION,
        shard: Optional[Shard] = None,
        dense: bool = False,
        cross_weights: Optional[torch.Tensor] = None,
        held_as_data: bool = False,
    ):
        self.fraction, self.holdout, self.dense = fraction, holdout, dense
        self.cross_weights = cross_weights
        self.shard = shard or SINGLE
        self.seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.batches = 0  # batches drawn so far on this rank
        self.fit = _Sums()
        self.held = _Sums()
        # ``held_as_data``: the held-out share is kept as it is, not as sums: a dense consumer's
        # images as maps (HeldMaps), a sampled one's rows (HeldRows)
        self.held_data: Optional[_HeldOut] = None
        self.held_as_data = held_as_data
        self.reduced = False

    def draw(self, n: int, images: int = 1) -> Sample:
        """The sample of the next batch, which has ``n`` rows of ``images`` images."""
        index = self.shard.global_index(self.batches)
        self.batches += 1
        gen = torch.Generator().manual_seed((self.seed + index * 1_000_003) % (2**63 - 1))
        if self.dense:  # every row; the held-out share is whole images (at least one is fitted)
            held = torch.rand(images, generator=gen) < self.holdout if self.holdout > 0.0 else None
            if held is not None and bool(held.all()):
                held[0] = False
            return Sample(None, held)
        if self.fraction >= 1.0:
            pick = torch.arange(n)
        else:
            pick = torch.nonzero(torch.rand(n, generator=gen) < self.fraction).flatten()
        held = torch.rand(pick.shape[0], generator=gen) < self.holdout if self.holdout > 0.0 else None
        return Sample(pick, held)

    def add(self, X: torch.Tensor, Y: torch.Tensor, held: Optional[torch.Tensor]) -> None:
        """Add a batch's sampled rows (``held``: the mask of :meth:`draw`'s sample)."""
        cross = self.cross_weights is None
        if held is None:
            self.fit.add(X, Y, cross)
            return
        held = held.to(X.device)
        self.fit.add(X[~held], Y[~held], cross)
        if not self.held_as_data:
            self.held.add(X[held], Y[held], cross)
            return
        if self.held_data is None:
            self.held_data = HeldRows(self.shard)
        if bool(held.any()):  # (one read of a small mask per batch)
            self.held_data.add(X[held], Y[held])

    def add_dense(
        self, mod: nn.Conv2d, x: torch.Tensor, Y: torch.Tensor, held: Optional[torch.Tensor]
    ) -> None:
        """Add a batch's every row: ``x`` the consumer's input, ``Y`` its target map (:func:`target_map`),
        ``held`` the held-out images."""

        def add(sums: _Sums, x: torch.Tensor, Y: torch.Tensor) -> None:
            B = dense_cross(mod, x, Y) if self.cross_weights is None else None
            sums.add_dense(mod, x, B, Y, Y.numel() // Y.shape[1])

        if held is None:
            add(self.fit, x, Y)
            return
        if self.held_as_data:
            mask = held.to(x.device)
            if self.held_data is None:
                self.held_data = HeldMaps(mod, self.shard)
            if bool(mask.any()):  # (one read of a small mask per batch)
                self.held_data.add(x[mask], Y[mask])
            add(self.fit, x[~mask], Y[~mask])  # (draw fits at least one image of every batch)
            return
        for sums, mask in ((self.fit, ~held), (self.held, held)):
            mask = mask.to(x.device)
            xs, ys = x[mask], Y[mask]
            if xs.shape[0] == 0:  # zeros, still: under torchrun every rank all-reduces the same sums
                kk, C = mod.kernel_size[0] * mod.kernel_size[1], x.shape[1]
                zero_cross = x.new_zeros(kk * C, Y.shape[1]) if self.cross_weights is None else None
                sums.add_dense(mod, xs, zero_cross, ys, 0)
                continue
            add(sums, xs, ys)

    def result(self, group: int) -> Stats:
        if self.fit.G is None:
            raise GslimError("no calibration data reached a consumer (is the calibration set empty?)")
        if not self.reduced:  # every rank holds the sums of all ranks from here on
            for sums in (self.fit, self.held):
                if sums.G is not None:
                    sums.complete()
                    sums.reduce(self.shard)
                    if self.cross_weights is not None:  # (after the all-reduce: every rank the same)
                        sums.B = sums.G @ self.cross_weights.to(sums.G.device, sums.G.dtype)
            if self.held_data is not None:
                self.held_data.reduce()
            self.reduced = True
        held = None
        if self.held_data is not None and self.held_data.rows > 0:
            held = self.held_data.with_group(group)
        elif self.held.G is not None and self.held.rows > 0:
            h = self.held
            held = Stats(h.G, h.B, float(h.yy), group, h.rows)
        f = self.fit
        return Stats(f.G, f.B, float(f.yy), group, f.rows, held=held)


class _Sums:
    """G, B, ||Y||^2 and the row count of the rows added so far.

    The order of the batches must not change the totals, so that a selection whose batches are
    split across torchrun ranks equals the one-process selection (a last-bit difference is enough
    for a near-tie in the budget's knapsack or in an under-determined OMP step to go the other
    way: measured on MobileNetV3-small). Each batch's G and B are float32 products; their float64
    sum is exact, whatever the order, unless one entry's terms span more than 2^25 across batches
    (24-bit terms in a 53-bit sum, less the bits of the batch count). ||Y||^2 is summed in float64
    per batch, so its batch totals are rounded: they are added with TwoSum (:class:`ExactSum`).
    Summing the Grams with TwoSum too was measured 2.6x slower on ResNet-18 (4,608-wide Grams).
    """

    #: Grams this wide are added block by block, upper triangle only, and mirrored once at the
    #: end: 4,608 columns x 2,048 rows, one thread, 0.86 s per batch as one product, 0.50 s in
    #: blocks of 768 (a k x k consumer of a wide layer: ResNet's 512-channel 3x3 convs)
    BLOCK = 768
    #: From this width on a Gram is at least three blocks: two threads, 16 rows per column in 4
    #: batches, 576 to 1,280 columns 0.77-0.82 of one product's time, 448 the same
    #: (MobileNetV2's expansions, ResNet-50's 3x3 consumers; benchmarks/statistics_sums.py)
    MIN_BLOCKED = 512

    def __init__(self) -> None:
        self.G: Optional[torch.Tensor] = None
        self.B: Optional[torch.Tensor] = None
        self.yy = ExactSum()
        self.rows = 0
        self.upper_only = False  # G's blocks below the diagonal are not filled yet
        self.offset_major = False  # G is (k*k, C, k*k, C), not laid out as the columns yet

    def add(self, X: torch.Tensor, Y: torch.Tensor, cross: bool = True) -> None:
        """Add rows X and their targets Y (``cross`` False: B is not summed, the caller forms it)."""
        assert not self.offset_major, "sampled rows added to the sums of dense Grams"
        X, Y = X.float(), Y.float()
        if cross:
            B = X.T @ Y
            self.B = B.double() if self.B is None else self.B.add_(B)
        if self.G is None:
            F = X.shape[1]
            self.G = torch.zeros(F, F, dtype=torch.float64, device=X.device)
        edges = self._edges()
        if len(edges) == 2:
            self.G.add_(X.T @ X)  # promoted to float64 in place: no float64 copy of a large Gram
        else:
            assert self.upper_only or self.rows == 0, "rows added after the Gram was completed"
            for i, (a, b) in enumerate(zip(edges, edges[1:])):
                for c, d in zip(edges[i:], edges[i + 1 :]):
                    self.G[a:b, c:d].add_(X[:, a:b].T @ X[:, c:d])
            self.upper_only = True
        self.yy.add(Y.double().pow(2).sum())
        self.rows += X.shape[0]

    def add_dense(
        self, mod: nn.Conv2d, x: torch.Tensor, B: Optional[torch.Tensor], Y: torch.Tensor, rows: int
    ) -> None:
        """Add a batch's every row (:func:`add_dense_gram`; B computed by the caller, None: not
        summed) with its targets ``Y``. G is summed offset-major, (k*k, C, k*k, C), on its upper
        offset blocks, and laid out as the columns once, by :meth:`complete`."""
        if self.G is None:
            kk, C = mod.kernel_size[0] * mod.kernel_size[1], x.shape[1]
            self.G = torch.zeros(kk, C, kk, C, dtype=torch.float64, device=x.device)
            self.offset_major = True
        assert self.offset_major, "every row added to the sums of sampled rows"
        if x.shape[0]:
            add_dense_gram(mod, x, self.G)
        if B is not None:
            self.B = B.double() if self.B is None else self.B.add_(B)
        self.yy.add(Y.double().pow(2).sum())
        self.rows += rows

    def _edges(self) -> list[int]:
        F = self.G.shape[0]
        n = 1 if F < self.MIN_BLOCKED else max(3, -(-F // self.BLOCK))
        return [F * i // n for i in range(n + 1)]

    def complete(self) -> None:
        """Fill G's lower blocks from the upper ones, or lay an offset-major G out as the
        columns (once, after the last batch)."""
        if self.offset_major:
            mirror_offsets(self.G)
            self.G = channel_major(self.G)
            self.offset_major = False
        if self.upper_only:
            edges = self._edges()
            for i, (a, b) in enumerate(zip(edges, edges[1:])):
                for c, d in zip(edges[i + 1 :], edges[i + 2 :]):
                    self.G[c:d, a:b] = self.G[a:b, c:d].T
            self.upper_only = False

    def reduce(self, shard: Shard) -> None:
        shard.sum_(self.G)
        if self.B is not None:
            shard.sum_(self.B)
        shard.exact_sum_(self.yy)
        self.rows = int(shard.sum_numbers([float(self.rows)])[0])


class _HeldOut:
    """A held-out share kept as data (:class:`HeldMaps`, :class:`HeldRows`): its targets' energy
    ||Y||^2 and row count, summed across ranks once (:meth:`reduce`), and the error of given
    weights as the residual's own sum of squares, summed exactly across ranks."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self._yy = _started_sum()
        self.rows = 0
        self.yy = 0.0

    def _count(self, Y: torch.Tensor, rows: int) -> None:
        self._yy.add(Y.double().pow(2).sum())
        self.rows += rows

    def reduce(self) -> None:
        """Sum ||Y||^2 and the row count across ranks (once, as the fitted sums are)."""
        self.shard.exact_sum_(self._yy)
        self.yy = float(self._yy)
        self.rows = int(self.shard.sum_numbers([float(self.rows)])[0])

    def _relative(self, residual: ExactSum) -> float:
        """The residual's sum of squares across ranks, relative to the targets' energy."""
        self.shard.exact_sum_(residual)
        return max(float(residual), 0.0) / (self.yy or 1.0)


def _started_sum() -> ExactSum:
    total = ExactSum()
    total.add(torch.zeros((), dtype=torch.float64))  # (every rank adds a term: exact_sum_)
    return total


class HeldMaps(_HeldOut):
    """A dense consumer's held-out images as they are: its input maps and its target maps.

    The held-out rows only ever answer one question, the error of given weights on them (the
    re-fit's against the current weights'). Their Gram and cross term cost a fifth of the dense
    statistics (13 C x C products and a backward-weight conv per batch); kept as maps, the
    question is one conv of the held-out inputs with those weights. The error is the residual's
    own sum of squares (float32 conv, float64 sum), which does not cancel the way
    ``yy - 2 <W, B> + <W, G W>`` does. Memory: a fifth of one layer's input and output maps,
    where dense statistics are taken (late, small maps)."""

    def __init__(self, mod: nn.Conv2d, shard: Shard):
        super().__init__(shard)
        self.pad = explicit_padding(mod)
        self.dilation, self.kernel = tuple(mod.dilation), tuple(mod.kernel_size)
        self.maps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, x: torch.Tensor, Y: torch.Tensor) -> None:
        self.maps.append((x, Y))
        self._count(Y, Y.numel() // Y.shape[1])

    def with_group(self, group: int) -> "HeldMaps":
        return self  # (its columns are the conv's own: channel-major, k*k each)

    def error(self, keep: Sequence[int], W: torch.Tensor) -> float:
        """Relative error on the held-out images of consumer weights ``W`` (regression layout:
        rows for ``keep``'s channels, k*k each, as :func:`gslim.compress.omp.refit` returns them).
        Every rank must call it (the error is summed across ranks)."""
        total = _started_sum()
        if self.maps:
            x0 = self.maps[0][0]
            idx = torch.as_tensor(list(keep), dtype=torch.long, device=x0.device)
            w = W.T.reshape(W.shape[1], len(idx), *self.kernel).to(x0.device, torch.float32)
            for x, Y in self.maps:
                out = F.conv2d(F.pad(x.index_select(1, idx).float(), self.pad), w, dilation=self.dilation)
                total.add((out - Y.float()).double().pow(2).sum())
        return self._relative(total)


class HeldRows(_HeldOut):
    """A sampled consumer's held-out rows as they are: features X (rows x F) and targets Y
    (rows x O), float32, batch by batch.

    As with :class:`HeldMaps`, they only answer the error of given weights, here
    sum ||X[:, keep] W - Y||^2: one rows x k x O product per question, where sums cost a
    rows x F x F Gram per batch and a k x k x O float64 product per question (wide_resnet50_2 at
    64 px: 9,216-column Grams of a few hundred rows), and the residual's own sum of squares does
    not cancel the way ``yy - 2 <W, B> + <W, G W>`` does. Memory: at most 16 rows per unknown
    are sampled and a fifth held out, so at most about 1.6x the sums' F x (F + O) float64 -- and
    no F x F held-out Gram in memory at all."""

    def __init__(self, shard: Shard):
        super().__init__(shard)
        self.group = 1  # columns per channel (set by with_group once the sums are complete)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        self.batches.append((X.float(), Y.float()))
        self._count(Y, X.shape[0])

    def with_group(self, group: int) -> "HeldRows":
        self.group = group
        return self

    def error(self, keep: Sequence[int], W: torch.Tensor) -> float:
        """Relative error on the held-out rows of consumer weights ``W`` (rows for ``keep``'s
        columns, ``group`` each, as :func:`gslim.compress.omp.refit` returns them). Every rank
        must call it (the error is summed across ranks)."""
        total = _started_sum()
        if self.batches:
            X0 = self.batches[0][0]
            cols = group_columns(list(keep), self.group, X0.device)
            w = W.to(X0.device, torch.float32)
            for X, Y in self.batches:
                total.add((X.index_select(1, cols) @ w - Y).double().pow(2).sum())
        return self._relative(total)


def held_error(held, keep: Sequence[int], W: torch.Tensor) -> float:
    """The relative error of consumer weights ``W`` on held-out rows: kept as sums (a
    :class:`gslim.compress.omp.Stats`), as maps (:class:`HeldMaps`) or as rows (:class:`HeldRows`)."""
    if isinstance(held, _HeldOut):
        return held.error(keep, W)
    return subset_error(held, list(keep), W)
