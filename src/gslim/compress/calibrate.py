"""Calibration passes: walk the network segment by segment on cached activations.

The traced graph is cut at points where exactly one tensor is alive (block boundaries)
and never inside a unit (between its first producer and its last consumer). Each
segment becomes a small GraphModule sharing the model's submodules, so the greedy pass
can run "segment s of the original network on the original activations" and "segment s
of the network pruned so far on the pruned activations" side by side, batch by batch,
and only ever pay for one pass of each network over the calibration set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from gslim.compress.bn_recalib import recalibrate_bn  # noqa: F401 - its long-standing import path
from gslim.compress.dense_stats import (
    channel_major,
    dense_cross,
    dense_gram_offsets,
    explicit_padding,
    prefer_dense,
)
from gslim.compress.omp import Stats
from gslim.compress.shard import SINGLE, ExactSum, Shard
from gslim.compress.slim import column_offset
from gslim.compress.units import Unit
from gslim.errors import GslimError


@dataclass
class Segment:
    start: int  # index of the cut node it reads (exclusive)
    end: int  # index of the cut node it returns (inclusive)
    module: fx.GraphModule


def cut_points(gm: fx.GraphModule, spans: Iterable[tuple[int, int]]) -> list[int]:
    """Indices of nodes whose output is the only live value, outside every (start, end) span."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = [max((index[u] for u in n.users), default=i) for i, n in enumerate(nodes)]
    blocked = [False] * len(nodes)
    for a, b in spans:
        for i in range(a, b):
            blocked[i] = True
    cuts, live_until = [], -1
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        if live_until <= i and not blocked[i] and n.op != "get_attr":
            cuts.append(i)
        live_until = max(live_until, last_use[i])
    return cuts


def build_segments(gm: fx.GraphModule, cuts: list[int], root: Optional[nn.Module] = None) -> list[Segment]:
    """One GraphModule per interval between consecutive cuts (and one up to the output).

    The segments call the layers of ``root`` (default: ``gm``), which may be another model
    with the same layer names, e.g. the original network next to its pruned copy.
    """
    nodes = list(gm.graph.nodes)
    out_node = nodes[-1]
    final = out_node.args[0]
    ends = cuts[1:] + [nodes.index(final)]
    segments = []
    for a, b in zip(cuts, ends):
        if b <= a:
            continue
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {nodes[a]: g.placeholder("x")}
        for n in nodes[a + 1 : b + 1]:
            env[n] = g.node_copy(n, lambda m: env[m])
        g.output(env[nodes[b]])
        segments.append(Segment(a, b, fx.GraphModule(root if root is not None else gm, g)))
    return segments


@dataclass
class SegmentTail:
    """A segment split at a node: ``head(x)`` returns the values alive across the cut, and
    ``tail(*live)`` computes the segment's output from them. Rerunning only the tail after a
    unit's surgery reuses everything before its consumer (kept channels' values do not change)."""

    head: fx.GraphModule
    tail: fx.GraphModule
    live: list[str]  # names of the head's nodes that the tail reads, in its placeholder order


def split_segment(seg: fx.GraphModule, at: str) -> Optional[SegmentTail]:
    """Split ``seg`` before its ``call_module`` node of module ``at`` (None: no such node)."""
    nodes = list(seg.graph.nodes)
    cut = next((i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == at), None)
    if cut is None:
        return None
    later = set(nodes[cut:])
    # get_attr values are recreated in the tail (after surgery they must be the new tensors)
    live = [n for n in nodes[:cut] if n.op != "get_attr" and any(u in later for u in n.users)]
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[:cut]:
        env[n] = head.node_copy(n, lambda m: env[m])
    head.output(tuple(env[n] for n in live))
    tail = fx.Graph()
    tenv: dict[fx.Node, fx.Node] = {n: tail.placeholder(f"live_{i}") for i, n in enumerate(live)}
    for n in nodes[:cut]:
        if n.op == "get_attr" and any(u in later for u in n.users):
            tenv[n] = tail.node_copy(n, lambda m: tenv[m])
    for n in nodes[cut:]:
        tenv[n] = tail.node_copy(n, lambda m: tenv[m])
    root = seg
    return SegmentTail(fx.GraphModule(root, head), fx.GraphModule(root, tail), [n.name for n in live])


def unit_span(unit: Unit, node_index: dict[str, int], call_node: dict[str, str]) -> tuple[int, int]:
    inside = unit.producers + unit.gate_producers + unit.members + unit.inner_readers
    start = min(node_index[call_node[m]] for m in inside)
    end = max(node_index[call_node[m]] for m in unit.consumers)
    return start, end


# ---------------------------------------------------------------------------------------
# statistics of a consumer: rows are positions, columns are (channel, kernel offset)


def _padded(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded the way the conv pads it (zeros, reflect, replicate or circular)."""
    pad = explicit_padding(mod)
    if not any(pad):
        return x
    if mod.padding_mode == "zeros":
        return F.pad(x, pad)
    return F.pad(x, pad, mode=mod.padding_mode)


def consumer_rows(mod: nn.Module, x: torch.Tensor, pick: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The consumer's input laid out as regression rows (positions x channels*k*k), or only the
    rows ``pick`` (indices into that layout) when given.

    Sampled rows are gathered straight from the padded input: unfolding the whole batch to keep
    ~1% of it was the largest cost of selection on k x k consumers (measured, 1 thread, 32
    images: 370 ms to unfold 64 channels at 56 x 56 against 12 ms to gather its 1,140 sampled
    rows). Always a new tensor: a later in-place op on ``x`` cannot change the rows.
    """
    if isinstance(mod, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return _own(rows, x) if pick is None else rows[pick.to(x.device)]
    kh, kw = mod.kernel_size
    src, x = x, _padded(mod, x)
    sh, sw = mod.stride
    dh, dw = mod.dilation
    ho, wo = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if pick is not None and pick.shape[0] < x.shape[0] * ho * wo:  # (indices are distinct: all rows else)
        pick = pick.to(x.device)
        n, pos = pick // (ho * wo), pick % (ho * wo)
        h = (pos // wo)[:, None] * sh + torch.arange(kh, device=x.device) * dh  # (rows, kh)
        w = (pos % wo)[:, None] * sw + torch.arange(kw, device=x.device) * dw  # (rows, kw)
        patches = x[n[:, None, None], :, h[:, :, None], w[:, None, :]]  # (rows, kh, kw, C)
        return patches.permute(0, 3, 1, 2).reshape(pick.shape[0], -1)  # unfold's (C, kh, kw) order
    if (kh, kw) == (1, 1) and mod.dilation == (1, 1):
        x = x[:, :, ::sh, ::sw]
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    else:
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=0, stride=mod.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return _own(rows if pick is None else rows[pick.to(rows.device)], src)


def unit_columns(
    mod: nn.Module, unit: Unit, layer: str, model: nn.Module, X: torch.Tensor, Y: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The regression of ``unit``'s own columns when ``layer`` reads it inside a concatenation:
    its columns of ``X``, and the target ``Y`` less what the other inputs of the concatenation
    contribute through the layer's current weights (those columns are not this unit's to fit).
    ``X`` and ``Y`` unchanged when the layer reads the unit alone."""
    if layer not in unit.concat_before:
        return X, Y
    kk = kernel_group(mod)
    off = column_offset(model, unit, layer)
    mine = torch.zeros(X.shape[1], dtype=torch.bool, device=X.device)
    mine[off * kk : (off + width) * kk] = True
    w = mod.weight.detach().reshape(mod.weight.shape[0], -1)[:, ~mine.to(mod.weight.device)]
    return X[:, mine], Y - X[:, ~mine] @ w.T.to(X.device, X.dtype)


def row_count(mod: nn.Module, y: torch.Tensor) -> int:
    """Regression rows in a consumer's output (positions of all images): a Linear's output
    has its channels last (one row per image, or per position of a channels-last map)."""
    return y.numel() // y.shape[-1 if isinstance(mod, nn.Linear) else 1]


def target_rows(mod: nn.Module, y: torch.Tensor, pick: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The consumer's output without its bias, as regression rows (positions x out), or only
    the rows ``pick``.

    Always a new tensor, so it can be taken inside a hook and kept: an in-place activation
    after the consumer (``ReLU(inplace=True)``) would otherwise overwrite the target.
    """
    src = y
    if isinstance(mod, nn.Linear):  # channels last: (N, O) or a channels-last map (N, H, W, O)
        y = y.reshape(-1, y.shape[-1])
    elif y.dim() != 2 and pick is not None:
        # row p is position (image p // HW, pixel p % HW): gather the picked rows from the map
        # instead of laying the whole map out channels-last first (MobileNetV2 at 224 px, 256
        # images: 0.59 s of copies, most of them for rows the sample drops)
        pick = pick.to(y.device)
        hw = y.shape[2] * y.shape[3]
        y, pick = y.flatten(2)[pick // hw, :, pick % hw], None  # (rows, O): advanced indices first
    elif y.dim() != 2:
        y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    if pick is not None:
        y = y[pick.to(y.device)]
    if mod.bias is not None:
        y = y - mod.bias
    return _own(y, src)


def target_map(mod: nn.Conv2d, y: torch.Tensor) -> torch.Tensor:
    """The conv's whole output map without its bias (N, O, Ho, Wo), for dense statistics; a new
    tensor, like :func:`target_rows`."""
    return y - mod.bias.view(1, -1, 1, 1) if mod.bias is not None else y.clone()


def batch_targets(mod: nn.Module, y: torch.Tensor, sample: "Sample") -> torch.Tensor:
    """What a batch's sample keeps of the consumer's output: the sampled rows, or the whole map
    where the statistics are dense."""
    return target_map(mod, y) if sample.pick is None else target_rows(mod, y, sample.pick)


def _own(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it has its own memory, else a copy (a view of ``src`` could be
    overwritten by an in-place op on ``src``)."""
    if t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
        return t.clone()
    return t


def kernel_group(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return 1
    return mod.kernel_size[0] * mod.kernel_size[1]


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
    """

    def __init__(
        self,
        fraction: float,
        generator: torch.Generator,
        holdout: float = HOLDOUT_FRACTION,
        shard: Optional[Shard] = None,
        dense: bool = False,
    ):
        self.fraction, self.holdout, self.dense = fraction, holdout, dense
        self.shard = shard or SINGLE
        self.seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.batches = 0  # batches drawn so far on this rank
        self.fit = _Sums()
        self.held = _Sums()
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
        if held is None:
            self.fit.add(X, Y)
            return
        held = held.to(X.device)
        self.fit.add(X[~held], Y[~held])
        self.held.add(X[held], Y[held])

    def add_dense(
        self, mod: nn.Conv2d, x: torch.Tensor, Y: torch.Tensor, held: Optional[torch.Tensor]
    ) -> None:
        """Add a batch's every row: ``x`` the consumer's input, ``Y`` its target map (:func:`target_map`),
        ``held`` the held-out images."""
        if held is None:
            self.fit.add_products(
                dense_gram_offsets(mod, x), dense_cross(mod, x, Y), Y, Y.numel() // Y.shape[1]
            )
            return
        for sums, mask in ((self.fit, ~held), (self.held, held)):
            mask = mask.to(x.device)
            xs, ys = x[mask], Y[mask]
            if xs.shape[0] == 0:  # zeros, still: under torchrun every rank all-reduces the same sums
                kk, C = kernel_group(mod), x.shape[1]
                sums.add_products(x.new_zeros(kk, C, kk, C), x.new_zeros(kk * C, Y.shape[1]), ys, 0)
                continue
            sums.add_products(
                dense_gram_offsets(mod, xs), dense_cross(mod, xs, ys), ys, ys.numel() // ys.shape[1]
            )

    def result(self, group: int) -> Stats:
        if self.fit.G is None:
            raise GslimError("no calibration data reached a consumer (is the calibration set empty?)")
        if not self.reduced:  # every rank holds the sums of all ranks from here on
            for sums in (self.fit, self.held):
                if sums.G is not None:
                    sums.complete()
                    sums.reduce(self.shard)
            self.reduced = True
        held = None
        if self.held.G is not None and self.held.rows > 0:
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

    def __init__(self) -> None:
        self.G: Optional[torch.Tensor] = None
        self.B: Optional[torch.Tensor] = None
        self.yy = ExactSum()
        self.rows = 0
        self.upper_only = False  # G's blocks below the diagonal are not filled yet
        self.offset_major = False  # G is (k*k, C, k*k, C), not laid out as the columns yet

    def add(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        assert not self.offset_major, "sampled rows added to the sums of dense Grams"
        X, Y = X.float(), Y.float()
        B = X.T @ Y
        if self.G is None:
            F = X.shape[1]
            self.G = torch.zeros(F, F, dtype=torch.float64, device=X.device)
            self.B = B.double()
        else:
            self.B.add_(B)
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

    def add_products(self, G: torch.Tensor, B: torch.Tensor, Y: torch.Tensor, rows: int) -> None:
        """Add a batch's G and B computed elsewhere (float32, whole), with its targets ``Y``. G is
        offset-major (k*k, C, k*k, C), :func:`dense_gram_offsets`: summed as it is, laid out
        channel-major once, by :meth:`complete`."""
        if self.G is None:
            self.G, self.B = G.double(), B.double()
            self.offset_major = True
        else:
            assert not self.upper_only, "whole Grams added to one kept as its upper blocks"
            self.G.add_(G)
            self.B.add_(B)
        self.yy.add(Y.double().pow(2).sum())
        self.rows += rows

    def _edges(self) -> list[int]:
        F = self.G.shape[0]
        n = 1 if F < 2 * self.BLOCK else -(-F // self.BLOCK)
        return [F * i // n for i in range(n + 1)]

    def complete(self) -> None:
        """Fill G's lower blocks from the upper ones, or lay an offset-major G out as the
        columns (once, after the last batch)."""
        if self.offset_major:
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
        shard.sum_(self.B)
        shard.exact_sum_(self.yy)
        self.rows = int(shard.sum_numbers([float(self.rows)])[0])


def rows_per_image(mod: nn.Module, y_shape: torch.Size) -> int:
    """Regression rows one image contributes: the consumer's output positions."""
    if isinstance(mod, nn.Linear):  # one row per image, or per position of a channels-last map
        return math.prod(int(d) for d in y_shape[1:-1])
    if len(y_shape) == 2:
        return 1
    return int(y_shape[-1] * y_shape[-2])


def sampling(
    mod: nn.Module,
    x_shape: torch.Size,
    y_shape: torch.Size,
    images: int,
    max_rows: int,
    dense_ok: bool = True,
) -> tuple[float, bool]:
    """(fraction of rows to sample, whether to take every row through dense statistics instead):
    dense where it costs less than the sample (``dense_ok``: the caller can use a whole Gram)."""
    fraction = row_fraction(mod, y_shape, images, max_rows)
    return fraction, dense_ok and prefer_dense(mod, tuple(x_shape), fraction, rows_per_image(mod, y_shape))


def row_fraction(mod: nn.Module, y_shape: torch.Size, images: int, max_rows: int) -> float:
    """Fraction of positions to keep so that at most ``max_rows`` rows are used (from the
    consumer's *output* shape, which already accounts for stride, dilation and padding)."""
    if isinstance(mod, nn.Linear) and len(y_shape) == 2:
        return 1.0
    total = images * rows_per_image(mod, y_shape)
    return min(1.0, max_rows / max(total, 1))


class Hooks:
    """Context manager that removes its hooks on exit."""

    def __init__(self) -> None:
        self.handles: list = []

    def pre(self, mod: nn.Module, fn: Callable) -> None:
        self.handles.append(mod.register_forward_pre_hook(fn))

    def post(self, mod: nn.Module, fn: Callable) -> None:
        self.handles.append(mod.register_forward_hook(fn))

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def split_batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(x.split(batch_size))
